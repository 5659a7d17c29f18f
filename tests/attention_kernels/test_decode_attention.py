"""decode_attention against the float32 reference: lengths, slot positions, GQA, split-K."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_kernels.decode_attention import combine_splits, decode_attention
from attention_kernels.reference import decode_reference
from tests.attention_kernels.common import MODES, scaled_err

S = 96  # 6 key blocks of 16


def _cache(seed, b, hq, hkv, d, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
                 for shape in ((b, hq, d), (b, hkv, S, d), (b, hkv, S, d)))


def _masks():
    slot = np.arange(S)
    pos = jnp.asarray(np.stack([np.where(slot < 50, slot, -1),                      # prompt of 50, rest empty
                                np.where((slot < 90) & ((slot < 20) | (slot >= 40)), slot, -1),  # a hole of 20
                                np.full(S, -1)]), jnp.int32)                        # nothing written yet
    return {
        "lengths": dict(lengths=jnp.asarray([0, 37, 96])),
        "pos": dict(pos=pos),
        "pos_query_pos_lengths": dict(pos=pos, query_pos=jnp.asarray([30, 70, 5]), lengths=jnp.asarray([96, 80, 96])),
    }


CASES = [  # (query heads, kv heads, mask, split-K chunks)
    pytest.param(2, 2, "lengths", 3, id="gqa1-lengths-3splits"),
    pytest.param(6, 2, "pos", 2, id="gqa3-pos-2splits"),
    pytest.param(8, 1, "pos_query_pos_lengths", 1, id="gqa8-all-masks-1split"),
]


def _block(backend, interpret):
    return 128 if (backend == "tpu" and not interpret) else 16


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hq, hkv, mask, splits", CASES)
def test_fp32_decode_matches_reference(mode, hq, hkv, mask, splits):
    backend, interpret = mode
    q, k, v = _cache(0, 3, hq, hkv, 64)
    kw = _masks()[mask]
    out, lse = jax.jit(lambda q, k, v: decode_attention(
        q, k, v, **kw, block_kv=_block(backend, interpret), num_splits=splits, interpret=interpret,
        backend=backend, return_lse=True))(q, k, v)
    ref, ref_lse = decode_reference(q, k, v, **kw)
    assert scaled_err(out, ref) < 1e-5
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert scaled_err(jnp.where(jnp.isfinite(lse), lse, 0), jnp.where(jnp.isfinite(ref_lse), ref_lse, 0)) < 1e-5
    empty = ~np.asarray(jnp.isfinite(ref_lse)).any(-1)  # sequences that see no slot
    assert np.all(np.asarray(out)[empty] == 0)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_decode_head_dim_128_under_vmap(mode):
    backend, interpret = mode
    q, k, v = _cache(1, 2, 8, 2, 128, jnp.bfloat16)
    lengths = jnp.asarray([[5, 96], [60, 17]])
    qs, ks, vs = (jnp.stack([x, x[::-1]]) for x in (q, k, v))  # a vmapped axis of 2
    run = lambda q, k, v, n: decode_attention(q, k, v, lengths=n, block_kv=_block(backend, interpret), num_splits=2,
                                              interpret=interpret, backend=backend)
    out = jax.jit(jax.vmap(run))(qs, ks, vs, lengths)
    ref = jax.jit(jax.vmap(lambda q, k, v, n: decode_reference(q, k, v, lengths=n)[0]))(qs, ks, vs, lengths)
    assert out.dtype == jnp.bfloat16
    assert scaled_err(out, ref) < 3e-3


def test_combining_splits_equals_one_softmax_and_keeps_empty_rows_empty():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, 1, 3, 2, 4))  # [B, K, P=3 chunks, G=2, 4 keys per chunk]
    values = rng.standard_normal((1, 1, 3, 2, 4, 5))
    logits[0, 0, 1] = -np.inf  # chunk 1 saw nothing
    lse_p = np.logaddexp.reduce(logits, axis=-1)
    with np.errstate(invalid="ignore"):  # the empty chunk: -inf - -inf, zeroed below
        out_p = np.nan_to_num(np.einsum("bkpgs,bkpgsd->bkpgd", np.exp(logits - lse_p[..., None]), values))
    out, lse = combine_splits(jnp.asarray(out_p), jnp.asarray(lse_p))
    flat = logits.transpose(0, 1, 3, 2, 4).reshape(1, 1, 2, 12)
    w = np.exp(flat - np.logaddexp.reduce(flat, axis=-1, keepdims=True))
    want = np.einsum("bkgs,bkgsd->bkgd", np.nan_to_num(w), values.transpose(0, 1, 3, 2, 4, 5).reshape(1, 1, 2, 12, 5))
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_allclose(lse, np.logaddexp.reduce(flat, axis=-1), atol=1e-6)
    out0, lse0 = combine_splits(jnp.zeros((1, 1, 2, 1, 3)), jnp.full((1, 1, 2, 1), -jnp.inf))
    assert np.all(np.asarray(out0) == 0) and np.all(np.isneginf(np.asarray(lse0)))
