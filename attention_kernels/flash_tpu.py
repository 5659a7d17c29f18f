"""Mosaic TPU kernels of ``flash_attention``: forward, dQ and dK/dV.

Layout: heads-major and padded to whole blocks, ``q [B, Hq, T, D]``, ``k``/``v [B, Hkv, S, D]``;
per-token ids ``[B, T]``/``[B, S]`` (reshaped here to ``[B, T, 1]`` and ``[B, 1, S]`` so a tile's
query ids lie along sublanes and its key ids along lanes); lse and delta ``[B, Hq, T]``.

Each kernel walks a grid whose last axes run over the reduction (key blocks for the forward and
dQ, query heads of the group and query blocks for dK/dV), carrying float32 accumulators in VMEM
scratch. The tile states (``block_mask``) come in through scalar prefetch: ``pl.when`` skips the
math of a ``SKIP`` tile, and the index maps send a skipped step to the block already in VMEM, so
it costs no DMA either. GQA needs no copy of K/V: the forward and dQ index maps read kv head
``h // G``; the dK/dV kernel runs per kv head and sums over its ``G`` query heads in scratch.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl

from attention_kernels import compat
from attention_kernels import tile_math as tm
from attention_kernels.block_mask import FULL, PARTIAL, pack_fetch, unpack_fetch, unpack_state


def _mask(shape, i, j, seg, pos, *, causal, kv_len, block_q, block_kv):
    read = lambda r: None if r is None else r[...]
    return tm.tile_mask(
        shape, causal=causal, row0=i * block_q, col0=j * block_kv, kv_len=kv_len,
        q_seg=read(seg[0]), kv_seg=read(seg[1]), q_pos=read(pos[0]), kv_pos=read(pos[1]),
    )


def _id_operands(q_seg, kv_seg, q_pos, kv_pos):
    ops = []
    for qx, kx in ((q_seg, kv_seg), (q_pos, kv_pos)):
        if qx is not None:
            ops += [qx[:, :, None], kx[:, None, :]]
    return ops


def _id_specs(n_pairs, block_q, block_kv, q_block_index, kv_block_index):
    """BlockSpecs of the ``[B, T, 1]``/``[B, 1, S]`` id arrays; the index functions map grid
    indices (and the prefetch ref) to (batch, query block) and (batch, key block)."""

    def q_map(*grid_and_ref):
        b, i = q_block_index(*grid_and_ref)
        return b, i, 0

    def kv_map(*grid_and_ref):
        b, j = kv_block_index(*grid_and_ref)
        return b, 0, j

    return [pl.BlockSpec((None, block_q, 1), q_map), pl.BlockSpec((None, 1, block_kv), kv_map)] * n_pairs


def _query_block_call(kernel_fn, q, k, q_seg, q_pos, states, *, block_q, block_kv, causal, scale, kv_len):
    """What the forward and dQ launches share (grid ``(B, Hq, T/bq, S/bkv)``, one query block of
    one head per ``(b, h, i)``, key blocks fetched through the prefetched tile table):
    ``(grid, info, q_spec, kv_spec, id_specs, kernel)``."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    fetch = lambda bi, i, j, ref: unpack_fetch(ref[bi, i, j])
    n_pairs = (q_seg is not None) + (q_pos is not None)
    q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, h, i, j, ref: (bi, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, block_kv, d), lambda bi, h, i, j, ref: (bi, h // g, fetch(bi, i, j, ref), 0))
    id_specs = _id_specs(n_pairs, block_q, block_kv,
                         lambda bi, h, i, j, ref: (bi, i), lambda bi, h, i, j, ref: (bi, fetch(bi, i, j, ref)))
    kernel = functools.partial(kernel_fn, has_seg=q_seg is not None, has_pos=q_pos is not None, causal=causal,
                               scale=scale, kv_len=kv_len, precision=tm.precision_for(q.dtype))
    return (b, hq, t // block_q, s // block_kv), pack_fetch(states), q_spec, kv_spec, id_specs, kernel


def _params(semantics, interpret):
    return dict(compiler_params=compat.tpu_compiler_params(semantics), interpret=interpret)


# ----------------------------------------------------------------------------------------- forward


def _fwd_kernel(info_ref, q_ref, k_ref, v_ref, *refs, has_seg, has_pos, causal, scale, kv_len, precision):
    seg, pos, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = tm.split_refs(refs, has_seg, has_pos)
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_q, block_kv = q_ref.shape[0], k_ref.shape[0]
    state = unpack_state(info_ref[b, i, j])

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, tm.NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
        shape = (block_q, block_kv)
        mask = _mask(shape, i, j, seg, pos, causal=causal, kv_len=kv_len, block_q=block_q, block_kv=block_kv) if masked else None
        s = tm.masked_scores(q_ref[...], k_ref[...], scale, mask, precision)
        m, l, acc = tm.online_softmax_step(s, v_ref[...], m_sc[...], l_sc[...], acc_sc[...], precision)
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    pl.when(state == FULL)(lambda: step(False))
    pl.when(state == PARTIAL)(lambda: step(True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _done():
        out, lse = tm.finalize(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, states, *, causal, scale, block_q, block_kv, kv_len, interpret):
    """(out ``[B, Hq, T, D]``, lse ``[B, Hq, T]`` f32)."""
    b, hq, t, d = q.shape
    grid, info, q_spec, kv_spec, id_specs, kernel = _query_block_call(
        _fwd_kernel, q, k, q_seg, q_pos, states, block_q=block_q, block_kv=block_kv, causal=causal, scale=scale,
        kv_len=kv_len)
    in_specs = [q_spec, kv_spec, kv_spec, *id_specs]
    out_specs = [q_spec, pl.BlockSpec((None, None, block_q, 1), lambda bi, h, i, j, ref: (bi, h, i, 0))]
    scratch = [compat.vmem((block_q, 1), jnp.float32), compat.vmem((block_q, 1), jnp.float32),
               compat.vmem((block_q, d), jnp.float32)]
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=compat.prefetch_grid_spec(1, grid, in_specs, out_specs, scratch),
        out_shape=[compat.out_struct(q.shape, q.dtype, q, k, v), compat.out_struct((b, hq, t, 1), jnp.float32, q, k, v)],
        name="flash_fwd_tpu",
        **_params(("parallel", "parallel", "parallel", "arbitrary"), interpret),
    )(info, q, k, v, *_id_operands(q_seg, kv_seg, q_pos, kv_pos))
    return out, lse[..., 0]


# -------------------------------------------------------------------------------------------- dQ


def _dq_kernel(info_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, has_seg, has_pos, causal, scale, kv_len, precision):
    seg, pos, (dq_ref, dq_sc) = tm.split_refs(refs, has_seg, has_pos)
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_q, block_kv = q_ref.shape[0], k_ref.shape[0]
    state = unpack_state(info_ref[b, i, j])

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
        shape = (block_q, block_kv)
        mask = _mask(shape, i, j, seg, pos, causal=causal, kv_len=kv_len, block_q=block_q, block_kv=block_kv) if masked else None
        k = k_ref[...]
        _, ds = tm.backward_tile(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], scale, mask, precision)
        dq_sc[...] = tm.accumulate_dq(ds, k, dq_sc[...], precision)

    pl.when(state == FULL)(lambda: step(False))
    pl.when(state == PARTIAL)(lambda: step(True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _done():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, states, *, causal, scale, block_q, block_kv, kv_len, interpret):
    d = q.shape[3]
    grid, info, q_spec, kv_spec, id_specs, kernel = _query_block_call(
        _dq_kernel, q, k, q_seg, q_pos, states, block_q=block_q, block_kv=block_kv, causal=causal, scale=scale,
        kv_len=kv_len)
    row_spec = pl.BlockSpec((None, None, block_q, 1), lambda bi, h, i, j, ref: (bi, h, i, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *id_specs]
    return pl.pallas_call(
        kernel,
        grid_spec=compat.prefetch_grid_spec(1, grid, in_specs, q_spec, [compat.vmem((block_q, d), jnp.float32)]),
        out_shape=compat.out_struct(q.shape, q.dtype, q, k, v, do),
        name="flash_dq_tpu",
        **_params(("parallel", "parallel", "parallel", "arbitrary"), interpret),
    )(info, q, k, v, do, lse[..., None], delta[..., None], *_id_operands(q_seg, kv_seg, q_pos, kv_pos))


# ----------------------------------------------------------------------------------------- dK/dV


def _dkv_kernel(info_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, has_seg, has_pos, causal, scale, kv_len, precision):
    seg, pos, (dk_ref, dv_ref, dk_sc, dv_sc) = tm.split_refs(refs, has_seg, has_pos)
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    block_q, block_kv = q_ref.shape[0], k_ref.shape[0]
    state = unpack_state(info_ref[b, j, i])

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        shape = (block_q, block_kv)
        mask = _mask(shape, i, j, seg, pos, causal=causal, kv_len=kv_len, block_q=block_q, block_kv=block_kv) if masked else None
        q, do = q_ref[...], do_ref[...]
        p, ds = tm.backward_tile(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], scale, mask, precision)
        dk_sc[...], dv_sc[...] = tm.accumulate_dkv(p, ds, q, do, dk_sc[...], dv_sc[...], precision)

    pl.when(state == FULL)(lambda: step(False))
    pl.when(state == PARTIAL)(lambda: step(True))

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _done():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, states_t, *, causal, scale, block_q, block_kv, kv_len, interpret):
    """``states_t [B, S // block_kv, T // block_q]``: the tile states transposed (key block first)."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    nq, nk = t // block_q, s // block_kv
    info = pack_fetch(states_t)
    fetch = lambda bi, j, i, ref: unpack_fetch(ref[bi, j, i])
    ids = _id_operands(q_seg, kv_seg, q_pos, kv_pos)
    q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, h, j, gi, i, ref: (bi, h * g + gi, fetch(bi, j, i, ref), 0))
    kv_spec = pl.BlockSpec((None, None, block_kv, d), lambda bi, h, j, gi, i, ref: (bi, h, j, 0))
    row_spec = pl.BlockSpec((None, None, block_q, 1), lambda bi, h, j, gi, i, ref: (bi, h * g + gi, fetch(bi, j, i, ref), 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *_id_specs(len(ids) // 2, block_q, block_kv,
                           lambda bi, h, j, gi, i, ref: (bi, fetch(bi, j, i, ref)), lambda bi, h, j, gi, i, ref: (bi, j))]
    kernel = functools.partial(
        _dkv_kernel, has_seg=q_seg is not None, has_pos=q_pos is not None, causal=causal, scale=scale,
        kv_len=kv_len, precision=tm.precision_for(q.dtype),
    )
    scratch = [compat.vmem((block_kv, d), jnp.float32), compat.vmem((block_kv, d), jnp.float32)]
    return pl.pallas_call(
        kernel,
        grid_spec=compat.prefetch_grid_spec(1, (b, hkv, nk, g, nq), in_specs, [kv_spec, kv_spec], scratch),
        out_shape=[compat.out_struct(k.shape, k.dtype, q, k, v, do), compat.out_struct(v.shape, v.dtype, q, k, v, do)],
        name="flash_dkv_tpu",
        **_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), interpret),
    )(info, q, k, v, do, lse[..., None], delta[..., None], *ids)
