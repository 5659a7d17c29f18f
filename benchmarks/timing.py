"""Wall-clock timing of a JAX call, the one way every benchmark here measures."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax


def timings(fn: Callable[..., Any], *args: Any, n: int = 5) -> list[float]:
    """Seconds of ``n`` calls ``fn(*args)``, each waited for with ``jax.block_until_ready``, after
    one untimed warm-up call (which compiles a jitted ``fn``)."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return out
