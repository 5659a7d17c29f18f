"""float32 matmuls at full precision: on a GPU, XLA's default for float32 dots is TF32 (about
1e-3 relative), which would make the float32 oracles of these tests (1e-5) fail on the reference
side rather than test the kernels. On CPU the setting changes nothing."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _full_precision_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield
