"""`attention_kernels.xla_attention` (the project's one XLA attention) against the numpy formula.

The query-blocked form (self-attention in index order) must give the values of the whole form, on
packed rows with padding, blocks that do not divide the length, and grouped-query heads. The
sampler's form (keys feature-major, a prefix shared by every row in the same softmax, or the prefix
alone with its log-sum-exp) must give attention over the concatenated keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_kernels.dispatch import attention_mask
from attention_kernels.xla_attention import grouped_attention, xla_attention
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


def _with_prefix(t: int, s: int, p: int):
    """Two rows, 6 query heads over 2 KV heads; a shared prefix of ``p`` keys (the last one empty),
    then each row's ``s`` own keys, of which row 1 sees none (a padding row)."""
    q, k, v = random_qkv(5, 2, t, s, 6, 2, 8)
    _, pk, pv = random_qkv(6, 1, 1, p, 6, 2, 8)
    pk, pv = pk[0].transpose(1, 0, 2), pv[0].transpose(1, 0, 2)  # [K, P, H]
    visible = np.arange(p) < p - 1
    mask = np.tril(np.ones((t, s), bool), s - t)[None].repeat(2, 0)
    mask[1] = False
    return q, k, v, pk, pv, visible, mask


@pytest.mark.parametrize("keys_last", [False, True])
def test_a_shared_prefix_joins_each_rows_softmax(keys_last):
    t, s, p = 3, 7, 5
    q, k, v, pk, pv, visible, mask = _with_prefix(t, s, p)
    all_k = np.concatenate([np.broadcast_to(np.asarray(pk).transpose(1, 0, 2)[None], (2, p, 2, 8)), k], axis=1)
    all_v = np.concatenate([np.broadcast_to(np.asarray(pv).transpose(1, 0, 2)[None], (2, p, 2, 8)), v], axis=1)
    all_visible = np.concatenate([np.broadcast_to(visible, (2, t, p)), mask], axis=2)
    want, want_lse = numpy_attention(q, all_k, all_v, all_visible, 1.0 / np.sqrt(8))
    kt = k.transpose(0, 2, 3, 1) if keys_last else k.transpose(0, 2, 1, 3)
    pkt = pk.transpose(0, 2, 1) if keys_last else pk
    prefix = (pkt, pv, jnp.asarray(visible))
    out = grouped_attention(q, kt, v.transpose(0, 2, 1, 3), jnp.asarray(mask), keys_last=keys_last, prefix=prefix)
    assert scaled_err(out, want) < 1e-5
    out, lse = grouped_attention(q, kt, v.transpose(0, 2, 1, 3), jnp.asarray(mask), keys_last=keys_last, prefix=prefix,
                                 return_lse=True)
    assert scaled_err(out, want) < 1e-5
    np.testing.assert_allclose(np.asarray(lse), want_lse.transpose(0, 2, 1), rtol=1e-5)
    # the prefix alone: what the Pallas path merges with the kernels' output over the rows' own keys
    only, only_lse = grouped_attention(q, None, None, None, keys_last=keys_last, prefix=prefix, return_lse=True)
    want, want_lse = numpy_attention(q, all_k[:, :p], all_v[:, :p], np.broadcast_to(visible, (2, t, p)), 1.0 / np.sqrt(8))
    assert scaled_err(only, want) < 1e-5
    np.testing.assert_allclose(np.asarray(only_lse), want_lse.transpose(0, 2, 1), rtol=1e-5)


def test_rows_that_see_nothing_return_zeros_and_minus_infinity():
    q, k, v, pk, pv, visible, mask = _with_prefix(3, 7, 5)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out, lse = grouped_attention(q, kt, vt, jnp.asarray(mask), return_lse=True)
    assert np.all(np.asarray(out)[1] == 0.0) and np.all(np.isneginf(np.asarray(lse)[1]))
    assert np.all(np.asarray(xla_attention(q, kt, vt, jnp.asarray(mask)))[1] == 0.0)
    _, lse = grouped_attention(q, None, None, None, prefix=(pk, pv, jnp.zeros(5, bool)), return_lse=True)
    assert np.all(np.isneginf(np.asarray(lse)))
