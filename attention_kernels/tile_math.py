"""Per-tile attention math shared by the TPU and GPU kernels (values in, values out; no refs).

Shapes inside a tile: ``q [bq, D]``, ``k``/``v [bk, D]``, scores ``[bq, bk]``, row statistics
``[bq, 1]``. Softmax statistics are float32; matmuls take the input dtype and accumulate in
float32 (``HIGHEST`` precision for float32 inputs, so fp32 results match the reference to ~1e-6).

Masked scores are ``-inf``; a row that has seen no key keeps running max ``-inf`` and sum ``0``,
and ``_safe_max`` keeps ``exp`` from producing ``inf - inf``. The backward pass receives the
log-sum-exp with ``-inf`` (row saw nothing) replaced by ``+inf``, which makes every probability of
that row exactly 0.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

NEG_INF = float("-inf")
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def precision_for(dtype) -> lax.Precision:
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def dot_nt(a, b, precision):
    return lax.dot_general(a, b, _NT, precision=precision, preferred_element_type=jnp.float32)


def dot_nn(a, b, precision):
    return lax.dot_general(a, b, _NN, precision=precision, preferred_element_type=jnp.float32)


def tile_mask(shape, *, causal, row0=0, col0=0, kv_len=None, q_seg=None, kv_seg=None, q_pos=None, kv_pos=None):
    """bool ``shape = (bq, bk)`` or ``None`` (nothing to mask). Query-side arrays are ``[bq, 1]``,
    key-side ``[1, bk]``; ``row0``/``col0`` offset the index iotas; ``kv_len`` masks key indices at
    or beyond the unpadded length (index mode only)."""
    mask = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if q_pos is not None:
        kp = jnp.broadcast_to(kv_pos, shape)
        mask = kp >= 0
        if causal:
            mask = both(mask, kp <= jnp.broadcast_to(q_pos, shape))
    elif causal or kv_len is not None:
        cols = col0 + lax.broadcasted_iota(jnp.int32, shape, 1)
        if causal:
            mask = cols <= row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
        if kv_len is not None:
            mask = both(mask, cols < kv_len)
    if q_seg is not None:
        qs = jnp.broadcast_to(q_seg, shape)
        mask = both(mask, jnp.logical_and(qs == jnp.broadcast_to(kv_seg, shape), qs != 0))
    return mask


def masked_scores(q, k, scale, mask, precision):
    s = dot_nt(q, k, precision) * scale
    return s if mask is None else jnp.where(mask, s, NEG_INF)


def _safe_max(m):
    return jnp.where(m == NEG_INF, 0.0, m)


def online_softmax_step(s, v, m_prev, l_prev, acc_prev, precision):
    """One key tile of the streaming softmax: returns the new (max, sum, unnormalised output)."""
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_use = _safe_max(m_new)
    alpha = jnp.exp(m_prev - m_use)
    p = jnp.exp(s - m_use)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc_prev + dot_nn(p.astype(v.dtype), v, precision)
    return m_new, l_new, acc_new


def finalize(m, l, acc):
    """(output ``[bq, D]`` f32, lse ``[bq, 1]``): 0 and ``-inf`` for rows that saw no key."""
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    return acc / l_safe, jnp.where(empty, NEG_INF, m + jnp.log(l_safe))


def backward_tile(q, k, v, do, lse, delta, scale, mask, precision):
    """(p, ds) of one tile, ``ds = p * (dO v^T - delta)`` without the softmax scale.

    ``lse``/``delta`` are ``[bq, 1]``; ``delta = rowsum(dO * O) - dlse``.
    """
    p = jnp.exp(masked_scores(q, k, scale, mask, precision) - lse)
    dp = dot_nt(do, v, precision)
    return p, p * (dp - delta)


def accumulate_dkv(p, ds, q, do, dk, dv, precision):
    dv = dv + dot_nn(p.T.astype(do.dtype), do, precision)
    dk = dk + dot_nn(ds.T.astype(q.dtype), q, precision)
    return dk, dv


def accumulate_dq(ds, k, dq, precision):
    return dq + dot_nn(ds.astype(k.dtype), k, precision)


def split_refs(refs, has_seg, has_pos):
    """(q_seg, kv_seg), (q_pos, kv_pos), rest: the optional id refs sit after the dense inputs."""
    seg, pos = (None, None), (None, None)
    if has_seg:
        seg, refs = refs[:2], refs[2:]
    if has_pos:
        pos, refs = refs[:2], refs[2:]
    return seg, pos, refs
