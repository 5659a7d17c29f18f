"""Multi-process runs: ``jax.distributed`` start-up and the few collectives the host side needs.

A run spans one or more processes (one per host on a TPU pod slice or a multi-GPU cluster, or
several on one machine in tests). Every process runs the same program on the same global mesh
(``models.make_mesh`` over ``jax.devices()``, all processes' devices), so the model's arrays are
global arrays and every jitted computation is one SPMD program.

:func:`initialize` starts ``jax.distributed`` before any JAX computation when

- the environment variables ``METAJUDGE_COORDINATOR`` (``host:port`` of process 0),
  ``METAJUDGE_NUM_PROCESSES`` and ``METAJUDGE_PROCESS_ID`` are set (all three or none): several
  processes on one machine (the tests: CPU collectives over TCP through gloo) or hosts without
  TPU metadata (GPU clusters); or
- the process runs on a Cloud TPU VM that belongs to a multi-host slice, detected the way
  ``jax.distributed`` itself detects it (the TPU cluster environments of ``jax._src.clusters``);
  ``jax.distributed`` then finds the coordinator, process count and id by itself.

Otherwise nothing is started and the run is a single process.

Host-side helpers (all no-ops or plain numpy on a single process):

- :func:`put_global`: a global ``jax.Array`` from host data that is identical on every process;
  each process places only the shards its own devices hold.
- :func:`to_host`: a ``jax.Array`` as numpy on every process (gathered across processes when the
  array is sharded over devices of other processes).
- :func:`broadcast_json`: process 0's value of a small JSON-serialisable object, on every
  process (decisions such as "is this stage finished?" are made once, by process 0).
- :func:`barrier`, :func:`is_primary`, :func:`process_rows`, :func:`process_gather`, :func:`check_same`.

Every difference between JAX versions in these calls is handled in this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

log = logging.getLogger(__name__)

ENV_COORDINATOR = "METAJUDGE_COORDINATOR"
ENV_NUM_PROCESSES = "METAJUDGE_NUM_PROCESSES"
ENV_PROCESS_ID = "METAJUDGE_PROCESS_ID"
ENV_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)


class DistributedSetupError(ValueError):
    """The multi-process settings are incomplete or invalid; the message names what to fix.

    ``every_process``: raised by every process at the same point (a collective check such as
    :func:`check_same`), so the processes can leave through :func:`shutdown` together.
    """

    def __init__(self, message: str, *, every_process: bool = False):
        super().__init__(message)
        self.every_process = every_process


# ----------------------------------------------------------------------------------- start-up


def env_settings(environ: Optional[Mapping[str, str]] = None) -> Optional[tuple[str, int, int]]:
    """``(coordinator, num_processes, process_id)`` from the ``METAJUDGE_*`` variables, or ``None``
    when none is set. Raises :class:`DistributedSetupError` when only some are set or one is invalid."""
    env = os.environ if environ is None else environ
    values = {k: env.get(k, "").strip() for k in ENV_VARS}
    given = [k for k in ENV_VARS if values[k]]
    if not given:
        return None
    missing = [k for k in ENV_VARS if not values[k]]
    if missing:
        raise DistributedSetupError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: a multi-process run needs all of {', '.join(ENV_VARS)}"
        )
    coordinator = values[ENV_COORDINATOR]
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedSetupError(f"{ENV_COORDINATOR}={coordinator!r}: expected host:port of process 0, e.g. 10.0.0.2:8476")
    try:
        num, pid = int(values[ENV_NUM_PROCESSES]), int(values[ENV_PROCESS_ID])
    except ValueError:
        raise DistributedSetupError(
            f"{ENV_NUM_PROCESSES}={values[ENV_NUM_PROCESSES]!r} and {ENV_PROCESS_ID}={values[ENV_PROCESS_ID]!r} must be integers"
        ) from None
    if num < 1 or not 0 <= pid < num:
        raise DistributedSetupError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={num})")
    return coordinator, num, pid


def tpu_slice_process_count() -> int:
    """Hosts of the Cloud TPU slice this process runs on (1 off TPU and on single-host slices).

    Uses the TPU cluster environments through which ``jax.distributed.initialize()`` finds its
    settings (GKE: ``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES``; GCE: the VM's metadata).
    """
    try:
        from jax._src import cloud_tpu_init
        from jax._src.clusters import cloud_tpu_cluster
    except ImportError:  # a JAX without these internals: no automatic pod detection
        return 1
    if not getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
        return 1
    for name in ("GkeTpuCluster", "GceTpuCluster"):
        env = getattr(cloud_tpu_cluster, name, None)
        try:
            if env is not None and env.is_env_present():
                return int(env.get_process_count())
        except Exception as e:  # metadata server unreachable and the like: treat as one host
            log.warning("TPU slice detection through %s failed (%s); running as a single process", name, e)
            return 1
    return 1


def is_initialized() -> bool:
    """Whether ``jax.distributed`` has been started in this process."""
    fn = getattr(jax.distributed, "is_initialized", None)
    if fn is not None:
        return bool(fn())
    from jax._src import distributed as _dist  # JAX versions before is_initialized()

    return _dist.global_state.client is not None


def _use_gloo_on_cpu() -> None:
    """CPU collectives across processes go through gloo (the default in recent JAX; older ones need it set)."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):
        try:
            jax.config.update("jax_cpu_enable_gloo_collectives", True)
        except (AttributeError, KeyError, ValueError):
            log.warning("this JAX has no gloo CPU collectives; multi-process CPU runs may fail")


def initialize(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Starts ``jax.distributed`` when the run spans several processes (see the module doc).

    Must run before any JAX computation; returns whether this is a multi-process run. Calling it
    again (or after ``jax.distributed`` was started elsewhere) does nothing.
    """
    if is_initialized():
        return jax.process_count() > 1
    settings = env_settings(environ)
    if settings is None and tpu_slice_process_count() <= 1:
        return False
    try:
        if settings is not None:
            coordinator, num, pid = settings
            _use_gloo_on_cpu()
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
        else:
            jax.distributed.initialize()  # a TPU pod slice: jax finds coordinator, count and id
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise DistributedSetupError(
                "jax.distributed must start before any JAX computation or device query: "
                "call models.distributed.initialize() first (run_main does)"
            ) from None
        raise
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def shutdown() -> None:
    """Leaves ``jax.distributed`` at its shutdown barrier (every process must call it).

    For a failure that every process reaches at the same point: leaving one by one instead lets
    process 0 take the coordination service down while the others still poll it, and they are
    aborted (no exit code of their own)."""
    if is_initialized():
        jax.distributed.shutdown()


# ------------------------------------------------------------------------------ who does what


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """Process 0: the one that writes run outputs (reports, manifests, exported models)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier of the same ``name``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_json(obj: Any) -> Any:
    """Process 0's ``obj`` (JSON-serialisable, small) on every process; ``obj`` itself on one process.

    Every process must call it at the same point of the program (it is a collective). The bytes
    are padded to a power of two so that few distinct programs are compiled.
    """
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    data = json.dumps(obj).encode() if jax.process_index() == 0 else b""
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
    size = 1 << max(6, (n - 1).bit_length())
    buf = np.zeros((size,), np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return json.loads(out[:n].tobytes().decode())


def process_gather(values: Any) -> np.ndarray:
    """``[process_count, ...]``: every process's ``values`` (the same shape on each), in process order."""
    arr = np.asarray(values)
    if jax.process_count() == 1:
        return arr[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(arr))


# -------------------------------------------------------------------------------- host arrays


def put_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array with ``sharding`` from host data that is identical on every process.

    On one process this is ``jax.device_put``; on several, each process transfers only the slices
    its own devices hold (no cross-process equality check, no collective).
    """
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    arr = np.asarray(x)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def put_process_rows(local: Any, sharding: jax.sharding.Sharding, global_rows: int) -> jax.Array:
    """A global ``[global_rows, ...]`` array from this process's rows (:func:`process_rows`)."""
    local = np.asarray(local)
    if sharding.is_fully_addressable:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, (global_rows,) + local.shape[1:])


def to_host(x: Any) -> np.ndarray:
    """``x`` as a numpy array on every process.

    A ``jax.Array`` sharded over devices of several processes is gathered (every process must call
    this at the same point: it is a collective); a replicated one is read from a local copy. A
    ``jax.ShapeDtypeStruct`` (`models.executables.compile_only`: nothing ran) reads as zeros.
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        return np.zeros(x.shape, x.dtype)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def process_rows(sharding: jax.sharding.Sharding, rows: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of a ``[rows, ...]`` array with ``sharding`` that this process's
    devices hold; ``(0, rows)`` on a single process.

    Raises ``ValueError`` when they are not one contiguous block (a mesh whose devices are not
    grouped by process along the row axes).
    """
    if jax.process_count() == 1:
        return 0, rows
    spans = set()
    for idx in sharding.addressable_devices_indices_map((rows,)).values():
        s = idx[0] if idx else slice(None)
        start, stop, _ = s.indices(rows)
        spans.add((start, stop))
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    if sum(e - s for s, e in spans) != stop - start:
        raise ValueError(
            f"process {jax.process_index()} holds rows {sorted(spans)} of the batch, not one contiguous block; "
            "build the mesh with models.make_mesh, which groups devices by process"
        )
    return start, stop


def check_same(obj: Any, what: str) -> None:
    """Raises :class:`DistributedSetupError` unless every process passes an equal ``obj``
    (JSON-serialisable), e.g. the run's settings: processes started with different settings would
    otherwise wait on each other forever or disagree silently."""
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).digest()[:8]
    every = process_gather(np.frombuffer(digest, np.uint32))
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise DistributedSetupError(
            f"{what} differ between processes (process 0 vs {', '.join(map(str, differ))}): "
            "start every process with the same command line",
            every_process=True,
        )
