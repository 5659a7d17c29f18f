"""`attention_kernels.dispatch.xla_attention` (the model's XLA attention) against the numpy formula.

The query-blocked form (self-attention in index order) must give the values of the whole form, on
packed rows with padding, blocks that do not divide the length, and grouped-query heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_kernels.dispatch import attention_mask, xla_attention
from tests.attention_kernels.common import random_qkv, scaled_err
from tests.attention_kernels.test_reference import numpy_attention


def _packed_rows(t: int) -> tuple[np.ndarray, np.ndarray]:
    """Row 0: two packed sequences then padding; row 1: one sequence over the whole row."""
    seg = np.zeros((2, t), np.int32)
    pos = np.zeros((2, t), np.int32)
    a, b = t // 3, t // 3 + t // 2
    seg[0, :a], pos[0, :a] = 1, np.arange(a)
    seg[0, a:b], pos[0, a:b] = 2, np.arange(b - a)
    seg[1], pos[1] = 1, np.arange(t)
    return seg, pos


@pytest.mark.parametrize("t,block,hq,hkv", [(37, 8, 6, 2), (32, 16, 4, 4), (20, 64, 9, 3)])
def test_query_blocks_match_the_numpy_formula_on_packed_rows_with_padding(t, block, hq, hkv):
    q, k, v = random_qkv(t, 2, t, t, hq, hkv, 16)
    seg, pos = _packed_rows(t)
    visible = (
        (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
        & (pos[:, None, :] <= pos[:, :, None]) & (np.arange(t)[None, None, :] <= np.arange(t)[None, :, None])
    )
    want, _ = numpy_attention(q, k, v, visible, 1.0 / np.sqrt(16))
    mask = attention_mask(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(seg))
    mask &= jnp.tril(jnp.ones((t, t), bool))[None]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    whole = xla_attention(q, kt, vt, mask)
    blocked = xla_attention(q, kt, vt, mask, query_block=block)
    assert scaled_err(whole, want) < 1e-5
    assert scaled_err(blocked, want) < 1e-5
    assert np.all(np.asarray(blocked)[0, (t // 3 + t // 2):] == 0.0)  # padding rows see nothing


def test_query_blocks_give_the_gradients_of_the_whole_form():
    t = 24
    q, k, v = random_qkv(3, 2, t, t, 6, 2, 8)
    seg, pos = _packed_rows(t)
    mask = attention_mask(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(seg))
    mask &= jnp.tril(jnp.ones((t, t), bool))[None]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    loss = lambda block: jax.grad(lambda *x: jnp.sum(jnp.sin(xla_attention(*x, mask, query_block=block))), argnums=(0, 1, 2))
    for g_blocked, g_whole in zip(loss(8)(q, kt, vt), loss(0)(q, kt, vt)):
        assert scaled_err(g_blocked, g_whole) < 1e-5


def test_query_blocks_refuse_cross_attention():
    q, k, v = random_qkv(0, 1, 8, 12, 2, 2, 8)
    with pytest.raises(ValueError, match="S == T"):
        xla_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), jnp.ones((1, 8, 12), bool), query_block=4)
