"""Checkpoints of a training run: params, optimizer state, step, rng, data-iterator state, metadata.

A thin wrapper over orbax's ``CheckpointManager``. Each step directory holds four items::

    <directory>/<step>/params   the model parameters (alone, so export reads nothing else)
                      /opt      {opt_state, step, rng}
                      /data     the grain iterator state (JSON)
                      /extra    free-form JSON metadata (configs, last metrics)

Saves are atomic: orbax writes ``<step>.orbax-checkpoint-tmp-<n>`` and renames it to ``<step>``
only once every item is written, so a crash mid-save leaves the previous checkpoints as they were
and the half-written directory is never listed (and is removed when a manager is next opened).

Restoring takes an abstract train state (``metajudge.train_state.abstract_train_state``) whose leaves
carry the target shardings, so a checkpoint written on one mesh loads onto another (a different
device count included).

Multi-process runs: every process calls ``save`` and ``restore`` (orbax writes and reads each
process's shards and coordinates the commit), so ``directory`` must be a path every process sees
(a shared filesystem: NFS, Filestore, a gcsfuse mount). Which steps exist is read by process 0 and
broadcast, so every process resumes from the same step.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from metajudge.train_state import TrainState, train_state_shardings
from models import distributed
from models.llama import Llama
from models.loading import save_hf
from models.sharding import ShardingContext, state_shardings


class CheckpointError(Exception):
    """No checkpoint of a run directory reads back (a user can delete them and start over)."""


@dataclasses.dataclass
class Restored:
    step: int
    state: TrainState
    data_state: dict
    extra: dict


class CheckpointManager:
    """``save`` / ``latest_step`` / ``restore`` / ``export_hf`` for one run directory.

    ``keep`` most recent checkpoints are kept. Saves are synchronous by default: the train step
    donates its state buffers, so the arrays must be on disk before the next step runs.
    """

    def __init__(self, directory: str, keep: int = 3, *, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        self.async_save = async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, train_state: TrainState, data_iter_state: Optional[dict] = None, extra: Optional[dict] = None) -> None:
        """Writes checkpoint ``step`` (atomically; returns once it is committed unless ``async_save``)."""
        opt = {"opt_state": train_state.opt_state, "step": train_state.step, "rng": train_state.rng}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(train_state.params),
            opt=ocp.args.StandardSave(opt),
            data=ocp.args.JsonSave(dict(data_iter_state or {})),
            extra=ocp.args.JsonSave(dict(extra or {})),
        )
        self._mngr.save(int(step), args=args, force=True)
        if not self.async_save:
            self._mngr.wait_until_finished()

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (half-written temporary directories are never listed);
        process 0's view on every process."""
        self._mngr.reload()
        steps = sorted(int(s) for s in self._mngr.all_steps())
        return [int(s) for s in distributed.broadcast_json(steps if distributed.is_primary() else None)]

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_or_latest(self, step: Optional[int]) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step} (have {steps})")
        return step

    def restore(self, step: Optional[int], abstract_train_state: TrainState, mesh: Optional[Mesh] = None) -> Restored:
        """Checkpoint ``step`` (``None``: the latest) placed onto the current devices.

        Target shardings come from the leaves of ``abstract_train_state``; with ``mesh`` they are
        recomputed for that mesh by the model's rules (any device count).
        """
        step = self._step_or_latest(step)
        target = abstract_train_state
        if mesh is not None:
            sh = train_state_shardings(target, mesh)
            target = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), target, sh)
        opt = {"opt_state": target.opt_state, "step": target.step, "rng": target.rng}
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params),
                opt=ocp.args.StandardRestore(opt),
                data=ocp.args.JsonRestore(),
                extra=ocp.args.JsonRestore(),
            ),
        )
        o = out["opt"]
        state = TrainState(out["params"], o["opt_state"], o["step"], o["rng"], target.graphdef)
        return Restored(step, state, dict(out["data"] or {}), dict(out["extra"] or {}))

    def restore_latest_good(self, abstract_train_state: TrainState, mesh: Optional[Mesh] = None) -> Restored:
        """The newest checkpoint that reads back completely. A step that fails to read (a deleted
        data file, a truncated ``manifest.ocdbt``, missing metadata) is skipped with a warning
        naming it, and the next older one is tried; with none readable, the error of the newest."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        first_error: Optional[BaseException] = None
        bad: list[int] = []
        for step in reversed(steps):
            error: Optional[BaseException] = None
            try:
                restored = self.restore(step, abstract_train_state, mesh)
            except Exception as e:  # orbax/tensorstore raise many kinds; any failure means unreadable
                error = e
            # Each process reads its own shards: a step is used only when every process read it, so
            # that all of them resume from the same step (one process's missing file skips it for all).
            failed = np.flatnonzero(distributed.process_gather(np.int32(error is not None)))
            if failed.size:
                if error is not None:
                    first_error = first_error or error
                    msg = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                    why = f"{type(error).__name__}: {msg}"
                else:
                    why = f"process(es) {', '.join(map(str, failed))} could not read their part"
                print(f"warning: checkpoint {self.directory}/{step} does not read back ({why}); skipping it",
                      file=sys.stderr)
                bad.append(step)
                continue
            if bad:  # unreadable and newer than the one resumed from: the steps are trained again
                if distributed.is_primary():
                    for b in bad:
                        shutil.rmtree(os.path.join(self.directory, str(b)), ignore_errors=True)
                distributed.barrier(f"checkpoints {self.directory} pruned")
                self._mngr.reload()
                print(f"warning: resuming from step {step} of {self.directory}; deleted unreadable step(s) "
                      f"{', '.join(map(str, sorted(bad)))}", file=sys.stderr)
            return restored
        raise CheckpointError(f"{self.directory}: no checkpoint reads back (steps {steps}); delete the directory to "
                         f"start over. Newest error: {type(first_error).__name__}: {first_error}") from None

    def restore_params(self, step: Optional[int], abstract_params: Any) -> Any:
        """Only the parameters of checkpoint ``step`` (an ``nnx.State`` shaped like ``abstract_params``)."""
        step = self._step_or_latest(step)
        out = self._mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return out["params"]

    def export_hf(self, step: Optional[int], config: Any, directory: str, *, mesh: Optional[Mesh] = None) -> str:
        """Writes checkpoint ``step``'s model as a Hugging Face directory (``models.save_hf``)."""
        shard = ShardingContext(mesh) if mesh is not None else None
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), shard=shard)), nnx.Param)
        if shard is None:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            sh = jax.tree.map(lambda _: dev, abstract)
        else:
            sh = state_shardings(abstract, shard)
        abstract = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), abstract, sh)
        params = self.restore_params(step, abstract)
        save_hf(config, nnx.merge(graphdef, params), directory)
        return directory

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
