"""Decode attention: one new query token per sequence against the sampler's contiguous KV cache.

``decode_attention(q [B, Hq, D], k_cache [B, Hkv, S, D], v_cache [B, Hkv, S, D]) -> out [B, Hq, D]``
(the layout of ``models.llama.KVCache``), with slot validity from ``lengths [B]`` (slots
``j < lengths[b]``), from ``pos [B, S]`` (``-1`` = empty slot) and ``query_pos [B]``
(``pos <= query_pos``), alone or together; rules and fully masked rows (output 0, lse ``-inf``)
as in ``attention_kernels/reference.py``.

Design (flash-decoding):

- GQA: the ``G`` query heads of a group form the rows of one ``[G, D] x [D, bk]`` tile against
  their shared kv head, so every K/V byte is read once per group, not once per query head. ``G``
  is padded with zero rows to the smallest tile the backend's matmul takes (8 sublanes on TPU,
  16 rows for Triton ``tl.dot``).
- Split-K: the cache is cut into ``num_splits`` contiguous chunks; each (sequence, kv head,
  chunk) computes a partial output and log-sum-exp, and a final XLA step combines them
  (``out = sum_p exp(lse_p - lse) out_p``), so a long cache keeps the whole chip busy at batch 1.
- Skipping: blocks with no visible slot are skipped (states from ``block_mask``; on TPU through
  scalar prefetch, without DMA; on GPU each chunk loops over its live range only), so a short
  sequence in a long cache reads only its own blocks.

Forward only (sampling). The key block is chosen to divide the capacity (``choose_block``); a
capacity with no such block (on TPU: not a multiple of 128) costs a padded copy of the cache per
call.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attention_kernels import compat
from attention_kernels import tile_math as tm
from attention_kernels.block_mask import FULL, PARTIAL, SKIP, pack_fetch, row_ranges, unpack_fetch, unpack_state
from attention_kernels.flash_attention import choose_block

Array = jax.Array
DEFAULT_BLOCK_KV = {"tpu": 512, "gpu": 128}


def _visible_slots(b, s, lengths, pos, query_pos) -> Array:
    """int32 ``[B, S]``: ``>= 0`` where the slot is seen, ``-1`` elsewhere."""
    kpos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if pos is not None:
        kpos = jnp.asarray(pos, jnp.int32)
        if query_pos is not None:
            kpos = jnp.where(kpos <= jnp.asarray(query_pos, jnp.int32)[:, None], kpos, -1)
    elif query_pos is not None:
        raise ValueError("query_pos needs pos (the position held by each cache slot)")
    if lengths is not None:
        kpos = jnp.where(jnp.arange(s)[None, :] < jnp.asarray(lengths, jnp.int32)[:, None], kpos, -1)
    return jnp.where(kpos >= 0, kpos, -1)


def _slot_states(kpos: Array, block_kv: int) -> Array:
    blocks = kpos.reshape(kpos.shape[0], -1, block_kv) >= 0
    return jnp.where(jnp.all(blocks, -1), FULL, jnp.where(jnp.any(blocks, -1), PARTIAL, SKIP)).astype(jnp.int32)


def _tile(q, k, v, kp, carry, *, scale, masked, precision):
    mask = jnp.broadcast_to(kp, (q.shape[0], k.shape[0])) >= 0 if masked else None
    s = tm.masked_scores(q, k, scale, mask, precision)
    return tm.online_softmax_step(s, v, *carry, precision)


# -------------------------------------------------------------------------------------------- TPU


def _tpu_kernel(info_ref, q_ref, k_ref, v_ref, kp_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, per_split, precision):
    b, p, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    state = unpack_state(info_ref[b, p * per_split + i])

    @pl.when(i == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, tm.NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
        carry = (m_sc[...], l_sc[...], acc_sc[...])
        m_sc[...], l_sc[...], acc_sc[...] = _tile(q_ref[...], k_ref[...], v_ref[...], kp_ref[...], carry,
                                                  scale=scale, masked=masked, precision=precision)

    pl.when(state == FULL)(lambda: step(False))
    pl.when(state == PARTIAL)(lambda: step(True))

    @pl.when(i == pl.num_programs(3) - 1)
    def _done():
        out, lse = tm.finalize(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = out
        lse_ref[...] = lse


def _tpu_partials(qg, k, v, kpos, states, *, scale, block_kv, splits, interpret):
    b, hkv, gp, d = qg.shape
    per_split = states.shape[1] // splits
    fetch = lambda bi, p, i, ref: unpack_fetch(ref[bi, p * per_split + i])
    kv_spec = pl.BlockSpec((None, None, block_kv, d), lambda bi, h, p, i, ref: (bi, h, fetch(bi, p, i, ref), 0))
    in_specs = [
        pl.BlockSpec((None, None, gp, d), lambda bi, h, p, i, ref: (bi, h, 0, 0)),
        kv_spec, kv_spec,
        pl.BlockSpec((None, 1, block_kv), lambda bi, h, p, i, ref: (bi, 0, fetch(bi, p, i, ref))),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, gp, d), lambda bi, h, p, i, ref: (bi, h, p, 0, 0)),
        pl.BlockSpec((None, None, None, gp, 1), lambda bi, h, p, i, ref: (bi, h, p, 0, 0)),
    ]
    scratch = [compat.vmem((gp, 1), jnp.float32), compat.vmem((gp, 1), jnp.float32), compat.vmem((gp, d), jnp.float32)]
    kernel = functools.partial(_tpu_kernel, scale=scale, per_split=per_split, precision=tm.precision_for(qg.dtype))
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=compat.prefetch_grid_spec(1, (b, hkv, splits, per_split), in_specs, out_specs, scratch),
        out_shape=[compat.out_struct((b, hkv, splits, gp, d), jnp.float32, qg, k, v),
                   compat.out_struct((b, hkv, splits, gp, 1), jnp.float32, qg, k, v)],
        compiler_params=compat.tpu_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="decode_attention_tpu",
    )(pack_fetch(states), qg, k, v, kpos[:, None, :])
    return out, lse[..., 0]


# -------------------------------------------------------------------------------------------- GPU


def _gpu_kernel(rng_ref, st_ref, q_ref, k_ref, v_ref, kp_ref, o_ref, lse_ref, *, scale, block_kv, per_split, precision):
    gp, d = q_ref.shape
    base = pl.program_id(2) * per_split
    q = q_ref[...]

    def body(i, carry):
        blk = base + i
        rows = pl.ds(pl.multiple_of(blk * block_kv, block_kv), block_kv)

        def tile(c, masked):
            return _tile(q, k_ref[rows, :], v_ref[rows, :], kp_ref[rows][None, :], c, scale=scale, masked=masked, precision=precision)

        return lax.switch(st_ref[blk], [lambda c: c, lambda c: tile(c, True), lambda c: tile(c, False)], carry)

    init = (jnp.full((gp, 1), tm.NEG_INF, jnp.float32), jnp.zeros((gp, 1), jnp.float32), jnp.zeros((gp, d), jnp.float32))
    out, lse = tm.finalize(*lax.fori_loop(rng_ref[0], rng_ref[1], body, init))
    o_ref[...] = out
    lse_ref[...] = lse.reshape(gp)


def _gpu_partials(qg, k, v, kpos, states, *, scale, block_kv, splits, interpret):
    b, hkv, gp, d = qg.shape
    s = k.shape[2]
    nblk = states.shape[1]
    per_split = nblk // splits
    ranges = row_ranges(states.reshape(b, splits, per_split))
    kv_spec = pl.BlockSpec((None, None, s, d), lambda bi, h, p: (bi, h, 0, 0))
    kernel = functools.partial(_gpu_kernel, scale=scale, block_kv=block_kv, per_split=per_split, precision=tm.precision_for(qg.dtype))
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=[
            pl.BlockSpec((None, None, 2), lambda bi, h, p: (bi, p, 0)),
            pl.BlockSpec((None, nblk), lambda bi, h, p: (bi, 0)),
            pl.BlockSpec((None, None, gp, d), lambda bi, h, p: (bi, h, 0, 0)),
            kv_spec, kv_spec,
            pl.BlockSpec((None, s), lambda bi, h, p: (bi, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, None, gp, d), lambda bi, h, p: (bi, h, p, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda bi, h, p: (bi, h, p, 0))],
        out_shape=[compat.out_struct((b, hkv, splits, gp, d), jnp.float32, qg, k, v),
                   compat.out_struct((b, hkv, splits, gp), jnp.float32, qg, k, v)],
        compiler_params=compat.triton_compiler_params(4, 2),
        interpret=interpret,
        name="decode_attention_gpu",
    )(ranges, states, qg, k, v, kpos)


# ----------------------------------------------------------------------------------------- public


def combine_splits(out_p: Array, lse_p: Array) -> tuple[Array, Array]:
    """Merges partial results over axis 2: ``out_p [..., P, G, D]``, ``lse_p [..., P, G]``."""
    m = jnp.max(lse_p, axis=2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_p - m)
    total = jnp.sum(w, axis=2)
    out = jnp.sum(w[..., None] * out_p, axis=2) / jnp.where(total == 0, 1.0, total)[..., None]
    lse = jnp.where(total == 0, -jnp.inf, m[:, :, 0] + jnp.log(jnp.where(total == 0, 1.0, total)))
    return out, lse


def _default_splits(backend: str, b: int, hkv: int, nblk: int) -> int:
    programs = b * hkv
    target = 256 if backend == "gpu" else 2  # ~2 programs per SM on a GPU; the 2 cores of a megacore TPU
    return max(1, min(nblk, -(-target // programs)))


def decode_attention(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    *,
    lengths: Optional[Array] = None,
    pos: Optional[Array] = None,
    query_pos: Optional[Array] = None,
    sm_scale: Optional[float] = None,
    block_kv: Optional[int] = None,
    num_splits: Optional[int] = None,
    interpret: Optional[bool] = False,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Attention of one query per sequence, ``q [B, Hq, D]``, over ``k_cache``/``v_cache [B, Hkv, S, D]``.

    Args:
      lengths: int ``[B]``; slots ``j >= lengths[b]`` are not seen.
      pos: int32 ``[B, S]``, the position held by each slot, ``-1`` for empty slots.
      query_pos: int32 ``[B]``; with ``pos``, slots with ``pos > query_pos`` are not seen.
      block_kv, num_splits: key block and number of split-K chunks (defaults per backend).
      interpret, backend: as in ``flash_attention``.

    Returns ``out [B, Hq, D]`` in ``q.dtype`` (and lse ``[B, Hq]`` f32 with ``return_lse``).
    """
    b, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != (b, hkv, s, d) or v_cache.shape != k_cache.shape or hq % hkv:
        raise ValueError(f"q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}: want [B, Hq, D], [B, Hkv, S, D]")
    backend = compat.resolve_backend(backend)
    interpret = compat.resolve_interpret(interpret)
    compat.check_runnable(backend, interpret)
    g = hq // hkv
    scale = float(1.0 / math.sqrt(d) if sm_scale is None else sm_scale)

    bk = choose_block(block_kv or DEFAULT_BLOCK_KV[backend], s, backend, is_q=False)
    if not interpret and backend == "gpu" and (bk < 16 or bk & (bk - 1)):
        raise ValueError(f"GPU block_kv={bk} must be a power of two >= 16")
    nblk = -(-s // bk)
    # The largest chunk count <= the request that divides the blocks: no cache padding beyond bk.
    want = min(num_splits or _default_splits(backend, b, hkv, nblk), nblk)
    splits = max(p for p in range(1, want + 1) if nblk % p == 0)
    s_pad = nblk * bk
    d_pad = d if backend == "tpu" else max(16, 1 << (d - 1).bit_length())
    gp = -(-g // 8) * 8 if backend == "tpu" else max(16, 1 << (g - 1).bit_length())

    kpos = jnp.pad(_visible_slots(b, s, lengths, pos, query_pos), ((0, 0), (0, s_pad - s)), constant_values=-1)
    pad_cache = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, s_pad - s), (0, d_pad - d))) if (s_pad, d_pad) != (s, d) else x
    qg = jnp.pad(q.reshape(b, hkv, g, d), ((0, 0), (0, 0), (0, gp - g), (0, d_pad - d)))
    partials = _tpu_partials if backend == "tpu" else _gpu_partials
    out_p, lse_p = partials(qg, pad_cache(k_cache), pad_cache(v_cache), kpos, _slot_states(kpos, bk),
                            scale=scale, block_kv=bk, splits=splits, interpret=interpret)
    out, lse = combine_splits(out_p, lse_p)
    out = out[:, :, :g, :d].reshape(b, hq, d).astype(q.dtype)
    return (out, lse[:, :, :g].reshape(b, hq)) if return_lse else out
