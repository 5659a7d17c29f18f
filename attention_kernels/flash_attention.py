"""Flash attention in Pallas with native GQA, packed segments, block skipping and a custom VJP.

``flash_attention(q [B, T, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, D]) -> out [B, T, Hq, D]``
(and ``lse [B, Hq, T]`` float32 with ``return_lse=True``). The mask rules and the result of a
fully masked query row (output 0, lse ``-inf``, zero gradients) are those of
``attention_kernels/reference.py``; segment id 0 is padding.

Design:

- Block skipping: before each kernel, ``block_mask.block_states`` reduces the segment ids and
  positions of every (query block, key block) tile to SKIP / PARTIAL / FULL from per-block
  minima and maxima (a few ``[B, T/bq, S/bk]`` int32 ops in XLA). PARTIAL tiles build the element
  mask, FULL tiles skip it, SKIP tiles do nothing: on TPU the states reach the kernel by scalar
  prefetch and also steer the K/V index maps (no DMA for a skipped tile); on GPU each program
  loops only over its row's ``[first, last]`` live tiles. Causal masking, padding and packed
  batches of short segments therefore cost work proportional to the visible tiles.
- GQA without repeating K/V: the forward and dQ kernels index kv head ``h // G`` in their
  BlockSpec index maps; the dK/dV kernels run per kv head and accumulate over its ``G`` query heads.
- Backward: dQ and dK/dV are two kernels (no atomics, deterministic). ``delta = rowsum(dO * O)``
  is one fused XLA reduction; a cotangent on the returned lse is folded in as
  ``delta - dlse``, so ``return_lse=True`` is differentiable too.
- Lengths that are not multiples of the block sizes are padded (key padding is masked by
  position -1, by segment 0 or by a static length bound).

Lowering (``backend``): ``"tpu"`` is Mosaic TPU (``attention_kernels/flash_tpu.py``). ``"gpu"`` is Triton
(``attention_kernels/flash_gpu.py``), chosen over Mosaic GPU for JAX 0.10 because (1) Triton takes the same
``pl.pallas_call`` grid/BlockSpec kernels as the TPU path, while ``pallas_call`` for Mosaic GPU is
deprecated in 0.10 in favour of ``plgpu.kernel`` with warpgroup-level pipelining, a separate
program to maintain; (2) Mosaic GPU targets Hopper/Blackwell only and the Triton path runs on
Ampere (A100, L4) as well as H100; (3) the ops the kernels need (``fori_loop`` with dynamic
bounds, ``lax.switch``, scalar loads) all lower in Triton. Triton is deprecated from JAX 0.11 on:
a Mosaic GPU port plugs in behind ``attention_kernels/compat.py`` and the ``backend`` switch, and
``attention_kernels/dispatch.py`` can fall back to XLA. Default block sizes are untuned starting points
(``benchmarks/attention.py`` measures them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from attention_kernels import compat, flash_gpu, flash_tpu
from attention_kernels.block_mask import block_states
from attention_kernels.reference import SegmentIds, split_segment_ids

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query/key block sizes of the forward and of both backward kernels (``None``: backend default)."""

    block_q: Optional[int] = None
    block_kv: Optional[int] = None
    block_q_bwd: Optional[int] = None
    block_kv_bwd: Optional[int] = None


