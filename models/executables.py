"""Ahead-of-time compiled executables of the sampler and scorer: `_run` compiles a function once per
(static arguments, shapes, shardings) and keeps it; `compilation_count` says how many exist. Each
compilation is logged with ``logging.info``.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import jax

log = logging.getLogger(__name__)


_EXECUTABLES: dict[tuple, Any] = {}


def _run(name: str, fn, static: tuple, args: tuple, donate: tuple[int, ...] = (), desc: str = ""):
    """Calls ``fn(*static, *args)`` compiled ahead of time once per (static, shapes, shardings)."""
    leaves, treedef = jax.tree.flatten(args)
    sig = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)
    key = (name, static, treedef, sig)
    exe = _EXECUTABLES.get(key)
    if exe is None:
        t0 = time.perf_counter()
        exe = jax.jit(functools.partial(fn, *static), donate_argnums=donate).lower(*args).compile()
        log.info("sampler: compiled %s (%s) in %.1fs; %d compilations so far", name, desc, time.perf_counter() - t0, len(_EXECUTABLES) + 1)
        _EXECUTABLES[key] = exe
    return exe(*args)


def compilation_count() -> int:
    """How many sampler executables have been compiled in this process."""
    return len(_EXECUTABLES)
