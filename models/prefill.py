"""Prefilling prompts into the decode cache: a prefix shared by every prompt prefilled once and kept
once, the rest in groups of similar length (`_length_groups`), each padded to its own prompt bucket
and run in chunks for long prompts. `_prefill` returns the cache, each prompt's last hidden state and
the number of cache slots filled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_kernels.dispatch import resolve_impl
from models.buckets import Buckets, _prompt_bucket, bucket
from models.decode_cache import _DecodeCache, _cache_axes, _cache_rows, _prefix_fn
from models.decode_forward import _forward
from models.distributed import to_host
from models.executables import _run
from models.placement import _batch_multiple, _constrain_tree, _full, _put, _shard_ctx


def _prefill_fn(graphdef, state, cache, tokens_bt, seg_bt, pos_bt, last_b, h_last, rows_g=None, start=None):
    """One prefill chunk; keeps the hidden state of each row's last prompt token.

    With ``rows_g`` (a group of rows of a length-grouped prefill), the chunk is rows ``rows_g`` of the
    cache, written from slot ``start``; ``last_b`` is then per row of the group.
    """
    model = nnx.merge(graphdef, state)
    full = cache
    if rows_g is not None:
        cache = dataclasses.replace(_cache_rows(cache, rows_g), end=start)
    start = cache.end
    h, cache = _forward(model, cache, tokens_bt, pos_bt, seg_bt)
    idx = last_b - start
    here = (idx >= 0) & (idx < tokens_bt.shape[1])
    picked = jnp.take_along_axis(h, jnp.clip(idx, 0, tokens_bt.shape[1] - 1)[:, None, None], axis=1)[:, 0]
    if rows_g is None:
        h_last = jnp.where(here[:, None], picked, h_last)
    else:
        put = lambda x, y: x.at[rows_g].set(y, unique_indices=True)
        h_last = put(h_last, jnp.where(here[:, None], picked, h_last[rows_g]))
        cache = dataclasses.replace(full, k=[put(x, y) for x, y in zip(full.k, cache.k)],
                                    v_bksh=[put(x, y) for x, y in zip(full.v_bksh, cache.v_bksh)],
                                    pos=put(full.pos, cache.pos), end=jnp.maximum(full.end, cache.end))
    cache = _constrain_tree(_shard_ctx(model), cache, _cache_axes(cache))
    return cache, h_last


def _shared_prefix(prompts: list[list[int]]) -> int:
    first, n = prompts[0], min(map(len, prompts))
    for other in prompts[1:]:
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return n


def _length_groups(lens: Sequence[int], mult: int, buckets: Buckets) -> list[np.ndarray]:
    """Rows of a prefill split into equal groups by length, each to be padded to its own bucket.

    Rows are sorted by length and cut into groups of ``rows / 2**j`` rows (a multiple of ``mult``);
    the split with the fewest padded token slots wins, a call costing at least
    ``buckets.prefill_group_tokens`` slots (small calls run matmuls below their rate). Empty rows
    (batch padding) need no prefill: groups of them are dropped. One group keeps the rows' order.
    """
    lens = np.asarray(lens)
    rows, order = len(lens), np.argsort(-lens, kind="stable")
    best, best_cost, g = [np.arange(rows)], None, rows
    while g >= 1 and g % mult == 0 and rows % g == 0 and rows // g <= buckets.max_prefill_groups:
        groups = [order[i : i + g] for i in range(0, rows, g)] if g < rows else [np.arange(rows)]
        groups = [x for x in groups if lens[x].max() > 0] or groups[:1]
        cost = sum(max(g * _prompt_bucket(int(lens[x].max()), buckets), buckets.prefill_group_tokens) for x in groups)
        if best_cost is None or cost < best_cost:
            best, best_cost = groups, cost
        g //= 2
    return best


def _prefill_part(model, graphdef, state, cache, h_last, parts: list[list[int]], first_pos: int, pad: int, buckets: Buckets):
    """Prefills ``parts`` (row ``i`` at positions ``first_pos + j``) from slot ``cache.end``.

    Rows are prefilled in groups of similar length (`_length_groups`), each right-padded to its own
    bucket, so a few long prompts do not make every row pay for their length. ``h_last`` keeps, per
    row, the hidden state of the row's last token in this call. Returns ``(cache, h_last, end)``:
    ``end`` (a host int) is the slot after the widest group, where ``cache.end`` now stands.
    """
    ctx = _shard_ctx(model)
    rows = cache.pos.shape[0]
    lens = np.zeros((rows,), np.int32)
    lens[: len(parts)] = [len(p) for p in parts]
    start = int(to_host(cache.end))
    groups = _length_groups(lens, _batch_multiple(ctx), buckets)
    end = start
    for group in groups:  # each group's call leaves ``cache.end`` at the widest group's end so far
        g = len(group)
        width = _prompt_bucket(int(lens[group].max()), buckets)
        end = max(end, start + width)
        # Attention scores [rows, N, chunk, capacity] in float32 stay under ~1 GiB on each device.
        heads = model.config.num_heads
        split = 1 if ctx is None else ctx.shards(("batch", "act_heads"), (g, heads))
        limit = max(16, (1 << 28) * split // (g * heads * cache.capacity))
        chunk = width if width <= min(limit, buckets.prefill_chunk) else math.gcd(width, 1 << int(math.log2(min(limit, buckets.prefill_chunk))))
        tokens = np.full((g, width), pad, np.int32)
        seg = np.zeros((g, width), np.int32)
        for j, i in enumerate(group):
            if i < len(parts):
                tokens[j, : lens[i]], seg[j, : lens[i]] = parts[i], 1
        positions = np.broadcast_to(first_pos + np.arange(width, dtype=np.int32), (g, width))
        last = np.where(lens[group] > 0, start + lens[group] - 1, -1).astype(np.int32)  # slot of each row's last token
        last = _put(ctx, last, ("batch",))
        extra = () if g == rows else (_put(ctx, group.astype(np.int32), ("batch",)),)
        for s in range(0, width, chunk):
            sl = lambda a: _put(ctx, a[:, s : s + chunk], ("batch", "length"))
            at = () if not extra else (_put(ctx, np.int32(start + s), ()),)
            cache, h_last = _run("prefill", _prefill_fn, (graphdef,), (state, cache, sl(tokens), sl(seg), sl(positions), last, h_last) + extra + at,
                                 donate=(1, 6), desc=f"batch {g} of {rows}, chunk {chunk}, capacity {cache.capacity}")
    return cache, h_last, end


def _prefill(model, graphdef, state, prompts: list[list[int]], bp: int, pad: int, buckets: Buckets):
    """The prompts' KV cache ``[bp, ...]``, the hidden state of each prompt's last token, and the
    number of the rows' cache slots filled (a host int, the value of the cache's ``end``).

    A prefix shared by every prompt (a system prompt, a judge's rubric) of at least
    ``buckets.min_shared_prefix`` tokens is prefilled once and stays in the cache once, as its
    shared prefix; the rows' slots hold only the rest.
    """
    c, ctx = model.config, _shard_ctx(model)
    shared = min(_shared_prefix(prompts), min(map(len, prompts)) - 1) if len(prompts) > 1 else 0
    shared = shared if shared >= buckets.min_shared_prefix else 0
    head = _prompt_bucket(shared, buckets) if shared else 0
    keys_last = resolve_impl(c.attention_impl, ctx.mesh if ctx is not None else None) == "xla"
    rest = _prompt_bucket(max(map(len, prompts)) - shared, buckets) + 1
    capacity = bucket(rest, buckets.min_capacity, buckets.capacity_steps)
    new_h = lambda rows: _full(ctx, (rows, c.hidden_size), 0, c.dtype, ("batch", "act_embed"))

    def new_cache(rows, capacity):
        dt, kh, hd, layers = jnp.dtype(c.dtype), c.num_kv_heads, c.head_dim, c.num_layers
        kv = ("batch", "act_kv_heads", "cache_length", None)
        kt, k_shape = (("batch", "act_kv_heads", None, "cache_length"), (rows, kh, hd, capacity)) if keys_last else (kv, (rows, kh, capacity, hd))
        return _DecodeCache(
            k=[_full(ctx, k_shape, 0, dt, kt) for _ in range(layers)],
            v_bksh=[_full(ctx, (rows, kh, capacity, hd), 0, dt, kv) for _ in range(layers)],
            pos=_full(ctx, (rows, capacity), -1, jnp.int32, ("batch", "cache_length")), end=_full(ctx, (), 0, jnp.int32, ()),
            keys_last=keys_last,
        )

    if not shared:
        cache = new_cache(bp, capacity)
    else:
        one = _batch_multiple(ctx)
        first, _, _ = _prefill_part(model, graphdef, state, new_cache(one, head), new_h(one), [prompts[0][:shared]], 0, pad, buckets)
        cache = _run("prefix", _prefix_fn, (ctx,), (new_cache(bp, capacity), first), donate=(0, 1),
                     desc=f"{bp} rows of capacity {capacity} after a shared prefix of {head} slots")
    return _prefill_part(model, graphdef, state, cache, new_h(bp), [p[shared:] for p in prompts], shared, pad, buckets)
