"""The references the Pallas kernels are tested against: their masks, and the project's one XLA
attention (`attention_kernels.xla_attention`) computed in float32 at ``HIGHEST`` precision.

Shapes: ``B`` batch, ``T`` queries, ``S`` keys, ``Hq`` query heads, ``Hkv`` key/value heads
(``G = Hq // Hkv`` query heads share one KV head), ``D`` head dim.

Mask semantics (shared by every kernel in this package and by ``models/llama.py``):

- ``segment_ids``: query ``i`` sees key ``j`` only if ``q_seg[i] == kv_seg[j]`` and
  ``q_seg[i] != 0`` (segment 0 is padding and attends to nothing);
- ``causal`` without ``positions``: key index ``j <= i`` (aligned at index 0, also when ``T != S``);
- ``positions = (q_pos [B, T], kv_pos [B, S])``: a key with a negative position is never seen (an
  empty KV-cache slot), and ``causal`` compares positions, ``kv_pos[j] <= q_pos[i]``.

A query row that sees no key at all returns output ``0`` and log-sum-exp ``-inf``: the same zeros
the model's XLA path returns for padding rows, and no NaN in values or gradients.

Everything is computed in float32 with ``HIGHEST`` matmul precision, whatever the input dtype.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from attention_kernels.xla_attention import grouped_attention

Array = jax.Array
SegmentIds = Union[Array, Sequence[Array], None]
_HI = jax.lax.Precision.HIGHEST


def split_segment_ids(segment_ids: SegmentIds, t: int, s: int) -> tuple[Optional[Array], Optional[Array]]:
    """``[B, T]`` (self-attention, needs ``T == S``) or a ``(q_seg, kv_seg)`` pair -> the pair."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        if t != s:
            raise ValueError(f"one segment_ids array needs T == S (got T={t}, S={s}); pass (q_seg, kv_seg)")
        q_seg = kv_seg = segment_ids
    q_seg, kv_seg = jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)
    if q_seg.shape[1] != t or kv_seg.shape[1] != s:
        raise ValueError(f"segment ids {q_seg.shape}, {kv_seg.shape} do not match T={t}, S={s}")
    return q_seg, kv_seg


def attention_mask(
    batch: int,
    t: int,
    s: int,
    *,
    causal: bool,
    segment_ids: SegmentIds = None,
    positions: Optional[Sequence[Array]] = None,
) -> Array:
    """``[B, T, S]`` boolean: which key each query sees (module docstring)."""
    if positions is not None:
        q_pos, kv_pos = (jnp.asarray(p, jnp.int32) for p in positions)
        mask = jnp.broadcast_to(kv_pos[:, None, :] >= 0, (batch, t, s))
        if causal:
            mask &= kv_pos[:, None, :] <= q_pos[:, :, None]
    else:
        mask = jnp.ones((batch, t, s), bool)
        if causal:
            mask &= jnp.arange(s)[None, None, :] <= jnp.arange(t)[None, :, None]
    q_seg, kv_seg = split_segment_ids(segment_ids, t, s)
    if q_seg is not None:
        mask &= (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    return mask


def masked_attention(q: Array, k: Array, v: Array, mask_bts: Array, sm_scale: Optional[float] = None) -> tuple[Array, Array]:
    """q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]`` -> (out ``[B, T, Hq, D]`` f32, lse ``[B, Hq, T]`` f32):
    the project's one XLA attention (`attention_kernels.xla_attention`) in float32 at ``HIGHEST``."""
    f32 = jnp.float32
    out, lse = grouped_attention(q.astype(f32), k.astype(f32).transpose(0, 2, 1, 3), v.astype(f32).transpose(0, 2, 1, 3),
                                 mask_bts, return_lse=True, sm_scale=sm_scale, precision=_HI)
    return out, lse.transpose(0, 2, 1)


# Same keyword arguments as ``flash_attention`` (without its tuning knobs): tests call both alike.
def attention_reference(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = True,
    segment_ids: SegmentIds = None,
    positions: Optional[Sequence[Array]] = None,
    sm_scale: Optional[float] = None,
) -> tuple[Array, Array]:
    """The reference of ``flash_attention``: (out ``[B, T, Hq, D]`` f32, lse ``[B, Hq, T]`` f32)."""
    b, t = q.shape[:2]
    mask = attention_mask(b, t, k.shape[1], causal=causal, segment_ids=segment_ids, positions=positions)
    return masked_attention(q, k, v, mask, sm_scale)


def decode_mask(
    batch: int,
    s: int,
    *,
    lengths: Optional[Array] = None,
    pos: Optional[Array] = None,
    query_pos: Optional[Array] = None,
) -> Array:
    """``[B, S]`` boolean: slot ``j`` is seen if ``j < lengths[b]``, ``pos[b, j] >= 0`` and
    ``pos[b, j] <= query_pos[b]`` (each condition only when its array is given)."""
    valid = jnp.ones((batch, s), bool)
    if lengths is not None:
        valid &= jnp.arange(s)[None, :] < jnp.asarray(lengths, jnp.int32)[:, None]
    if pos is not None:
        pos = jnp.asarray(pos, jnp.int32)
        valid &= pos >= 0
        if query_pos is not None:
            valid &= pos <= jnp.asarray(query_pos, jnp.int32)[:, None]
    elif query_pos is not None:
        raise ValueError("query_pos needs pos (the position held by each cache slot)")
    return valid


# Same keyword arguments as ``decode_attention`` (without its tuning knobs): tests call both alike.
def decode_reference(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    *,
    lengths: Optional[Array] = None,
    pos: Optional[Array] = None,
    query_pos: Optional[Array] = None,
    sm_scale: Optional[float] = None,
) -> tuple[Array, Array]:
    """The reference of ``decode_attention``: q ``[B, Hq, D]``, caches ``[B, Hkv, S, D]`` ->
    (out ``[B, Hq, D]`` f32, lse ``[B, Hq]`` f32)."""
    b, s = k_cache.shape[0], k_cache.shape[2]
    valid = decode_mask(b, s, lengths=lengths, pos=pos, query_pos=query_pos)
    out, lse = masked_attention(
        q[:, None], k_cache.transpose(0, 2, 1, 3), v_cache.transpose(0, 2, 1, 3), valid[:, None, :], sm_scale
    )
    return out[:, 0], lse[:, :, 0]
