"""One entry point for the model's attention: XLA or the Pallas kernels, chosen per backend.

``attention(q_btnh, k_bksh, v_bksh, q_positions=..., kv_positions=..., ...)`` takes the tensors and
mask inputs of ``models.llama.Attention`` (keys and values in the KV-cache layout ``[B, K, S, H]``)
and implements exactly the mask of ``models.llama.attention_mask``:

    query i sees key j  iff  kv_pos[j] >= 0 and kv_pos[j] <= q_pos[i]
                             and, with q_segment_ids, q_seg[i] != 0
                             and, with kv_segment_ids too, q_seg[i] == kv_seg[j]

Fully masked query rows return zeros. ``impl``: ``"xla"`` (einsums, the model's numerics),
``"pallas"`` (``flash_attention``; ``decode_attention`` for one query token against a cache) or
``"auto"`` (Pallas on TPU and GPU, XLA on CPU; ``resolve_impl``). ``interpret=None`` runs Pallas
in the interpreter exactly when there is no accelerator, so ``impl="pallas"`` also works in CPU
tests.

The Pallas path asks only for the tiles the mask can reach: causality by position, padding and
packed segments are skipped block by block (``attention_kernels/block_mask.py``).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from attention_kernels import compat
from attention_kernels.decode_attention import combine_splits, decode_attention
from attention_kernels.flash_attention import BlockSizes, flash_attention
from attention_kernels.xla_attention import grouped_attention, xla_attention

Array = jax.Array
IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str, mesh: Any = None) -> str:
    """``"xla"`` or ``"pallas"``: ``"auto"`` picks Pallas on TPU/GPU and XLA on CPU, by the
    platform of ``mesh``'s devices when given (the target of an ahead-of-time compile), else
    ``compat.platform()``."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        return "pallas" if compat.platform(mesh) in compat.BACKENDS else "xla"
    return impl


def attention_mask(q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None) -> Array:
    """``[B, T, S]`` boolean, the rule in the module docstring."""
    mask = (kv_positions[:, None, :] <= q_positions[:, :, None]) & (kv_positions[:, None, :] >= 0)
    if q_segment_ids is not None:
        mask &= (q_segment_ids != 0)[:, :, None]
        if kv_segment_ids is not None:
            mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask


def attention(
    q_btnh: Array,
    k_bksh: Array,
    v_bksh: Array,
    *,
    q_positions: Array,
    kv_positions: Array,
    q_segment_ids: Optional[Array] = None,
    kv_segment_ids: Optional[Array] = None,
    impl: str = "auto",
    interpret: Optional[bool] = None,
    block_sizes: Optional[BlockSizes] = None,
    return_lse: bool = False,
):
    """Grouped-query attention ``[B, T, N, H]`` with the model's position/segment mask.

    ``k_bksh``/``v_bksh [B, K, S, H]``; ``q_positions [B, T]``, ``kv_positions [B, S]`` (``-1``:
    empty slot); ``q_segment_ids [B, T]`` and ``kv_segment_ids [B, S]`` optional (keys carry no
    segments in the KV-cache path: then only ``q_seg != 0`` applies). ``return_lse``: also return
    the float32 log-sum-exp of each query's scores ``[B, T, N]`` (``-inf`` where nothing is seen),
    which merges this result with attention over other keys (`merge_attention`).
    """
    q_pos = jnp.asarray(q_positions, jnp.int32)
    kv_pos = jnp.asarray(kv_positions, jnp.int32)
    if resolve_impl(impl) == "xla":
        mask = attention_mask(q_pos, kv_pos, q_segment_ids, kv_segment_ids)
        if not return_lse:
            return xla_attention(q_btnh, k_bksh, v_bksh, mask)
        out, lse = grouped_attention(q_btnh, k_bksh, v_bksh, mask, return_lse=True)
        return out.astype(q_btnh.dtype), lse

    b, t = q_btnh.shape[:2]
    if t == 1 and kv_segment_ids is None:  # one sampled token against the cache
        query_pos = q_pos[:, 0]
        if q_segment_ids is not None:
            query_pos = jnp.where(q_segment_ids[:, 0] != 0, query_pos, -1)
        out = decode_attention(q_btnh[:, 0], k_bksh, v_bksh, pos=kv_pos, query_pos=query_pos, interpret=interpret,
                               return_lse=return_lse)
        return (out[0][:, None], out[1][:, None]) if return_lse else out[:, None]

    segments = None
    if q_segment_ids is not None:
        if kv_segment_ids is None:  # cache prefill: live queries see every valid slot
            segments = ((q_segment_ids != 0).astype(jnp.int32), jnp.ones(kv_pos.shape, jnp.int32))
        else:
            segments = (q_segment_ids, kv_segment_ids)
    out = flash_attention(
        q_btnh, k_bksh.transpose(0, 2, 1, 3), v_bksh.transpose(0, 2, 1, 3),
        causal=True, segment_ids=segments, positions=(q_pos, kv_pos),
        block_sizes=block_sizes, interpret=interpret, return_lse=return_lse,
    )
    return (out[0], out[1].transpose(0, 2, 1)) if return_lse else out


