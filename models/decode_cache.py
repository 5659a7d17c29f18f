"""The decode-time KV cache (`_DecodeCache`): its layout and logical axes, taking rows of it (the
``n_samples`` expansion, a prefill group), growing it into the next capacity bucket, and attaching
a prompt prefix shared by every row, stored once.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from models.placement import _constrain_tree

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _DecodeCache:
    """The decode-time KV cache. Keys: ``[B, K, H, S]`` with XLA attention (``keys_last``), so
    ``q . k`` is a plain matmul (2x faster on XLA:CPU than contracting the minor axis of
    ``[B, K, S, H]``); ``[B, K, S, H]`` for the Pallas kernels. Values ``[B, K, S, H]``; ``pos``
    ``[B, S]`` (``-1``: empty or padding) and ``end`` as in `models.llama.KVCache`.

    ``prefix_k`` (``[K, H, P]``, or ``[K, P, H]`` for the Pallas kernels), ``prefix_v`` ``[K, P, H]``
    and ``prefix_pos`` ``[P]`` (empty lists and ``None`` without one) hold a prompt prefix shared
    by every row, stored once: every row attends to it before its own slots, which hold the rest of
    its tokens.
    """

    k: list[Array]
    v_bksh: list[Array]
    pos: Array
    end: Array
    keys_last: bool = dataclasses.field(default=True, metadata=dict(static=True))
    prefix_k: list[Array] = dataclasses.field(default_factory=list)
    prefix_v: list[Array] = dataclasses.field(default_factory=list)
    prefix_pos: Optional[Array] = None

    @property
    def capacity(self) -> int:
        return self.pos.shape[1]


def _cache_axes(cache: _DecodeCache) -> _DecodeCache:
    """Logical axes of every array of the cache: batch, then KV heads."""
    kv = ("batch", "act_kv_heads", "cache_length", None)
    kt = ("batch", "act_kv_heads", None, "cache_length") if cache.keys_last else kv
    return _DecodeCache(k=[kt] * len(cache.k), v_bksh=[kv] * len(cache.v_bksh), pos=("batch", "cache_length"), end=(),
                        keys_last=cache.keys_last, prefix_k=[("act_kv_heads", None, None)] * len(cache.prefix_k),
                        prefix_v=[("act_kv_heads", None, None)] * len(cache.prefix_v),
                        prefix_pos=None if cache.prefix_pos is None else (None,))


def _cache_rows(cache: _DecodeCache, src_r: Array) -> _DecodeCache:
    """Rows ``src_r`` of a cache (its shared prefix, if any, stays as it is)."""
    rows = lambda x: jnp.take(x, src_r, axis=0)
    return dataclasses.replace(cache, k=[rows(x) for x in cache.k], v_bksh=[rows(x) for x in cache.v_bksh], pos=rows(cache.pos))


def _grow_fn(ctx, capacity, cache):
    """The cache copied into ``capacity`` slots (new slots empty). Written with dynamic_update_slice
    into fresh buffers: XLA:CPU's ``pad`` is many times slower here."""

    def grow(x, axis, fill=0):
        shape = list(x.shape)
        shape[axis] = capacity
        return jax.lax.dynamic_update_slice(jnp.full(shape, fill, x.dtype), x, (0,) * x.ndim)

    cache = dataclasses.replace(
        cache, k=[grow(x, 3 if cache.keys_last else 2) for x in cache.k], v_bksh=[grow(x, 2) for x in cache.v_bksh],
        pos=grow(cache.pos, 1, -1),
    )
    return _constrain_tree(ctx, cache, _cache_axes(cache))


def _prefix_fn(ctx, rows: _DecodeCache, first: _DecodeCache) -> _DecodeCache:
    """The empty cache ``rows`` with the first row of the prefilled ``first`` as its shared prefix."""
    cache = dataclasses.replace(rows, prefix_k=[x[0] for x in first.k], prefix_v=[x[0] for x in first.v_bksh],
                                prefix_pos=first.pos[0])
    return _constrain_tree(ctx, cache, _cache_axes(cache))
