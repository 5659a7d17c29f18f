"""External pairwise judges for the held-out evaluation (``--external-judge MODULE:FUNCTION``).

``fn(batch: list[tuple[str, str, str]])`` receives ``(instruction, answer_a, answer_b)`` triples
and returns one output per triple: a probability in [0, 1] that answer A is better, or a verdict
string ``"A"``, ``"B"`` or ``"tie"`` (None also counts as a tie). The module must be importable (on
``PYTHONPATH`` or in the current directory).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np

from metajudge.evaluate import judge_outputs_to_p_a
from metajudge.trainer import UsageError
from models import distributed

ExternalJudge = Callable[[list[tuple[str, str, str]]], Sequence[Any]]


def load_external_judge(spec: str) -> ExternalJudge:
    """The callable named by ``"module:function"`` (``function`` may be dotted, ``Class.method``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--external-judge {spec!r}: expected MODULE:FUNCTION, e.g. my_judges:judge")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"--external-judge {spec}: cannot import {module_name!r} ({e}); "
                         "put the module on PYTHONPATH or in the current directory") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--external-judge {spec}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--external-judge {spec}: {attr!r} is not callable")
    return obj


def _ask_external_judge(fn: ExternalJudge, triples: Sequence[tuple[str, str, str]], batch_size: int, name: str) -> tuple[np.ndarray, list[str]]:
    outputs: list[Any] = []
    for start in range(0, len(triples), batch_size):
        batch = [tuple(x) for x in triples[start:start + batch_size]]
        got = fn(batch)
        try:
            got = list(got)
        except TypeError:
            raise UsageError(f"{name} returned {type(got).__name__}; it must return a list with one output per triple") from None
        if len(got) != len(batch):
            raise UsageError(f"{name} returned {len(got)} outputs for {len(batch)} triples; it must return one per triple")
        outputs += got
    try:
        return judge_outputs_to_p_a(outputs)
    except ValueError as e:
        raise UsageError(f"{name}: {e}") from None


def call_external_judge(fn: ExternalJudge, triples: Sequence[tuple[str, str, str]], batch_size: int, name: str = "external judge") -> tuple[np.ndarray, list[str]]:
    """``(p_a, kinds)`` of ``fn`` over ``triples``, ``batch_size`` triples per call (see the module
    doc). On a multi-process run only process 0 calls ``fn``; the others receive its answers."""
    shared: Optional[dict] = None
    failure: Optional[BaseException] = None
    if distributed.is_primary():
        try:
            p_a, kinds = _ask_external_judge(fn, triples, batch_size, name)
            shared = {"p_a": p_a.tolist(), "kinds": kinds}
        except Exception as e:  # the other processes must hear of it, not wait forever
            failure, shared = e, {"error": f"{name} failed on process 0: {type(e).__name__}: {e}"}
    shared = distributed.broadcast_json(shared)
    if failure is not None:
        raise failure
    if "error" in shared:
        raise UsageError(shared["error"])
    return np.asarray(shared["p_a"], dtype=np.float64), list(shared["kinds"])
