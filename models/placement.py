"""Where the sampler's and scorer's arrays live on a mesh: the model's sharding context, the batch
multiple a mesh needs, sharding constraints on pytrees, host inputs placed as global arrays, and
constants created in place with their sharding. Without a mesh (``ctx is None``) these are plain
``jnp`` arrays; under `models.executables.compile_only` they are ``jax.ShapeDtypeStruct``s with the
sharding they would have.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from models.distributed import put_global
from models.executables import compiling_only
from models.llama import Llama
from models.sharding import ShardingContext, data_parallel_size

Array = jax.Array


def _shard_ctx(model: Llama) -> Optional[ShardingContext]:
    return getattr(model, "shard", None)


def _batch_multiple(ctx: Optional[ShardingContext]) -> int:
    return data_parallel_size(None if ctx is None else ctx.mesh)


def forward_shard(model: Llama, rows: int, tokens: int) -> Optional[ShardingContext]:
    """The layout of one cache-free forward over ``rows`` sequences of ``tokens`` (the scorer's):
    the model's own, or its `ShardingContext.rows_only` when that moves fewer bytes.

    With tensor parallelism each layer gathers the residual of its rows twice and scatters it
    twice, about ``4·L·(rows/dp)·tokens·D`` elements per device (dp: the data-parallel size);
    with rows alone it gathers the layer's weights, about ``P`` elements (all parameters). Rows
    alone is taken when ``P`` is the smaller and ``rows`` divides over every device: for an 8B
    model (P = 8.0e9, L = 32, D = 4,096) on 32 chips with ``tensor=4``, 512 rows of 2,560 tokens
    move 86e9 elements the first way and 8e9 the second.
    """
    ctx = _shard_ctx(model)
    if ctx is None or ctx.mesh.shape.get("tensor", 1) == 1 or rows % ctx.mesh.size:
        return ctx
    c = model.config
    activations = 4 * c.num_layers * (rows // data_parallel_size(ctx.mesh)) * tokens * c.hidden_size
    return ctx.rows_only() if c.num_params < activations else ctx


def _constrain_tree(ctx: Optional[ShardingContext], tree: Any, axes: Any) -> Any:
    if ctx is None:
        return tree
    return jax.tree.map(ctx.constrain, tree, axes)


def _placed_shape(ctx: Optional[ShardingContext], shape: tuple, dtype: Any, axes: tuple) -> jax.ShapeDtypeStruct:
    """What `_put` or `_full` would make, as a ``ShapeDtypeStruct`` (`models.executables.compile_only`)."""
    shape = tuple(shape)
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=None if ctx is None else ctx.sharding(axes, shape))


def _put(ctx: Optional[ShardingContext], x: Any, axes: tuple) -> Array:
    """Host data (the same on every process) as an array laid out by ``axes`` on the mesh."""
    if compiling_only():
        x = np.asarray(x)
        return _placed_shape(ctx, x.shape, x.dtype, axes)
    if ctx is None:
        return jnp.asarray(x)
    x = np.asarray(x)
    return put_global(x, ctx.sharding(axes, x.shape))


@functools.lru_cache(maxsize=64)
def _full_fn(shape: tuple, fill: Any, dtype: Any, sharding: Any):
    return jax.jit(lambda: jnp.full(shape, fill, dtype), out_shardings=sharding)


def _full(ctx: Optional[ShardingContext], shape: tuple, fill: Any, dtype: Any, axes: tuple) -> Array:
    """A constant array created in place with its sharding (never whole on one device first)."""
    if compiling_only():
        return _placed_shape(ctx, shape, dtype, axes)
    if ctx is None:
        return jnp.full(shape, fill, dtype)
    return _full_fn(tuple(shape), fill, jnp.dtype(dtype), ctx.sharding(axes, shape))()
