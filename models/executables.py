"""Ahead-of-time compiled executables of the sampler and scorer: `_run` compiles a function once per
(static arguments, shapes, shardings) and keeps it; `compilation_count` says how many exist. Each
compilation is logged with ``logging.info``.

`compile_only` runs the same host code without running anything: for a model whose parameters are
``jax.ShapeDtypeStruct``s on a mesh of any platform (a TPU topology described on a CPU machine),
every `_run` compiles its program, records it, and returns the abstract outputs (shapes, dtypes and
shardings of the compiled program), which the next program takes as its inputs. So ``generate``,
``score`` and ``next_token_logprobs`` compile, ahead of time, exactly the programs a real call
would run (`experiments.aot`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any, Iterator, Optional

import jax

log = logging.getLogger(__name__)


_EXECUTABLES: dict[tuple, Any] = {}
_SECONDS: dict[tuple, float] = {}  # how long each executable took to compile
_RECORD: Optional[list[dict[str, Any]]] = None  # the programs compiled under `compile_only`


@contextlib.contextmanager
def compile_only() -> Iterator[list[dict[str, Any]]]:
    """Within it, `_run` compiles without running (module doc); yields the list of programs compiled,
    ``{"name", "desc", "compiled", "seconds", "key"}`` each, in order of first use (a program met
    again is not repeated; one compiled before the context is listed with its compile time then)."""
    global _RECORD
    outer, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = outer


def compiling_only() -> bool:
    """Whether `compile_only` is active: host inputs become ``ShapeDtypeStruct``s (`models.placement`)."""
    return _RECORD is not None


def _abstract(x: Any) -> Any:
    return x if isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, "shape") else jax.ShapeDtypeStruct(x.shape, x.dtype)


def _run(name: str, fn, static: tuple, args: tuple, donate: tuple[int, ...] = (), desc: str = ""):
    """Calls ``fn(*static, *args)`` compiled ahead of time once per (static, shapes, shardings)."""
    if _RECORD is not None:  # uncommitted host constants (knobs) take whatever placement the program gives them
        args = jax.tree.map(_abstract, args)
    leaves, treedef = jax.tree.flatten(args)
    sig = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)
    key = (name, static, treedef, sig)
    exe = _EXECUTABLES.get(key)
    if exe is None:
        t0 = time.perf_counter()
        exe = jax.jit(functools.partial(fn, *static), donate_argnums=donate).lower(*args).compile()
        _SECONDS[key] = time.perf_counter() - t0
        log.info("sampler: compiled %s (%s) in %.1fs; %d compilations so far", name, desc, _SECONDS[key], len(_EXECUTABLES) + 1)
        _EXECUTABLES[key] = exe
    if _RECORD is not None:
        if all(r["key"] != key for r in _RECORD):  # compiled now or earlier in the process: recorded once
            _RECORD.append({"name": name, "desc": desc, "compiled": exe, "seconds": _SECONDS[key], "key": key})
        # the compiled program's outputs, without their layouts
        return jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding), exe.out_info)
    return exe(*args)


def compilation_count() -> int:
    """How many sampler executables have been compiled in this process."""
    return len(_EXECUTABLES)
