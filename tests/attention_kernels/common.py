"""Shared pieces of the kernel tests: run modes, inputs, the error measure.

Every kernel test runs in three modes: the TPU (Mosaic) and GPU (Triton) kernel families in the
Pallas interpreter (always, on CPU), and compiled on the accelerator when one is present (the
device's own family; skipped otherwise).

Errors are ``max|x - ref| / max(1, max|ref|)``: absolute for values of order one, relative to
the largest value otherwise. bfloat16 needs the scaling: rounding an output of magnitude 3 to
bfloat16 alone moves it by up to 3 * 2**-9 = 6e-3.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from attention_kernels import compat
from attention_kernels.flash_attention import BlockSizes

ACCELERATOR = compat.platform() if compat.platform() in compat.BACKENDS else None

MODES = [
    pytest.param(("tpu", True), id="interpret-tpu"),
    pytest.param(("gpu", True), id="interpret-gpu"),
    pytest.param(
        (ACCELERATOR, False),
        id="compiled",
        marks=pytest.mark.skipif(ACCELERATOR is None, reason="no TPU or GPU: compiled kernels need one"),
    ),
]


def small_blocks(backend: str, interpret: bool) -> BlockSizes:
    """Blocks small enough that the test shapes span several of them (and legal when compiled)."""
    if backend == "tpu" and not interpret:  # Mosaic: 128-aligned tiles (flash_attention.choose_block)
        return BlockSizes(128, 128, 128, 128)
    return BlockSizes(16, 16, 16, 16)


def scaled_err(x, ref) -> float:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.max(np.abs(x - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def random_qkv(seed: int, b: int, t: int, s: int, hq: int, hkv: int, d: int, dtype=jnp.float32):
    """Standard normal q ``[B, T, Hq, D]``, k and v ``[B, S, Hkv, D]`` (numpy RNG: no compiles)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
                 for shape in ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d)))


def finite(x):
    return jnp.where(jnp.isfinite(x), x, 0.0)
