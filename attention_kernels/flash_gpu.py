"""Triton GPU kernels of ``flash_attention``: forward, dQ and dK/dV.

Layout as in ``flash_tpu``: ``q [B, Hq, T, D]``, ``k``/``v [B, Hkv, S, D]`` padded to whole
blocks (block sizes are powers of two, at least 16, as ``tl.dot`` wants), ids ``[B, T]``/``[B, S]``,
lse and delta ``[B, Hq, T]``.

Triton programs of one grid run concurrently, so nothing is carried across grid steps: each
program owns one output block and loops over the blocks it reduces, with ``fori_loop`` bounds taken
from ``block_mask.row_ranges`` (the first and last non-skipped tile of its row) and a ``lax.switch``
on the tile state inside the range (skip / masked / unmasked). GQA: the forward and dQ programs
index kv head ``h // G``; a dK/dV program owns one key block of one kv head and loops over the
``G`` query heads of its group, so dK/dV come out already summed over the group.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attention_kernels import compat
from attention_kernels import tile_math as tm
from attention_kernels.block_mask import row_ranges


def _ids(q_seg, kv_seg, q_pos, kv_pos):
    return [x for pair in ((q_seg, kv_seg), (q_pos, kv_pos)) if pair[0] is not None for x in pair]


def _params(num_warps, num_stages, interpret):
    return dict(compiler_params=compat.triton_compiler_params(num_warps, num_stages), interpret=interpret)


def _query_block_call(kernel_fn, q, k, q_seg, q_pos, *, block_q, block_kv, causal, scale, kv_len):
    """What the forward and dQ launches share (each program owns one query block of one head):
    ``(grid, in_specs of the row range, tile states, q, k, v and the id arrays, kernel, q_spec)``;
    the dQ launch adds its ``do``/``lse``/``delta`` specs after v."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    n_ids = 2 * ((q_seg is not None) + (q_pos is not None))
    q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, h, i: (bi, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, s, d), lambda bi, h, i: (bi, h // g, 0, 0))  # GQA: kv head h // G
    head = [pl.BlockSpec((None, None, 2), lambda bi, h, i: (bi, i, 0)),
            pl.BlockSpec((None, None, s // block_kv), lambda bi, h, i: (bi, i, 0)), q_spec, kv_spec, kv_spec]
    ids = [pl.BlockSpec((None, block_q), lambda bi, h, i: (bi, i)), pl.BlockSpec((None, s), lambda bi, h, i: (bi, 0))] * (n_ids // 2)
    kernel = functools.partial(kernel_fn, has_seg=q_seg is not None, has_pos=q_pos is not None, causal=causal,
                               scale=scale, kv_len=kv_len, block_kv=block_kv, precision=tm.precision_for(q.dtype))
    return (b, hq, t // block_q), head, ids, kernel, q_spec


def _switch(state, tile, carry):
    """``tile(carry, masked)`` by state: SKIP returns the carry, PARTIAL masks, FULL does not."""
    return lax.switch(state, [lambda c: c, lambda c: tile(c, True), lambda c: tile(c, False)], carry)


def _row_mask(shape, seg, pos, q_rows, kv_rows, *, causal, kv_len, row0, col0):
    """Element mask of a tile; ``q_rows``/``kv_rows`` slice the query/key id refs."""
    col = lambda r: None if r is None else r[kv_rows][None, :]
    row = lambda r: None if r is None else r[q_rows][:, None]
    return tm.tile_mask(shape, causal=causal, row0=row0, col0=col0, kv_len=kv_len,
                        q_seg=row(seg[0]), kv_seg=col(seg[1]), q_pos=row(pos[0]), kv_pos=col(pos[1]))


def _key_tile(i, j, block_q, block_kv, seg, pos, masked, *, causal, kv_len):
    """The rows of key block ``j`` and, for a PARTIAL tile (``masked``), the element mask of query
    block ``i`` against them (forward and dQ programs, which own query block ``i``)."""
    rows = pl.ds(pl.multiple_of(j * block_kv, block_kv), block_kv)
    mask = None
    if masked:
        mask = _row_mask((block_q, block_kv), seg, pos, slice(None), rows, causal=causal, kv_len=kv_len,
                         row0=i * block_q, col0=j * block_kv)
    return rows, mask


# ----------------------------------------------------------------------------------------- forward


def _fwd_kernel(rng_ref, st_ref, q_ref, k_ref, v_ref, *refs, has_seg, has_pos, causal, scale, kv_len, block_kv, precision):
    seg, pos, (o_ref, lse_ref) = tm.split_refs(refs, has_seg, has_pos)
    block_q, d = q_ref.shape
    i = pl.program_id(2)
    q = q_ref[...]

    def body(j, carry):
        def tile(c, masked):
            rows, mask = _key_tile(i, j, block_q, block_kv, seg, pos, masked, causal=causal, kv_len=kv_len)
            s = tm.masked_scores(q, k_ref[rows, :], scale, mask, precision)
            return tm.online_softmax_step(s, v_ref[rows, :], *c, precision)
        return _switch(st_ref[j], tile, carry)

    init = (jnp.full((block_q, 1), tm.NEG_INF, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
            jnp.zeros((block_q, d), jnp.float32))
    m, l, acc = lax.fori_loop(rng_ref[0], rng_ref[1], body, init)
    out, lse = tm.finalize(m, l, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(block_q)


def forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, states, *, causal, scale, block_q, block_kv, kv_len, interpret,
            num_warps=None, num_stages=2):
    b, hq, t, d = q.shape
    grid, head, id_specs, kernel, q_spec = _query_block_call(
        _fwd_kernel, q, k, q_seg, q_pos, block_q=block_q, block_kv=block_kv, causal=causal, scale=scale, kv_len=kv_len)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=head + id_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda bi, h, i: (bi, h, i))],
        out_shape=[compat.out_struct(q.shape, q.dtype, q, k, v), compat.out_struct((b, hq, t), jnp.float32, q, k, v)],
        name="flash_fwd_gpu",
        **_params(num_warps or (4 if d <= 64 else 8), num_stages, interpret),
    )(row_ranges(states), states, q, k, v, *_ids(q_seg, kv_seg, q_pos, kv_pos))


# -------------------------------------------------------------------------------------------- dQ


def _dq_kernel(rng_ref, st_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, has_seg, has_pos, causal, scale, kv_len, block_kv, precision):
    seg, pos, (dq_ref,) = tm.split_refs(refs, has_seg, has_pos)
    block_q, d = q_ref.shape
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def body(j, dq):
        def tile(acc, masked):
            rows, mask = _key_tile(i, j, block_q, block_kv, seg, pos, masked, causal=causal, kv_len=kv_len)
            k = k_ref[rows, :]
            _, ds = tm.backward_tile(q, k, v_ref[rows, :], do, lse, delta, scale, mask, precision)
            return tm.accumulate_dq(ds, k, acc, precision)
        return _switch(st_ref[j], tile, dq)

    dq = lax.fori_loop(rng_ref[0], rng_ref[1], body, jnp.zeros((block_q, d), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, states, *, causal, scale, block_q, block_kv, kv_len, interpret,
                num_warps=None, num_stages=2):
    d = q.shape[3]
    grid, head, id_specs, kernel, q_spec = _query_block_call(
        _dq_kernel, q, k, q_seg, q_pos, block_q=block_q, block_kv=block_kv, causal=causal, scale=scale, kv_len=kv_len)
    row_spec = pl.BlockSpec((None, None, block_q), lambda bi, h, i: (bi, h, i))
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=head + [q_spec, row_spec, row_spec] + id_specs,
        out_specs=q_spec,
        out_shape=compat.out_struct(q.shape, q.dtype, q, k, v, do),
        name="flash_dq_gpu",
        **_params(num_warps or (4 if d <= 64 else 8), num_stages, interpret),
    )(row_ranges(states), states, q, k, v, do, lse, delta, *_ids(q_seg, kv_seg, q_pos, kv_pos))


# ----------------------------------------------------------------------------------------- dK/dV


def _dkv_kernel(rng_ref, st_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, has_seg, has_pos, causal, scale, kv_len, block_q, precision):
    seg, pos, (dk_ref, dv_ref) = tm.split_refs(refs, has_seg, has_pos)
    block_kv, d = k_ref.shape
    group = q_ref.shape[0]
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]

    def over_heads(gi, carry):
        def body(i, carry):
            def tile(c, masked):
                rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
                mask = None
                if masked:
                    mask = _row_mask((block_q, block_kv), seg, pos, rows, slice(None), causal=causal, kv_len=kv_len,
                                     row0=i * block_q, col0=j * block_kv)
                q, do = q_ref[gi, rows, :], do_ref[gi, rows, :]
                lse, delta = lse_ref[gi, rows][:, None], delta_ref[gi, rows][:, None]
                p, ds = tm.backward_tile(q, k, v, do, lse, delta, scale, mask, precision)
                return tm.accumulate_dkv(p, ds, q, do, *c, precision)
            return _switch(st_ref[i], tile, carry)
        return lax.fori_loop(rng_ref[0], rng_ref[1], body, carry)

    zeros = jnp.zeros((block_kv, d), jnp.float32)
    dk, dv = lax.fori_loop(0, group, over_heads, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, states_t, *, causal, scale, block_q, block_kv, kv_len, interpret,
                 num_warps=None, num_stages=2):
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    nq, nk = t // block_q, s // block_kv
    ids = _ids(q_seg, kv_seg, q_pos, kv_pos)
    grouped = lambda x: x.reshape(b, hkv, g, *x.shape[2:])  # free: heads-major, group-minor
    qg_spec = pl.BlockSpec((None, None, g, t, d), lambda bi, h, j: (bi, h, 0, 0, 0))
    row_spec = pl.BlockSpec((None, None, g, t), lambda bi, h, j: (bi, h, 0, 0))
    kv_spec = pl.BlockSpec((None, None, block_kv, d), lambda bi, h, j: (bi, h, j, 0))
    in_specs = [
        pl.BlockSpec((None, None, 2), lambda bi, h, j: (bi, j, 0)),
        pl.BlockSpec((None, None, nq), lambda bi, h, j: (bi, j, 0)),
        qg_spec, kv_spec, kv_spec, qg_spec, row_spec, row_spec,
    ] + [pl.BlockSpec((None, t), lambda bi, h, j: (bi, 0)), pl.BlockSpec((None, block_kv), lambda bi, h, j: (bi, j))] * (len(ids) // 2)
    kernel = functools.partial(
        _dkv_kernel, has_seg=q_seg is not None, has_pos=q_pos is not None, causal=causal, scale=scale,
        kv_len=kv_len, block_q=block_q, precision=tm.precision_for(q.dtype),
    )
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, nk),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[compat.out_struct(k.shape, k.dtype, q, k, v, do), compat.out_struct(v.shape, v.dtype, q, k, v, do)],
        name="flash_dkv_gpu",
        **_params(num_warps or (4 if d <= 64 else 8), num_stages, interpret),
    )(row_ranges(states_t), states_t, grouped(q), k, v, grouped(do), grouped(lse), grouped(delta), *ids)