DEFAULT_BLOCKS = {"tpu": BlockSizes(512, 512, 256, 512), "gpu": BlockSizes(128, 64, 64, 64)}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call (hashable: it is a ``nondiff_argnums`` of the VJP)."""

    backend: str
    interpret: bool
    causal: bool
    scale: float
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    kv_len: Optional[int]  # unpadded key count, masked in index mode when keys were padded


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def choose_block(requested: int, length: int, backend: str, is_q: bool) -> int:
    """A legal block for ``length`` tokens: one that divides it when one exists down to a quarter
    of ``requested`` (no padding copy), else ``requested`` capped at the aligned length.

    TPU: multiples of 128, for keys (lanes of the score tile) and for queries too (the backward
    pass transposes ``[bq, bk]`` tiles, which puts ``bq`` on lanes). GPU: powers of two from 16
    (``tl.dot``)."""
    if backend == "tpu":
        align = 128
        cap = min(requested, _round_up(length, align))
        candidates = range(cap - cap % align, max(align, requested // 4) - 1, -align)
    else:
        cap = min(requested, max(16, 1 << max(length - 1, 0).bit_length()))
        candidates = [c for c in (cap >> i for i in range(8)) if c >= max(16, requested // 4)]
    for c in candidates:
        if c > 0 and length % c == 0:
            return c
    return cap


def _validate(plan: _Plan, t_pad: int, s_pad: int) -> None:
    if plan.interpret:
        return
    for name, bq, bk in (("forward", plan.block_q, plan.block_kv), ("backward", plan.block_q_bwd, plan.block_kv_bwd)):
        q_align = 8 if name == "forward" else 128
        if plan.backend == "tpu" and ((bq % q_align and bq != t_pad) or (bk % 128 and bk != s_pad)):
            raise ValueError(f"TPU {name} blocks ({bq}, {bk}): block_q must be a multiple of {q_align}, "
                             "block_kv of 128 (or the whole padded length)")
        if plan.backend == "gpu" and any(x < 16 or x & (x - 1) for x in (bq, bk)):
            raise ValueError(f"GPU {name} blocks ({bq}, {bk}) must be powers of two >= 16")


def _make_plan(t, s, d, *, causal, sm_scale, block_sizes, backend, interpret, has_pos) -> _Plan:
    req = DEFAULT_BLOCKS[backend]
    if block_sizes is not None:
        req = BlockSizes(*(getattr(block_sizes, f.name) or getattr(req, f.name) for f in dataclasses.fields(BlockSizes)))
    bq, bqb = choose_block(req.block_q, t, backend, True), choose_block(req.block_q_bwd, t, backend, True)
    bk, bkb = choose_block(req.block_kv, s, backend, False), choose_block(req.block_kv_bwd, s, backend, False)
    s_pad = _round_up(s, math.lcm(bk, bkb))
    return _Plan(
        backend=backend, interpret=interpret, causal=causal,
        scale=float(1.0 / math.sqrt(d) if sm_scale is None else sm_scale),
        block_q=bq, block_kv=bk, block_q_bwd=bqb, block_kv_bwd=bkb,
        kv_len=s if (s_pad != s and not has_pos) else None,
    )


def _driver(plan: _Plan):
    return flash_tpu if plan.backend == "tpu" else flash_gpu


def _states(plan, q_seg, kv_seg, q_pos, kv_pos, b, t_pad, s_pad, bq, bk):
    if q_pos is None:  # index mode: positions are indices, padded keys are invisible
        q_pos = jnp.broadcast_to(jnp.arange(t_pad, dtype=jnp.int32), (b, t_pad))
        idx = jnp.arange(s_pad, dtype=jnp.int32)
        kv_pos = jnp.broadcast_to(jnp.where(idx < (plan.kv_len or s_pad), idx, -1), (b, s_pad))
    return block_states(q_pos, kv_pos, q_seg, kv_seg, causal=plan.causal, block_q=bq, block_kv=bk)


def _kernel_kwargs(plan, bq, bk):
    return dict(causal=plan.causal, scale=plan.scale, block_q=bq, block_kv=bk, kv_len=plan.kv_len, interpret=plan.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    return _flash_fwd(plan, q, k, v, q_seg, kv_seg, q_pos, kv_pos)[0]


def _flash_fwd(plan, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    b, _, t_pad, _ = q.shape
    states = _states(plan, q_seg, kv_seg, q_pos, kv_pos, b, t_pad, k.shape[2], plan.block_q, plan.block_kv)
    out, lse = _driver(plan).forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, states, **_kernel_kwargs(plan, plan.block_q, plan.block_kv))
    return (out, lse), (q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse)


def _flash_bwd(plan, res, cts):
    q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse = res
    d_out, d_lse = cts
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1) - d_lse
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # rows that saw no key: every p is exactly 0
    b, _, t_pad, _ = q.shape
    bq, bk = plan.block_q_bwd, plan.block_kv_bwd
    states = _states(plan, q_seg, kv_seg, q_pos, kv_pos, b, t_pad, k.shape[2], bq, bk)
    drv, kw = _driver(plan), _kernel_kwargs(plan, bq, bk)
    d_out = d_out.astype(q.dtype)
    dq = drv.backward_dq(q, k, v, d_out, lse, delta, q_seg, kv_seg, q_pos, kv_pos, states, **kw)
    dk, dv = drv.backward_dkv(q, k, v, d_out, lse, delta, q_seg, kv_seg, q_pos, kv_pos, states.transpose(0, 2, 1), **kw)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x: Array, axis: int, size: int, value=0) -> Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def flash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = True,
    segment_ids: SegmentIds = None,
    sm_scale: Optional[float] = None,
    block_sizes: Optional[BlockSizes] = None,
    interpret: Optional[bool] = False,
    return_lse: bool = False,
    positions: Optional[Sequence[Array]] = None,
    backend: Optional[str] = None,
):
    """Attention of ``q [B, T, Hq, D]`` over ``k``/``v [B, S, Hkv, D]`` (``Hq % Hkv == 0``).

    Args:
      causal: key index ``<=`` query index (or key position ``<=`` query position with ``positions``).
      segment_ids: int32 ``[B, T]`` (needs ``T == S``) or ``(q_seg [B, T], kv_seg [B, S])``; equal
        non-zero ids attend, 0 is padding.
      sm_scale: softmax scale, default ``1/sqrt(D)``.
      block_sizes: ``BlockSizes``; unset fields take the backend defaults (``DEFAULT_BLOCKS``).
      interpret: run in the Pallas interpreter (CPU); ``None`` = interpret iff no TPU/GPU.
      return_lse: also return the float32 log-sum-exp ``[B, Hq, T]`` (``-inf`` for empty rows).
      positions: optional ``(q_pos [B, T], kv_pos [B, S])`` int32; keys at negative positions are
        never seen, and causality compares positions (packed sequences, KV-cache prefill).
      backend: ``"tpu"`` (Mosaic) or ``"gpu"`` (Triton); default: the device's, ``"tpu"`` on CPU.

    Returns ``out [B, T, Hq, D]`` in ``q.dtype`` (and ``lse`` with ``return_lse``). Differentiable in
    ``q``, ``k``, ``v``.
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if k.shape != (b, s, hkv, d) or v.shape != k.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must be [B, S, Hkv, D] with B={b}, D={d}")
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    backend = compat.resolve_backend(backend)
    interpret = compat.resolve_interpret(interpret)
    compat.check_runnable(backend, interpret)
    plan = _make_plan(t, s, d, causal=causal, sm_scale=sm_scale, block_sizes=block_sizes, backend=backend,
                      interpret=interpret, has_pos=positions is not None)
    t_pad = _round_up(t, math.lcm(plan.block_q, plan.block_q_bwd))
    s_pad = _round_up(s, math.lcm(plan.block_kv, plan.block_kv_bwd))
    _validate(plan, t_pad, s_pad)

    q_seg, kv_seg = split_segment_ids(segment_ids, t, s)
    if q_seg is not None:
        q_seg, kv_seg = _pad_to(q_seg, 1, t_pad), _pad_to(kv_seg, 1, s_pad)
    q_pos = kv_pos = None
    if positions is not None:
        q_pos, kv_pos = (jnp.asarray(p, jnp.int32) for p in positions)
        if q_pos.shape != (b, t) or kv_pos.shape != (b, s):
            raise ValueError(f"positions {q_pos.shape}, {kv_pos.shape} must be [B, T], [B, S]")
        q_pos, kv_pos = _pad_to(q_pos, 1, t_pad, -1), _pad_to(kv_pos, 1, s_pad, -1)

    # Triton tiles need power-of-two head dims; zero columns change neither scores nor outputs.
    d_pad = d if backend == "tpu" else max(16, 1 << (d - 1).bit_length())
    heads_major = lambda x, n: _pad_to(_pad_to(x.transpose(0, 2, 1, 3), 2, n), 3, d_pad)
    out, lse = _flash(plan, heads_major(q, t_pad), heads_major(k, s_pad), heads_major(v, s_pad), q_seg, kv_seg, q_pos, kv_pos)
    out = out[:, :, :t, :d].transpose(0, 2, 1, 3)
    return (out, lse[:, :, :t]) if return_lse else out
