"""The compiled kernels lower for TPU (Mosaic) and NVIDIA GPU (Triton), checked on any machine.

``compat.lower_for`` runs Pallas' Mosaic and Triton lowering rules without the device: block
shapes, layouts the lowering checks, supported primitives, power-of-two Triton tensors. It stops
before the device compiler (Mosaic's layout passes in libtpu, Triton's PTX generation), which
only the compiled-mode tests on a real TPU/GPU exercise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attention_kernels import compat
from attention_kernels.decode_attention import decode_attention
from attention_kernels.flash_attention import flash_attention

PLATFORMS = [pytest.param("tpu", "tpu", id="mosaic-tpu"), pytest.param("cuda", "gpu", id="triton-gpu")]


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


FLASH_CASES = [  # (dtype, head dim, query heads, kv heads, length, mask)
    pytest.param(jnp.bfloat16, 128, 8, 2, 1000, "segments", id="bf16-d128-gqa4-segments"),
    pytest.param(jnp.float32, 64, 6, 2, 384, "positions", id="fp32-d64-gqa3-positions"),
    pytest.param(jnp.bfloat16, 64, 4, 4, 2048, "noncausal", id="bf16-d64-mha-noncausal"),
]


@pytest.mark.parametrize("platform, backend", PLATFORMS)
@pytest.mark.parametrize("dtype, d, hq, hkv, n, mask", FLASH_CASES)
def test_flash_forward_and_backward_lower(platform, backend, dtype, d, hq, hkv, n, mask):
    b = 2
    ids = _sds((b, n), jnp.int32)

    def fwd_bwd(q, k, v, ids):
        kw = {"segments": dict(segment_ids=ids), "positions": dict(positions=(ids, ids)),
              "noncausal": dict(causal=False)}[mask]
        loss = lambda q, k, v: jnp.sum(flash_attention(q, k, v, backend=backend, **kw).astype(jnp.float32))
        return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)

    lowered = compat.lower_for(fwd_bwd, _sds((b, n, hq, d), dtype), _sds((b, n, hkv, d), dtype),
                               _sds((b, n, hkv, d), dtype), ids, platform_name=platform)
    text = lowered.as_text()
    assert ("tpu_custom_call" if platform == "tpu" else "triton") in text
    assert text.count("custom_call") >= 3  # forward, dQ, dK/dV


@pytest.mark.parametrize("platform, backend", PLATFORMS)
@pytest.mark.parametrize("dtype, d", [(jnp.bfloat16, 128), (jnp.float32, 64)])
def test_decode_lowers(platform, backend, dtype, d):
    b, hq, hkv, s = 4, 32, 8, 4096

    def decode(q, k, v, pos, query_pos):
        return decode_attention(q, k, v, pos=pos, query_pos=query_pos, backend=backend)

    lowered = compat.lower_for(decode, _sds((b, hq, d), dtype), _sds((b, hkv, s, d), dtype), _sds((b, hkv, s, d), dtype),
                               _sds((b, s), jnp.int32), _sds((b,), jnp.int32), platform_name=platform)
    assert "custom_call" in lowered.as_text()
