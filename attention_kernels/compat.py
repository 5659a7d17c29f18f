"""Pallas API differences between JAX versions, kept in one place.

The kernels import Pallas names only through this module, so a JAX upgrade that renames a class
(``TPUCompilerParams`` -> ``CompilerParams``, ``TritonCompilerParams`` -> ``triton.CompilerParams``)
or a memory space is one edit here. Supported range: the ``jax>=0.6.1,<0.12`` pin of ``setup.py``;
the code paths were run on JAX 0.10.

Backends, by the name the kernels use:

- ``"tpu"``: Mosaic TPU (``jax.experimental.pallas.tpu``): a grid over KV blocks, accumulators in
  VMEM scratch, the block mask in SMEM through scalar prefetch.
- ``"gpu"``: Triton (``jax.experimental.pallas.triton``): one program per query block, a loop over
  KV blocks inside the kernel. See ``attention_kernels/flash_attention.py`` for why Triton and not Mosaic GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional, Sequence

import jax

try:  # Mosaic TPU is importable on every jaxlib (it lowers without a TPU attached).
    from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover - very old or stripped jaxlib
    pltpu = None

try:
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - JAX < 0.5 kept Triton names under pallas.gpu
    try:
        from jax.experimental.pallas import gpu as pltriton
    except ImportError:
        pltriton = None

BACKENDS = ("tpu", "gpu")


_TARGET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("attention_kernels_target", default=None)


def _platform_name(p: str) -> str:
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def platform(mesh: Any = None) -> str:
    """The platform the kernels are built for: ``"tpu"``, ``"gpu"`` (CUDA or ROCm) or ``"cpu"``.

    That of ``mesh``'s devices when a mesh is given (a mesh over TPU devices described by
    ``jax.experimental.topologies`` on a CPU host: compiling ahead of time for a TPU), else the one
    set by an enclosing :func:`compiling_for`, else the default backend's."""
    devices = getattr(mesh, "devices", None)
    if devices is not None and getattr(devices, "size", 0):
        return _platform_name(devices.flat[0].platform)
    return _TARGET.get() or _platform_name(jax.default_backend())


@contextlib.contextmanager
def compiling_for(platform_name: str) -> Iterator[None]:
    """Within the block, :func:`platform` is ``platform_name``: the kernels traced there are built
    (and checked) for that platform whatever the host is. ``dispatch.sharded_attention`` enters it
    with its mesh's platform, so a program jitted for a TPU mesh gets Mosaic kernels, never the
    interpreter."""
    token = _TARGET.set(_platform_name(platform_name))
    try:
        yield
    finally:
        _TARGET.reset(token)


def resolve_backend(backend: Optional[str]) -> str:
    """The kernel family to build: the explicit choice, else the target platform's, else ``"tpu"``.

    On CPU (interpret mode) the TPU family is the default because it exercises scalar prefetch
    and the grid-carried accumulators; tests run both families.
    """
    if backend is None:
        p = platform()
        backend = p if p in BACKENDS else "tpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    return backend


def resolve_interpret(interpret: Optional[bool]) -> bool:
    """``None`` means interpret exactly when the target platform has no accelerator."""
    return platform() not in BACKENDS if interpret is None else bool(interpret)


def check_runnable(backend: str, interpret: bool) -> None:
    if interpret:
        return
    if platform() != backend:
        raise ValueError(
            f"the {backend!r} kernels need a {backend.upper()} (target platform is {platform()!r}); "
            "pass interpret=True to run them in the Pallas interpreter"
        )


# ------------------------------------------------------------------------------------ Mosaic TPU


def tpu_compiler_params(dimension_semantics: Sequence[str], vmem_limit_bytes: Optional[int] = None) -> Any:
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    kwargs: dict[str, Any] = {"dimension_semantics": tuple(dimension_semantics)}
    if vmem_limit_bytes is not None:
        kwargs["vmem_limit_bytes"] = vmem_limit_bytes
    return cls(**kwargs)


def vmem(shape: tuple[int, ...], dtype: Any) -> Any:
    """A VMEM scratch buffer."""
    space = getattr(pltpu, "VMEM", None)
    if space is None:  # pragma: no cover - older spelling
        space = pltpu.TPUMemorySpace.VMEM
    return space(shape, dtype)


def prefetch_grid_spec(num_scalar_prefetch: int, grid, in_specs, out_specs, scratch_shapes=()) -> Any:
    """A grid spec whose first ``num_scalar_prefetch`` operands live in SMEM and feed index maps."""
    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=num_scalar_prefetch,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch_shapes,
    )


# ------------------------------------------------------------------------------------ Triton GPU


def triton_compiler_params(num_warps: Optional[int], num_stages: Optional[int]) -> Any:
    cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def out_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
    """A ``pallas_call`` output type. Inside ``shard_map`` (``check_vma=True``) an output must say
    over which manual mesh axes it varies: the union of those of ``like`` (its inputs). JAX 0.10
    spells that ``manual_axis_type``; JAX 0.7-0.9 spelled it ``vma``."""
    avals = [jax.typeof(x) for x in like]
    mats = [getattr(a, "manual_axis_type", None) for a in avals]
    if mats and all(m is not None and hasattr(m, "varying") for m in mats):
        varying = frozenset().union(*(m.varying for m in mats))
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=type(mats[0])(varying=varying))
    vmas = [getattr(a, "vma", None) for a in avals]
    if vmas and all(v is not None for v in vmas):
        return jax.ShapeDtypeStruct(shape, dtype, vma=frozenset().union(*vmas))
    return jax.ShapeDtypeStruct(shape, dtype)


def lower_for(fn, *args, platform_name: str, tpu_kind: str = "TPU v5 lite"):
    """Lowers ``jax.jit(fn)(*args)`` (compiled kernels, not interpreted) for ``"tpu"`` or
    ``"cuda"`` on a machine without that device: runs the Pallas Mosaic/Triton lowering rules
    (block shapes, supported ops) but not the device compiler. TPU lowering reads the chip
    generation from an abstract device, ``tpu_kind``."""
    with compiling_for(platform_name):
        traced = jax.jit(fn).trace(*args)
        if platform_name != "tpu":
            return traced.lower(lowering_platforms=(platform_name,))
        device = jax.sharding.AbstractDevice(device_kind=tpu_kind, num_cores=1, platform="tpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))


def shard_map(fn, mesh, in_specs, out_specs, *, interpret: bool):
    """``jax.shard_map`` (``jax.experimental.shard_map`` before JAX 0.7) around a Pallas call.

    The Pallas interpreter of JAX 0.10 mixes manual-axis-varying and invariant values in its
    dynamic slices, so interpret mode runs with the varying-axes check off; compiled kernels
    declare their outputs' varying axes (`out_struct`) and keep it on.
    """
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=not interpret)
    from jax.experimental.shard_map import shard_map as _legacy  # pragma: no cover - older JAX

    return _legacy(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=not interpret)

