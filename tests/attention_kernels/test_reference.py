"""The jnp references against an independent numpy formula, and the fully-masked-row contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_kernels.reference import attention_reference, decode_reference


def numpy_attention(q, k, v, visible, scale):
    """Per (batch, head, query) loop in float64: softmax over the visible keys, 0 / -inf if none."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    out = np.zeros((b, t, hq, d))
    lse = np.full((b, hq, t), -np.inf)
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                keys = np.nonzero(visible[bi, i])[0]
                if keys.size == 0:
                    continue
                logits = k[bi, keys, h // group] @ q[bi, i, h] * scale
                w = np.exp(logits - logits.max())
                out[bi, i, h] = (w / w.sum()) @ v[bi, keys, h // group]
                lse[bi, h, i] = logits.max() + np.log(w.sum())
    return out, lse


def _inputs(t, s, hq, hkv, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, t, hq, d)), rng.standard_normal((2, s, hkv, d)), rng.standard_normal((2, s, hkv, d)))


def _visible(t, s, *, causal, seg=None, q_pos=None, kv_pos=None):
    vis = np.ones((2, t, s), bool)
    if q_pos is not None:
        vis &= kv_pos[:, None, :] >= 0
        if causal:
            vis &= kv_pos[:, None, :] <= q_pos[:, :, None]
    elif causal:
        vis &= np.arange(s)[None, None, :] <= np.arange(t)[None, :, None]
    if seg is not None:
        qs, ks = seg
        vis &= (qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] != 0)
    return vis


@pytest.mark.parametrize("causal", [True, False])
def test_reference_equals_numpy_softmax_with_segments_and_gqa(causal):
    q, k, v = _inputs(9, 9, hq=6, hkv=2)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5, 5]], np.int32)
    out, lse = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal, segment_ids=jnp.asarray(seg))
    want_out, want_lse = numpy_attention(q, k, v, _visible(9, 9, causal=causal, seg=(seg, seg)), 1 / np.sqrt(8))
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    np.testing.assert_allclose(np.where(np.isinf(want_lse), 0, lse), np.where(np.isinf(want_lse), 0, want_lse), atol=1e-5)


def test_reference_with_positions_equals_numpy_for_cache_prefill():
    # 4 new tokens at positions 5..8 against 7 slots: 5 filled (one empty, -1), then the new ones.
    q, k, v = _inputs(4, 7, hq=3, hkv=1)
    q_pos = np.array([[5, 6, 7, 8], [2, 3, 4, 5]], np.int32)
    kv_pos = np.array([[0, 1, -1, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, -1]], np.int32)
    out, lse = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True,
                                   positions=(jnp.asarray(q_pos), jnp.asarray(kv_pos)), sm_scale=0.3)
    want_out, want_lse = numpy_attention(q, k, v, _visible(4, 7, causal=True, q_pos=q_pos, kv_pos=kv_pos), 0.3)
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)


def test_fully_masked_rows_give_zero_output_neg_inf_lse_and_zero_finite_gradients():
    q, k, v = (jnp.asarray(x, jnp.float32) for x in _inputs(5, 5, hq=2, hkv=2))
    seg = jnp.asarray([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], jnp.int32)
    out, lse = attention_reference(q, k, v, segment_ids=seg)
    assert np.all(np.asarray(out)[0, 2:] == 0) and np.all(np.asarray(out)[1] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[0, :, 2:])) and np.all(np.isneginf(np.asarray(lse)[1]))

    def loss(q, k, v):
        o, l = attention_reference(q, k, v, segment_ids=seg)
        return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0))

    dq, dk, dv = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(dq)[0, 2:] == 0) and np.all(np.asarray(dq)[1] == 0)


def test_decode_reference_equals_numpy_with_lengths_pos_and_query_pos():
    rng = np.random.default_rng(3)
    b, hq, hkv, s, d = 3, 4, 2, 6, 8
    q = rng.standard_normal((b, hq, d))
    k, v = rng.standard_normal((b, hkv, s, d)), rng.standard_normal((b, hkv, s, d))
    lengths = np.array([6, 3, 0])
    pos = np.array([[0, 1, 2, -1, 4, 5], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]], np.int32)
    query_pos = np.array([4, 9, 9], np.int32)
    out, lse = decode_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), lengths=jnp.asarray(lengths),
                                pos=jnp.asarray(pos), query_pos=jnp.asarray(query_pos))
    visible = (np.arange(s)[None] < lengths[:, None]) & (pos >= 0) & (pos <= query_pos[:, None])
    want_out, want_lse = numpy_attention(q[:, None], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                         visible[:, None, :], 1 / np.sqrt(d))
    np.testing.assert_allclose(out, want_out[:, 0], atol=1e-5)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse[:, :, 0]))
    assert np.all(np.asarray(out)[2] == 0)  # length 0: nothing to attend
