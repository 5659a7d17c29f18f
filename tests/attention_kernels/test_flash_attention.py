"""flash_attention against the float32 reference: values, lse and gradients, in every mode.

Shapes are small and deliberately not multiples of the blocks; blocks of 16 make every case span
several tiles, so skipping, partial masks and the grid-carried accumulators are all exercised.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from attention_kernels.flash_attention import flash_attention
from attention_kernels.reference import attention_reference
from tests.attention_kernels.common import MODES, finite, random_qkv, scaled_err, small_blocks

TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (3e-3, 5e-2)}  # (forward, gradients)


def _loss_fn(attn, q_shape):
    """sum(w_o * out) + sum(w_l * lse): random cotangents on both outputs (lse -inf rows excluded)."""
    b, t, hq, _ = q_shape
    rng = np.random.default_rng(7)
    w_o = jnp.asarray(rng.standard_normal(q_shape, np.float32))
    w_l = jnp.asarray(rng.standard_normal((b, hq, t), np.float32))

    def loss(q, k, v):
        out, lse = attn(q, k, v)
        return jnp.sum(w_o * out.astype(jnp.float32)) + jnp.sum(w_l * finite(lse)), (out, lse)

    return loss


def _value_and_grads(attn, q, k, v):
    """(out, gradients of sum(out**2) / 2), i.e. the VJP with the output as its own cotangent."""
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(out)


def _check(mode, q, k, v, dtype, **kw):
    backend, interpret = mode
    kernel = functools.partial(flash_attention, block_sizes=small_blocks(backend, interpret), interpret=interpret,
                               backend=backend, return_lse=True, **kw)
    reference = functools.partial(attention_reference, **kw)
    grad = lambda f: jax.jit(jax.value_and_grad(_loss_fn(f, q.shape), argnums=(0, 1, 2), has_aux=True))
    (_, (out, lse)), grads = grad(kernel)(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    (_, (ref_out, ref_lse)), ref_grads = grad(reference)(f32(q), f32(k), f32(v))
    fwd_tol, grad_tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert scaled_err(out, ref_out) < fwd_tol
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert scaled_err(finite(lse), finite(ref_lse)) < fwd_tol
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype and np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert scaled_err(g, r) < grad_tol, f"d{name}: {scaled_err(g, r):.2e}"
    return out, lse, grads


@pytest.mark.parametrize("mode", MODES)
def test_fp32_causal_mha_with_unaligned_length(mode):
    q, k, v = random_qkv(0, 2, 40, 40, 2, 2, 64)
    _check(mode, q, k, v, jnp.float32, causal=True)


@pytest.mark.parametrize("mode", MODES)
def test_fp32_gqa3_segments_inside_blocks_and_padding_rows(mode):
    # Non-causal packed rows: boundaries at 7, 23, 33 cut through blocks of 16; the padding tail
    # (segment 0) must return zeros, lse -inf and zero gradients.
    q, k, v = random_qkv(1, 2, 40, 40, 6, 2, 64)
    seg = jnp.asarray([[1] * 7 + [2] * 16 + [3] * 10 + [0] * 7, [4] * 33 + [0] * 7], jnp.int32)
    out, lse, (dq, _, _) = _check(mode, q, k, v, jnp.float32, causal=False, segment_ids=seg)
    assert np.all(np.asarray(out)[:, 33:] == 0) and np.all(np.isneginf(np.asarray(lse)[:, :, 33:]))
    assert np.all(np.asarray(dq)[:, 33:] == 0)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_causal_gqa8_head_dim_128_packed(mode):
    q, k, v = random_qkv(2, 2, 48, 48, 8, 1, 128, jnp.bfloat16)
    seg = jnp.asarray([[1] * 20 + [2] * 21 + [0] * 7, [3] * 48], jnp.int32)
    _check(mode, q, k, v, jnp.bfloat16, causal=True, segment_ids=seg)


@pytest.mark.parametrize("mode", MODES)
def test_fp32_positions_prefill_against_a_cache_with_empty_slots(mode):
    # 12 new tokens (positions 20..31, the last 3 are padding queries) against 56 cache slots:
    # slots 0..19 hold positions 0..19 except two empty ones, slots 20..31 the new tokens, the rest
    # are empty (-1). Causality is by position, not by index.
    b, t, s = 2, 12, 56
    q, k, v = random_qkv(3, b, t, s, 3, 1, 64)
    q_pos = jnp.asarray(np.tile(20 + np.arange(t), (b, 1)), jnp.int32)
    kv_pos = np.tile(np.where(np.arange(s) < 32, np.arange(s), -1), (b, 1))
    kv_pos[:, 3] = -1
    kv_pos[1, 10] = -1
    kv_pos = jnp.asarray(kv_pos, jnp.int32)
    q_seg = jnp.asarray([[1] * 9 + [0] * 3, [1] * 12], jnp.int32)
    kv_seg = jnp.asarray(np.ones((b, s)), jnp.int32)
    _check(mode, q, k, v, jnp.float32, causal=True, positions=(q_pos, kv_pos), segment_ids=(q_seg, kv_seg))


@pytest.mark.parametrize("mode", MODES)
def test_skipped_blocks_are_never_read(mode):
    # Three key blocks: segment 1, segment 2, padding. Filling the padding block's K/V with NaN must
    # leave every output and gradient finite, which only holds if its tiles are never computed
    # (a masked tile would still give 0 * NaN = NaN in p @ v).
    backend, interpret = mode
    blocks = small_blocks(backend, interpret)
    n = blocks.block_kv
    q, k, v = random_qkv(4, 1, 3 * n, 3 * n, 2, 1, 64)
    seg = jnp.asarray([[1] * n + [2] * n + [0] * n], jnp.int32)
    poison = (jnp.arange(3 * n) >= 2 * n)[None, :, None, None]
    k, v = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    attn = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, block_sizes=blocks, interpret=interpret, backend=backend)
    out, (dq, dk, dv) = jax.jit(lambda q, k, v: _value_and_grads(attn, q, k, v))(q, k, v)
    assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(dq)))
    assert np.all(np.isfinite(np.asarray(dk)[:, :2 * n])) and np.all(np.isfinite(np.asarray(dv)[:, :2 * n]))
    ref = attention_reference(q[:, :2 * n], k[:, :2 * n], v[:, :2 * n], segment_ids=seg[:, :2 * n])[0]
    assert scaled_err(out[:, :2 * n], ref) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_vmap_and_jit_over_an_extra_batch_axis(mode):
    backend, interpret = mode
    q, k, v = random_qkv(5, 2, 24, 24, 4, 2, 64)
    q, k, v = (x.reshape(2, 1, *x.shape[1:]) for x in (q, k, v))  # vmapped axis of 2, inner batch 1
    attn = lambda q, k, v: flash_attention(q, k, v, block_sizes=small_blocks(backend, interpret), interpret=interpret, backend=backend)
    out, grads = jax.jit(jax.vmap(lambda q, k, v: _value_and_grads(attn, q, k, v)))(q, k, v)
    ref_attn = lambda q, k, v: attention_reference(q, k, v)[0]
    ref, ref_grads = jax.jit(jax.vmap(lambda q, k, v: _value_and_grads(ref_attn, q, k, v)))(q, k, v)
    assert scaled_err(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert scaled_err(g, r) < 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_shard_map_over_batch_on_the_device_mesh(mode):
    backend, interpret = mode
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    n = devices.size
    q, k, v = random_qkv(6, n, 24, 24, 2, 1, 64)
    seg = jnp.asarray(np.repeat(np.arange(1, 4), 8)[None].repeat(n, 0), jnp.int32)

    def local(q, k, v, seg):
        attn = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, block_sizes=small_blocks(backend, interpret),
                                               interpret=interpret, backend=backend)
        out, grads = _value_and_grads(attn, q, k, v)
        return (out, *grads)

    spec = P("data")
    # The Pallas interpreter of JAX 0.10 mixes manual-axis-varying and invariant values in its
    # dynamic slices (its own error message suggests check_vma=False); compiled kernels declare
    # their outputs' varying axes (compat.out_struct) and run under the default check_vma=True.
    check_vma = not interpret
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 4, check_vma=check_vma))
    out, dq, dk, dv = sharded(q, k, v, seg)
    ref_fn = lambda q, k, v: attention_reference(q, k, v, segment_ids=seg)[0]
    ref, ref_grads = jax.jit(lambda q, k, v: _value_and_grads(ref_fn, q, k, v))(q, k, v)
    assert scaled_err(out, ref) < 1e-5
    for g, r in zip((dq, dk, dv), ref_grads):
        assert scaled_err(g, r) < 1e-4
