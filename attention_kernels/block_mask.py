"""Which (query block, key block) tiles to compute, from per-block minima and maxima.

A tile is ``SKIP`` when no query of the block can see any key of the block, ``FULL`` when every
query sees every key (the kernel then builds no element mask), ``PARTIAL`` otherwise. The tests
are sufficient conditions on block statistics, so a tile marked ``PARTIAL`` may still turn out
empty; it is then computed under its element mask, which is always exact.

- keys: a block whose key positions are all negative (empty cache slots, padding) is skipped;
- causal: skipped if the smallest valid key position exceeds the largest query position, full if
  the largest key position is at most the smallest query position;
- segments (statistics over non-zero ids, since id 0 neither sees nor is seen): skipped if either
  block is all padding or their id ranges do not overlap, full if both blocks hold one and the
  same non-zero id and no padding.

Packed batches whose segment ids grow along the sequence give tight ranges, so the cost of many
short segments is linear in their total length instead of quadratic.

The kernels read the states in two forms: TPU kernels get them through scalar prefetch, packed
with the key block to DMA at each grid step (``pack_fetch``: a skipped step names the block
already in VMEM, so it costs neither compute nor a copy); GPU kernels get the ``[lo, hi)`` range of
non-skipped blocks per row (``row_ranges``) and branch on the state inside that range.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

SKIP, PARTIAL, FULL = 0, 1, 2
_BIG = jnp.iinfo(jnp.int32).max
_SMALL = jnp.iinfo(jnp.int32).min


def _blocks(x: Array, block: int) -> Array:
    b, n = x.shape
    return x.reshape(b, n // block, block)


def _segment_stats(seg_blocks: Array):
    """Per block: any non-zero id, all ids non-zero, min and max of the non-zero ids."""
    nz = seg_blocks != 0
    lo = jnp.min(jnp.where(nz, seg_blocks, _BIG), -1)
    hi = jnp.max(jnp.where(nz, seg_blocks, _SMALL), -1)
    return jnp.any(nz, -1), jnp.all(nz, -1), lo, hi


def block_states(
    q_pos: Array,
    kv_pos: Array,
    q_seg: Optional[Array],
    kv_seg: Optional[Array],
    *,
    causal: bool,
    block_q: int,
    block_kv: int,
) -> Array:
    """int32 ``[B, T // block_q, S // block_kv]`` of ``SKIP``/``PARTIAL``/``FULL``.

    ``q_pos [B, T]``/``kv_pos [B, S]``: positions (indices when the caller has none; ``-1`` marks a
    key that nobody sees); ``q_seg``/``kv_seg``: segment ids or ``None``. Lengths are multiples of
    the block sizes.
    """
    qp, kp = _blocks(q_pos, block_q), _blocks(kv_pos, block_kv)
    k_valid = kp >= 0
    skip = ~jnp.any(k_valid, -1)[:, None, :]
    full = jnp.all(k_valid, -1)[:, None, :]
    if causal:
        k_min = jnp.min(jnp.where(k_valid, kp, _BIG), -1)
        k_max = jnp.max(jnp.where(k_valid, kp, _SMALL), -1)
        skip |= k_min[:, None, :] > jnp.max(qp, -1)[:, :, None]
        full &= k_max[:, None, :] <= jnp.min(qp, -1)[:, :, None]
    if q_seg is not None:  # id ranges over non-zero ids only: segment 0 never sees nor is seen
        q_live, q_dense, q_min, q_max = _segment_stats(_blocks(q_seg, block_q))
        k_live, k_dense, k_min, k_max = _segment_stats(_blocks(kv_seg, block_kv))
        q_live, q_dense, q_min, q_max = (x[:, :, None] for x in (q_live, q_dense, q_min, q_max))
        k_live, k_dense, k_min, k_max = (x[:, None, :] for x in (k_live, k_dense, k_min, k_max))
        skip |= ~q_live | ~k_live | (k_min > q_max) | (k_max < q_min)
        full &= q_dense & k_dense & (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
    states = jnp.where(skip, SKIP, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)
    return jnp.broadcast_to(states, (qp.shape[0], qp.shape[1], kp.shape[1]))


def fetch_indices(states: Array) -> Array:
    """For each tile along the last axis, the key block a TPU kernel should have in VMEM.

    A computed tile names itself; a skipped one names the last computed block before it in its
    row (already resident: no copy), or, at the start of a row, the first one after it (an early
    prefetch).
    """
    n = states.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    live = states != SKIP
    prev = jax.lax.cummax(jnp.where(live, idx, -1), axis=states.ndim - 1)
    nxt = jax.lax.cummin(jnp.where(live, idx, n), axis=states.ndim - 1, reverse=True)
    return jnp.where(prev >= 0, prev, jnp.where(nxt < n, nxt, 0)).astype(jnp.int32)


def pack_fetch(states: Array) -> Array:
    """``fetch_index * 4 + state``: one int32 per tile, so scalar prefetch uses one SMEM array."""
    return fetch_indices(states) * 4 + states


def unpack_state(code):
    return code & 3


def unpack_fetch(code):
    return code >> 2


def row_ranges(states: Array) -> Array:
    """int32 ``[..., 2]``: ``[lo, hi)`` of the non-skipped tiles along the last axis (``[0, 0)`` if none)."""
    n = states.shape[-1]
    live = states != SKIP
    any_live = jnp.any(live, -1)
    lo = jnp.argmax(live, -1)
    hi = n - jnp.argmax(live[..., ::-1], -1)
    return jnp.stack([jnp.where(any_live, lo, 0), jnp.where(any_live, hi, 0)], -1).astype(jnp.int32)
