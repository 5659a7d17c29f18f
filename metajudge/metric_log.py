"""Metrics where researchers look: TensorBoard event files, and Weights & Biases when asked.

``metrics.jsonl`` / ``metrics.json`` stay the record of a run; this module copies the same numbers
to

* TensorBoard (``tensorboardX``'s ``SummaryWriter``): event files in a ``tensorboard/`` folder
  next to the stage's other outputs, so ``tensorboard --logdir <run>`` shows every DPO and SFT
  step (``iter_<t>/dpo/tensorboard``, one TensorBoard run per training) and the loop's
  per-iteration metrics (``<run>/tensorboard``, step = iteration). A resumed stage purges the
  events of the interrupted attempt from its restart step on (``purge_step``), so TensorBoard
  shows each step once.
* Weights & Biases (optional: ``pip install -e ".[wandb]"``; ``--set log.wandb=true``): one W&B run
  per loop run, every scalar under the same tag as in TensorBoard, each group of tags with its own
  step axis (``<prefix>/step``: the DPO step of ``iter_1/dpo``, the iteration of ``loop``).
  ``log.wandb_mode=offline`` writes it under ``<run>/wandb`` with no network (``wandb sync``
  uploads it later).

Only process 0 of a multi-process run writes. Nested dicts become ``a/b`` tags; values that are
not real numbers (strings, lists, None) are left out; NaN and inf are kept (TensorBoard shows them),
without the warning tensorboardX would print for each.
"""

from __future__ import annotations

import importlib.util
import logging
import numbers
import os
import time
import uuid
from typing import Any, Iterator, Mapping, Optional

from metajudge.stages import write_text_atomic
from models import distributed

WANDB_INSTALL = 'pip install -e ".[wandb]"'


def flatten_scalars(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(tag, value)`` for every real number in ``metrics``, nested dicts joined with ``/``
    (``{"a": {"b": 1}, "c": "x"}`` -> ``("a/b", 1.0)``); bools count as 0/1."""
    for key, value in metrics.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from flatten_scalars(value, tag)
        elif isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(value, "size", 0) == 1):
            try:
                yield tag, float(value)
            except (TypeError, ValueError):
                continue


class MetricLog:
    """Scalars of one stage to TensorBoard (``logdir``) and, when ``wandb_run`` is given, to W&B
    under ``prefix``. Use as a context manager, or call :meth:`close`."""

    def __init__(self, logdir: Optional[str], *, prefix: str, purge_step: Optional[int] = None, wandb_run: Any = None):
        self.prefix = prefix
        self._wandb = wandb_run if distributed.is_primary() else None
        self._tb = None
        if logdir is not None and distributed.is_primary():
            # Imported on first use: tensorboardX imports torch whenever torch is installed (2 s).
            from tensorboardX import SummaryWriter

            # NaN marks a metric with no value this step (no judge pairs, say) and is kept on purpose;
            # tensorboardX would print a warning for each one.
            logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

            os.makedirs(logdir, exist_ok=True)
            # The file name has the time in whole seconds; the suffix keeps a restart within the same
            # second from overwriting the previous file, and sorts after it (TensorBoard reads by name).
            self._tb = SummaryWriter(logdir, purge_step=purge_step, flush_secs=30, filename_suffix=f".{time.time_ns()}")
        if self._wandb is not None:
            self._wandb.define_metric(f"{prefix}/step")
            self._wandb.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Writes every scalar of ``metrics`` at ``step``."""
        scalars = dict(flatten_scalars(metrics))
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log({**{f"{self.prefix}/{k}": v for k, v in scalars.items()}, f"{self.prefix}/step": step})

    def close(self) -> None:
        """Flushes and closes the TensorBoard file (the W&B run stays open: its owner finishes it)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wandb_available() -> bool:
    """Whether the optional ``wandb`` package is installed (``WANDB_INSTALL`` installs it)."""
    return importlib.util.find_spec("wandb") is not None


def start_wandb(out: str, *, project: str, mode: str, name: str, config: Mapping[str, Any]) -> Any:
    """A W&B run for the loop run in ``out`` (its files under ``out/wandb``), or None on processes
    other than 0. ``mode``: ``online`` or ``offline`` (no network). A resumed loop run continues the
    same W&B run: its id is drawn once and kept in ``out/wandb_id``."""
    if not distributed.is_primary():
        return None
    import wandb  # optional (the wandb extra): check wandb_available() before any work

    os.makedirs(out, exist_ok=True)
    id_path = os.path.join(out, "wandb_id")
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        write_text_atomic(id_path, run_id + "\n")
    return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=out, mode=mode,
                      config=dict(config), settings=wandb.Settings(silent=True))