def merge_attention(out_a: Array, lse_a: Array, out_b: Array, lse_b: Array) -> Array:
    """Attention over two disjoint sets of keys merged into attention over their union.

    ``out_* [B, T, N, H]`` and ``lse_* [B, T, N]`` (as `attention` returns with ``return_lse``):
    each part is reweighted by its share of the joint softmax normalizer, as the decode kernel's
    split-K partials are (`combine_splits`). Queries that see nothing in either part return zeros.
    The result has ``out_a``'s dtype.
    """
    outs = jnp.stack([out_a.astype(jnp.float32), out_b.astype(jnp.float32)], axis=2)  # [B, T, 2, N, H]
    out, _ = combine_splits(outs, jnp.stack([lse_a, lse_b], axis=2))
    return out.astype(out_a.dtype)


def sharded_attention(
    q_btnh: Array,
    k_bksh: Array,
    v_bksh: Array,
    *,
    mesh: Any,
    batch_axes: Any,
    head_axis: Optional[str],
    q_positions: Array,
    kv_positions: Array,
    q_segment_ids: Optional[Array] = None,
    kv_segment_ids: Optional[Array] = None,
    interpret: Optional[bool] = None,
    block_sizes: Optional[BlockSizes] = None,
    return_lse: bool = False,
):
    """The Pallas path of :func:`attention` on a sharded batch: one kernel call per device.

    A ``pallas_call`` is opaque to the SPMD partitioner (left alone it would gather every operand
    onto each device), so it runs inside ``shard_map``: rows split over ``batch_axes`` (mesh axis
    names, or None), query and KV heads over ``head_axis`` (None when the KV heads do not divide:
    the groups of a grouped-query layer must stay whole on one device).
    """
    target = compat.platform(mesh)  # the mesh's devices decide, not the host's default backend
    interp = target not in compat.BACKENDS if interpret is None else bool(interpret)
    rows = P(batch_axes, None)
    specs = [P(batch_axes, None, head_axis, None), P(batch_axes, head_axis, None, None), P(batch_axes, head_axis, None, None),
             rows, rows]
    args = [q_btnh, k_bksh, v_bksh, jnp.asarray(q_positions, jnp.int32), jnp.asarray(kv_positions, jnp.int32)]
    has_q_seg, has_kv_seg = q_segment_ids is not None, kv_segment_ids is not None
    args += [x for x in (q_segment_ids, kv_segment_ids) if x is not None]
    specs += [rows] * (has_q_seg + has_kv_seg)

    def local(q, k, v, qp, kp, *segs):
        segs = list(segs)
        qs = segs.pop(0) if has_q_seg else None
        ks = segs.pop(0) if has_kv_seg else None
        return attention(q, k, v, q_positions=qp, kv_positions=kp, q_segment_ids=qs, kv_segment_ids=ks,
                         impl="pallas", interpret=interp, block_sizes=block_sizes, return_lse=return_lse)

    out_specs = (specs[0], P(batch_axes, None, head_axis)) if return_lse else specs[0]
    with compat.compiling_for(target):
        return compat.shard_map(local, mesh, tuple(specs), out_specs, interpret=interp)(*args)

