"""Logical axis names, the rules that map them to mesh axes, and mesh helpers.

Every parameter of the model carries a tuple of *logical* axis names in its metadata
(``logical_axes``), e.g. ``('embed', 'heads', 'head_dim')`` for the query projection. One rule
table maps logical names to the mesh axes ``data``, ``fsdp`` and ``tensor``; changing the
parallelism is an edit of that table or of the mesh shape, never of the model.

A logical axis whose size is not divisible by the mesh axes it maps to is replicated instead
(SmolLM2's 3 KV heads on ``tensor=2``, say), so every model runs on every mesh.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attention_kernels import compat

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
_PARAMETER_RULES: Mapping[str, Any] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}
_ACTIVATION_RULES: Mapping[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    # The residual stream between decoder blocks (what remat keeps per layer for the backward pass)
    # is split over the sequence on the tensor axis: each tensor shard holds 1/tensor of it instead of
    # a replica (sequence parallelism; the blocks gather it back where they need whole rows).
    "residual_length": "tensor",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_length": None,
}
DEFAULT_RULES: Mapping[str, Any] = {**_PARAMETER_RULES, **_ACTIVATION_RULES}


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh from a spec such as ``"data=2,fsdp=2,tensor=2"``.

    Missing axes have size 1; one axis may be ``-1`` to take all remaining devices. With no spec
    every device goes to ``fsdp``. On a multi-process run the default devices are all processes'
    devices, grouped by process, so each process holds one contiguous block of the batch rows.
    """
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id)) if jax.process_count() > 1 else jax.devices()
    devices = list(devices)
    if spec is None:
        sizes = {"data": 1, "fsdp": -1, "tensor": 1}
    elif isinstance(spec, str):
        sizes = {"data": 1, "fsdp": 1, "tensor": 1}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in MESH_AXES or not value.strip().lstrip("-").isdigit():
                raise ValueError(
                    f"bad mesh spec {spec!r}: expected comma-separated axis=size with axes "
                    f"{MESH_AXES}, e.g. 'data=2,fsdp=2,tensor=2' (one size may be -1)"
                )
            sizes[name] = int(value)
    else:
        sizes = {"data": 1, "fsdp": 1, "tensor": 1, **dict(spec)}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"bad mesh spec {spec!r}: at most one axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"mesh {spec!r}: {len(devices)} devices are not divisible by {known}")
        sizes[fill[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(
            f"mesh {spec!r} needs {total} devices but {len(devices)} are available; "
            "use -1 for one axis to fill the rest"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def data_parallel_size(mesh: Optional[Mesh]) -> int:
    """How many ways a batch's rows are split: the product of the mesh's ``data`` and ``fsdp`` axes
    (the ``batch`` rule), 1 without a mesh. Batch sizes must be multiples of it."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def compiler_options(mesh: Optional[Mesh], *, windowed_einsum: bool = True) -> Optional[dict[str, Any]]:
    """XLA options for a program compiled over ``mesh`` (``jax.jit(..., compiler_options=...)``).

    ``windowed_einsum=False`` stops the TPU compiler from splitting the all-gather in front of a
    sharded matmul into a loop overlapped with it (windowed einsum, or collective matmul): that
    loop writes into an output buffer allocated ahead of it, and in a rematerialized backward pass
    the buffers of every layer still to come are allocated at once. The price is the overlap of
    those all-gathers with compute. None (the compiler's defaults) off TPU or when nothing is changed.
    """
    if windowed_einsum or mesh is None or compat.platform(mesh) != "tpu":
        return None
    return {"xla_tpu_enable_windowed_einsum_for_all_gather": False}


def _mesh_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int] | None,
    mesh: Mesh,
    rules: Mapping[str, Any] = DEFAULT_RULES,
) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec`` on ``mesh``.

    A dimension that does not divide evenly by its mesh axes, or whose mesh axes are already used
    by an earlier dimension, is replicated.
    """
    if not logical_axes:
        return PartitionSpec()
    used: set[str] = set()
    out: list[Any] = []
    for i, name in enumerate(logical_axes):
        axes = rules.get(name) if name is not None else None
        if axes is not None:
            tup = (axes,) if isinstance(axes, str) else tuple(axes)
            tup = tuple(a for a in tup if mesh.shape.get(a, 1) > 1 and a not in used)
            size = _mesh_size(mesh, tup)
            if not tup or (shape is not None and shape[i] % size):
                axes = None
            else:
                used.update(tup)
                axes = tup[0] if len(tup) == 1 else tup
        out.append(axes)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    """A mesh plus rules; hashable so it can sit on a module as static data."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...] = tuple(DEFAULT_RULES.items())
    # Gather a layer's weights no earlier than the layer before it starts (`models.llama.Llama`):
    # left free, the compiler may gather every layer's weights at the start of the program.
    weights_layer_by_layer: bool = False

    @property
    def rule_map(self) -> dict[str, Any]:
        return dict(self.rules)

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, logical_to_spec(logical_axes, shape, self.mesh, self.rule_map))

    def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes, x.shape))

    def rows_only(self) -> "ShardingContext":
        """The same mesh and parameter rules, with activations split by rows alone: ``batch`` over
        every mesh axis, all other activation axes whole on each device. A forward under it gathers
        each layer's weights where tensor parallelism would gather and scatter activations: the
        cheaper traffic for a long forward over many rows (`models.placement.forward_shard`)."""
        rules = {k: (None if k in _ACTIVATION_RULES else v) for k, v in self.rules}
        rules["batch"] = tuple(a for a in MESH_AXES if a in self.mesh.shape)
        return ShardingContext(self.mesh, tuple(rules.items()), weights_layer_by_layer=True)

    def shards(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> int:
        """How many pieces an array of ``shape`` with these axes is split into (each device holds
        ``1/shards`` of it)."""
        spec = logical_to_spec(logical_axes, shape, self.mesh, self.rule_map)
        return math.prod(_mesh_size(self.mesh, axes) for axes in spec)


def constrain(ctx: ShardingContext | None, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation; a no-op without a mesh."""
    return x if ctx is None else ctx.constrain(x, logical_axes)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, ctx: ShardingContext | None) -> Any:
    """The ``NamedSharding`` of every variable in an NNX state (from its ``logical_axes``)."""
    if ctx is None:
        return None

    def one(v):
        axes = v.get_metadata().get("logical_axes")
        return v.replace(ctx.sharding(axes, v.value.shape))

    return jax.tree.map(one, state, is_leaf=_is_var)


def logical_axes_tree(state: Any) -> Any:
    """The ``logical_axes`` metadata of every variable in an NNX state."""
    return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), state, is_leaf=_is_var)
