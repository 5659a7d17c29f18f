"""Batched sampling and scoring for `Llama`: prefill once, decode inside one jitted loop.

``generate`` turns token prompts into sampled continuations, ``score`` sums the log-probs of given
responses, ``generate_text`` goes from chat messages to strings for the roles.

How a call runs (the measurements behind each choice are in the docstrings):

1. Prompts are right-padded to a *prompt bucket* and prefilled into a preallocated KV cache, in
   chunks for long prompts, and in groups of similar length so that a few long prompts do not pad
   every row to their bucket. Padding slots hold position ``-1`` and are masked, so rows of
   different lengths share one write index. A prefix shared by all prompts (a system prompt, a
   judge's rubric) is prefilled once and kept once in the cache: every row attends to it with one
   matmul per KV head, and the rows' slots hold only the rest. Only each prompt's last hidden state
   goes through the LM head.
2. The prefill rows are gathered to ``B * n_samples`` decode rows (one prefill per prompt, however
   many samples), and every row's first token is sampled.
3. Decoding runs inside one ``lax.while_loop`` per *capacity bucket*: the cache holds only as many
   slots as the current bucket, so attention reads the filled part and at most the rest of the
   bucket. When the bucket is full the cache is copied into the next one and the loop resumes; it
   exits as soon as every row has produced a stop id. Cache and row buffers are donated.
4. Every shape is rounded up to a bucket (batch, prompt length, capacity, output length, stop-id
   count), so compilations stay bounded; each one is logged with ``logging.info``.

Prefill and decode share `_forward`, the computation of ``Llama.hidden_states`` on 2-D weights,
with keys cached transposed (``[B, K, H, S]``) so both attention products are plain batched
matmuls, and the LM head as one matmul. Prefill runs on views of the parameters (no copy). On CPU
the decode loop runs feature-major, on transposed copies of the weights made once per model
(`_DecodeWeights`); elsewhere it uses the views. ``score`` uses the model's own forward. Tests
check both layouts against a plain forward and against Hugging Face.

On a mesh spanning several processes (``models.distributed``) every process calls these functions
with the same inputs, SPMD: host inputs become global arrays of which each process places only its
own devices' rows, and the outputs are gathered so that every process returns the same results.

Sampling semantics: temperature 0 is greedy (lowest id among ties). Otherwise logits are divided by
the temperature, then top-k keeps the ``k`` largest (ties with the k-th kept), then top-p keeps the
smallest set of most likely tokens whose renormalized mass reaches ``top_p`` (ties kept), and a
token is drawn by inverse CDF with one uniform per row and step. Each row's randomness is
``fold_in(fold_in(rng, row_id), step)``, so results depend only on the inputs and ``rng``, not on
batch composition or bucketing. ``logprobs`` are those of the sampled tokens under the model's own
distribution (temperature 1, no truncation), the quantity ``score`` returns.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
import weakref
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.distributed import put_global, to_host
from attention_kernels.dispatch import merge_attention, resolve_impl
from models.llama import Llama, rope_inv_freq, rope_tables, rotate_halves
from models.sharding import ShardingContext, constrain

log = logging.getLogger(__name__)

Array = jax.Array
_NEG = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """How sizes round up to static shapes. ``*_steps``: bucket values per doubling (1 = powers of 2)."""

    batch_steps: int = 2  # 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, ...
    min_prompt: int = 16
    prompt_steps: int = 4  # 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ...
    prefill_chunk: int = 512  # longer prompts are prefilled in chunks of this many tokens
    min_capacity: int = 32
    capacity_steps: int = 2  # KV-cache capacities: 32, 48, 64, 96, 128, 192, 256, ...
    min_new: int = 16
    min_stop_ids: int = 4
    min_shared_prefix: int = 16  # a prefix common to all prompts of at least this many tokens is prefilled once
    prefill_group_tokens: int = 256  # prefill rows in length groups; a call costs at least this many token slots
    max_prefill_groups: int = 8


DEFAULT_BUCKETS = Buckets()


def bucket(n: int, minimum: int = 1, steps: int = 1) -> int:
    """Smallest ``m * 2**e >= max(n, minimum)`` with ``steps <= m < 2 * steps``."""
    n = max(int(n), int(minimum), 1)
    if n <= steps:
        return n
    e = max(0, math.ceil(math.log2(n / steps)) - 1)
    while True:
        for m in range(steps, 2 * steps):
            if m << e >= n:
                return m << e
        e += 1


# -------------------------------------------------------------------------- compiled functions

_EXECUTABLES: dict[tuple, Any] = {}


def _run(name: str, fn, static: tuple, args: tuple, donate: tuple[int, ...] = (), desc: str = ""):
    """Calls ``fn(*static, *args)`` compiled ahead of time once per (static, shapes, shardings)."""
    leaves, treedef = jax.tree.flatten(args)
    sig = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)
    key = (name, static, treedef, sig)
    exe = _EXECUTABLES.get(key)
    if exe is None:
        t0 = time.perf_counter()
        exe = jax.jit(functools.partial(fn, *static), donate_argnums=donate).lower(*args).compile()
        log.info("sampler: compiled %s (%s) in %.1fs; %d compilations so far", name, desc, time.perf_counter() - t0, len(_EXECUTABLES) + 1)
        _EXECUTABLES[key] = exe
    return exe(*args)


def compilation_count() -> int:
    """How many sampler executables have been compiled in this process."""
    return len(_EXECUTABLES)


# --------------------------------------------------------------------------------- sharding


def _shard_ctx(model: Llama) -> Optional[ShardingContext]:
    return getattr(model, "shard", None)


def _batch_multiple(ctx: Optional[ShardingContext]) -> int:
    return 1 if ctx is None else ctx.mesh.shape["data"] * ctx.mesh.shape["fsdp"]


def _constrain_tree(ctx: Optional[ShardingContext], tree: Any, axes: Any) -> Any:
    if ctx is None:
        return tree
    return jax.tree.map(ctx.constrain, tree, axes)


def _put(ctx: Optional[ShardingContext], x: Any, axes: tuple) -> Array:
    """Host data (the same on every process) as an array laid out by ``axes`` on the mesh."""
    if ctx is None:
        return jnp.asarray(x)
    x = np.asarray(x)
    return put_global(x, ctx.sharding(axes, x.shape))


@functools.lru_cache(maxsize=64)
def _full_fn(shape: tuple, fill: Any, dtype: Any, sharding: Any):
    return jax.jit(lambda: jnp.full(shape, fill, dtype), out_shardings=sharding)


def _full(ctx: Optional[ShardingContext], shape: tuple, fill: Any, dtype: Any, axes: tuple) -> Array:
    """A constant array created in place with its sharding (never whole on one device first)."""
    if ctx is None:
        return jnp.full(shape, fill, dtype)
    return _full_fn(tuple(shape), fill, jnp.dtype(dtype), ctx.sharding(axes, shape))()


# ------------------------------------------------------------------------------ decode forward


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _DecodeWeights:
    """The weights a decode step multiplies by, in the layout it runs in.

    Row-major (accelerators): activations are ``[B*T, D]`` rows and every projection is ``x @ W``
    on a 2-D view of the model's ``[in, out]`` parameter (``layers`` is empty: views need no copy);
    ``head`` is ``[D, V]`` (a tied embedding's transposed copy).

    Feature-major (CPU): activations are ``[D, B]`` columns and every projection is ``W^T @ x``
    with ``W^T`` a transposed ``[out, in]`` copy in ``layers`` (keys ``q k v o gate up down``);
    ``head`` is ``[V, D]`` (a tied embedding itself). XLA:CPU's matmul is faster with the big
    weight as the left operand: on a 2-core AVX2 machine, SmolLM2's ``[576, 1536]`` projections ran
    at 148 vs 135 GFLOP/s for 64 rows and 99 vs 57 for 16, and the whole decode step went from 190 to
    178 ms at batch 64 (with the logits' reductions, see `_sample`). The cost is one extra copy of
    the weights while the model lives, which is why accelerators keep the row-major views.
    """

    head: Array
    layers: list[dict[str, Array]]
    feature_major: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def vocab_axis(self) -> int:
        """The vocabulary axis of the logits `_logits` makes with these weights."""
        return 0 if self.feature_major else 1


def _feature_major(model: Llama) -> bool:
    """Whether decoding runs feature-major: on CPU, unless ``_FEATURE_MAJOR`` says otherwise."""
    if _FEATURE_MAJOR is not None:
        return _FEATURE_MAJOR
    return all(d.platform == "cpu" for d in model.embedding_vd[...].devices())


_FEATURE_MAJOR: Optional[bool] = None  # None: by platform; tests set it to run both layouts


def _views(model: Llama, blk) -> dict[str, Array]:
    """A layer's projections as 2-D ``[in, out]`` views of its parameters (no copy)."""
    c, a, m = model.config, blk.attn, blk.mlp
    d, nh = c.hidden_size, c.num_heads * c.head_dim
    w2 = lambda p, rows: p[...].reshape(rows, -1)
    return dict(q=w2(a.q_proj_dnh, d), k=w2(a.k_proj_dkh, d), v=w2(a.v_proj_dkh, d), o=w2(a.o_proj_nhd, nh),
                gate=w2(m.gate_proj_df, d), up=w2(m.up_proj_df, d), down=w2(m.down_proj_fd, c.intermediate_size))


def _decode_weights_fn(graphdef, feature_major: bool, state) -> _DecodeWeights:
    """The copies `_DecodeWeights` needs (a tied embedding's own ``[V, D]`` is added by the caller)."""
    model = nnx.merge(graphdef, state)
    if not feature_major:  # only a tied head needs a copy
        return _DecodeWeights(head=model.embedding_vd[...].T, layers=[], feature_major=False)
    layers = [{name: w.T for name, w in _views(model, blk).items()} for blk in model.layers]
    head = None if model.config.tie_word_embeddings else model.lm_head_dv[...].T
    return _DecodeWeights(head=head, layers=layers, feature_major=True)


_WEIGHTS_CACHE: list = []  # [(weakrefs to the state's arrays, their _DecodeWeights)]: the last model's only


def _decode_weights(model: Llama, graphdef, state) -> _DecodeWeights:
    """The decode weights of ``model``; copies are made once and kept while its parameters live."""
    fm = _feature_major(model)
    leaves = jax.tree.leaves(state)
    if _WEIGHTS_CACHE:
        refs, weights = _WEIGHTS_CACHE[0]
        if weights.feature_major == fm and len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
            return weights
    _WEIGHTS_CACHE.clear()  # frees the previous copies before making new ones
    tied = model.config.tie_word_embeddings
    if not fm and not tied:
        weights = _DecodeWeights(head=model.lm_head_dv[...], layers=[], feature_major=False)
    else:
        weights = _run("decode_weights", _decode_weights_fn, (graphdef, fm), (state,),
                       desc="transposed weights" if fm else "transposed tied embedding")
        if fm and tied:
            weights = dataclasses.replace(weights, head=model.embedding_vd[...])
    _WEIGHTS_CACHE[:] = [([weakref.ref(x) for x in leaves], weights)]
    return weights


def _attention(q_btnh: Array, k_bkhs: Array, v_bksh: Array, mask_bts: Array,
               prefix: Optional[tuple[Array, Array, Array]] = None) -> Array:
    """Grouped-query attention against the cache without repeating K/V (``G = N // K``).

    Each KV head's ``G * T`` queries form the rows of one ``[G*T, H] x [H, S]`` matmul: 4-D batched
    matmuls stay on XLA:CPU's fast path (a 5-D ``btkgh`` einsum falls off it, ~10x slower).
    ``prefix``: ``(keys [K, H, P], values [K, P, H], visible [P])`` shared by every row, attended
    before the row's own slots in the same softmax. Its products are one ``[B*G*T, H] x [H, P]``
    matmul per KV head, so the shared keys and values are read once, not once per row.
    """
    b, t, n, h = q_btnh.shape
    kh, g = k_bkhs.shape[1], n // k_bkhs.shape[1]
    dt, scale = v_bksh.dtype, 1.0 / math.sqrt(h)
    q = q_btnh.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    scores = jnp.einsum("bkmh,bkhs->bkms", q, k_bkhs, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_bts[:, None, None, :, :], scores.reshape(b, kh, g, t, -1), _NEG).reshape(b, kh, g * t, -1)
    if prefix is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkms,bksh->bkmh", probs, v_bksh, preferred_element_type=jnp.float32)
    else:  # one softmax over both parts, computed in each part's own layout (no concatenation)
        pk, pv, visible = prefix
        by_head = lambda x: x.transpose(1, 0, 2).reshape(kh, -1)  # [B, K, M] -> [K, B*M]
        by_row = lambda x: x.reshape(kh, b, g * t).transpose(1, 0, 2)  # [K, B*M] -> [B, K, M]
        qk = q.transpose(1, 0, 2, 3).reshape(kh, b * g * t, h)
        shared = jnp.einsum("kmh,khp->kmp", qk, pk, preferred_element_type=jnp.float32) * scale  # [K, B*M, P]
        shared = jnp.where(visible, shared, _NEG)
        top = jnp.maximum(jnp.max(scores, axis=-1), by_row(jnp.max(shared, axis=-1)))  # [B, K, M]
        own = jnp.exp(scores - top[..., None])
        shared = jnp.exp(shared - by_head(top)[..., None])
        total = jnp.sum(own, axis=-1) + by_row(jnp.sum(shared, axis=-1))
        from_prefix = jnp.einsum("kmp,kph->kmh", shared.astype(dt), pv, preferred_element_type=jnp.float32)
        out = jnp.einsum("bkms,bksh->bkmh", own.astype(dt), v_bksh, preferred_element_type=jnp.float32)
        out = (out + from_prefix.reshape(kh, b, g * t, h).transpose(1, 0, 2, 3)) / total[..., None]
    return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_btnh.dtype)


def _prefix_attention(q_btnh: Array, pk: Array, pv: Array, visible: Array) -> tuple[Array, Array]:
    """Attention over a shared prefix alone, for the Pallas path (`_attention` merges it into one
    softmax on the XLA path): ``(out [B, T, N, H], lse [B, T, N])`` for `merge_attention`.

    ``pk`` ``[K, P, H]`` (the kernels' key layout), ``pv`` ``[K, P, H]``, ``visible`` ``[P]``: one
    ``[B*G*T, H] x [H, P]`` matmul per KV head, so the prefix is read once for every row.
    """
    b, t, n, h = q_btnh.shape
    kh = pk.shape[0]
    g = n // kh
    qk = q_btnh.reshape(b, t, kh, g, h).transpose(2, 0, 3, 1, 4).reshape(kh, b * g * t, h)
    scores = jnp.einsum("kmh,kph->kmp", qk, pk, preferred_element_type=jnp.float32) / math.sqrt(h)
    scores = jnp.where(visible, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    probs = jnp.exp(scores - top[..., None])
    total = jnp.sum(probs, axis=-1)
    safe = jnp.where(total == 0, 1.0, total)
    out = jnp.einsum("kmp,kph->kmh", probs.astype(pv.dtype), pv, preferred_element_type=jnp.float32) / safe[..., None]
    lse = jnp.where(total == 0, -jnp.inf, top + jnp.log(safe))
    out = out.reshape(kh, b, g, t, h).transpose(1, 3, 0, 2, 4).reshape(b, t, n, h)
    return out, lse.reshape(kh, b, g, t).transpose(1, 3, 0, 2).reshape(b, t, n)


def _forward(model: Llama, cache: _DecodeCache, tokens_bt: Array, pos_bt: Array, seg_bt: Array,
             layers: Optional[list[dict[str, Array]]] = None) -> tuple[Array, _DecodeCache]:
    """Final-norm hidden states ``[B, T, D]`` of ``T`` new tokens per row, cached from slot ``cache.end``.

    The computation of ``Llama.hidden_states`` on this module's cache (keys transposed, an optional
    shared prefix; padding: ``seg == 0``, slot position ``-1``), with every projection one 2-D
    matmul: row-major on views of the parameters (as `models.llama.dense`), or feature-major on
    ``layers``, the transposed copies of `_DecodeWeights`; the two differ only in the order of
    floating-point sums.
    """
    c, ctx = model.config, _shard_ctx(model)
    dt = jnp.dtype(c.dtype)
    b, t = tokens_bt.shape
    d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    fm = layers is not None
    axis, act = (0, ("act_embed", "batch")) if fm else (-1, ("batch", "act_embed"))
    mm = (lambda w, y: w.astype(dt) @ y) if fm else (lambda w, y: y @ w.astype(dt))
    # A projection's output as [B, T, heads, H]. The barrier keeps XLA from folding the transpose into
    # the matmul, which would make the weight the right operand again.
    split = lambda z, heads: (jax.lax.optimization_barrier(z).T if fm else z).reshape(b, t, heads, h)
    cos, sin = rope_tables(pos_bt, rope_inv_freq(c))  # once per call, not per layer
    slot_pos = jax.lax.dynamic_update_slice(cache.pos, jnp.where(seg_bt != 0, pos_bt, -1), (0, cache.end))
    mask = (slot_pos[:, None, :] >= 0) & (slot_pos[:, None, :] <= pos_bt[:, :, None]) & (seg_bt != 0)[:, :, None]
    x = jnp.take(model.embedding_vd[...], tokens_bt.reshape(b * t), axis=0).astype(dt)  # [B*T, D]
    x = constrain(ctx, x.T if fm else x, act)
    new_k, new_v = [], []
    for i, blk in enumerate(model.layers):
        with jax.named_scope(f"layer_{i}"):
            a, w = blk.attn, layers[i] if fm else _views(model, blk)
            y = blk.input_norm(x, axis)
            q = rotate_halves(split(mm(w["q"], y), n), cos, sin)
            kk = rotate_halves(split(mm(w["k"], y), k), cos, sin)
            kk = kk.transpose(0, 2, 3, 1) if cache.keys_last else kk.transpose(0, 2, 1, 3)  # [B, K, H, T] or [B, K, T, H]
            vv = split(mm(w["v"], y), k).transpose(0, 2, 1, 3)  # [B, K, T, H]
            at = (0, 0, 0, cache.end) if cache.keys_last else (0, 0, cache.end, 0)
            k_cache = jax.lax.dynamic_update_slice(cache.k[i], kk.astype(cache.k[i].dtype), at)
            v_cache = jax.lax.dynamic_update_slice(cache.v_bksh[i], vv.astype(cache.v_bksh[i].dtype), (0, 0, cache.end, 0))
            prefix = None
            if cache.prefix_k:
                prefix = (cache.prefix_k[i].astype(dt), cache.prefix_v[i].astype(dt), cache.prefix_pos >= 0)
            if cache.keys_last:
                o = _attention(q, k_cache.astype(dt), v_cache.astype(dt), mask, prefix)
            elif prefix is None:  # the Pallas kernels (decode kernel for one token), per device on a mesh
                o = a.pallas_attention(q, k_cache.astype(dt), v_cache.astype(dt), pos_bt, slot_pos, seg_bt, None)
            else:  # the kernels over the rows' slots, merged with XLA attention over the shared prefix
                o, lse = a.pallas_attention(q, k_cache.astype(dt), v_cache.astype(dt), pos_bt, slot_pos, seg_bt, None, return_lse=True)
                o = merge_attention(o, lse, *_prefix_attention(q, *prefix))
            o = o.reshape(b * t, n * h)
            x = x + mm(w["o"], o.T if fm else o)
            y = blk.post_attn_norm(x, axis)
            x = x + mm(w["down"], jax.nn.silu(mm(w["gate"], y)) * mm(w["up"], y))
            x = constrain(ctx, x, act)
            new_k.append(k_cache)
            new_v.append(v_cache)
    x = model.final_norm(x, axis)
    x = (x.T if fm else x).reshape(b, t, d)
    return x, dataclasses.replace(cache, k=new_k, v_bksh=new_v, pos=slot_pos, end=cache.end + t)


def _logits(model: Llama, weights: _DecodeWeights, h_bd: Array) -> Array:
    """Float32 logits of final hidden states ``[B, D]``: ``[B, V]``, or ``[V, B]`` feature-major."""
    dt = h_bd.dtype
    if weights.feature_major:
        out, axes = jnp.dot(weights.head.astype(dt), h_bd.T, preferred_element_type=jnp.float32), ("act_vocab", "batch")
    else:
        out, axes = jnp.dot(h_bd, weights.head.astype(dt), preferred_element_type=jnp.float32), ("batch", "act_vocab")
    return constrain(_shard_ctx(model), out, axes)


# ------------------------------------------------------------------------------------ sampling


@dataclasses.dataclass(frozen=True)
class _Mode:
    """Static sampling switches (compiled in); temperature and top_p values are runtime inputs."""

    greedy: bool
    top_k: int
    top_p: bool


def _argmax(x: Array, top: Array, axis: int) -> Array:
    """Lowest index of the maximum ``top`` (kept dims) along ``axis`` (two vectorizable passes
    instead of a variadic reduce)."""
    v = x.shape[axis]
    ids = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
    return jnp.min(jnp.where(x == top, ids, v), axis=axis)


def _floor(bits_bv: Array, weighted: bool, need_b: Array) -> Array:
    """Per row, the largest ``t`` with ``sum(w[bits >= t]) >= need``, ``w`` the floats whose bits are
    ``bits`` (or with ``count(bits >= t) >= need`` if not ``weighted``).

    Bisection over the bit patterns of non-negative floats (ordered like their values): 31 fused
    passes over ``[B, V]``, exact, and far cheaper on CPU than sorting the vocabulary.
    """

    def halve(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        hit = bits_bv >= mid[:, None]
        if weighted:
            got = jnp.sum(jnp.where(hit, jax.lax.bitcast_convert_type(bits_bv, jnp.float32), 0.0), axis=-1)
        else:
            got = jnp.sum(hit, axis=-1, dtype=jnp.float32)
        ok = got >= need_b
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    b = bits_bv.shape[0]
    lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.zeros((b,), jnp.int32), jnp.full((b,), 0x7F800001, jnp.int32)))
    return lo


def _inverse_cdf(w_bv: Array, u_b: Array, block: int = 256) -> Array:
    """Index ``i`` with ``cumsum(w)[i-1] <= u * sum(w) < cumsum(w)[i]``, in two levels of blocks."""
    b, v = w_bv.shape
    nb = -(-v // block)
    w = jnp.pad(w_bv, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
    block_cum = jnp.cumsum(jnp.sum(w, axis=-1), axis=-1)  # [B, nb]
    target = u_b * block_cum[:, -1]
    j = jnp.minimum(jnp.sum(block_cum <= target[:, None], axis=-1), nb - 1)
    before = jnp.where(j > 0, jnp.take_along_axis(block_cum, jnp.maximum(j - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    inner = jnp.take_along_axis(w, j[:, None, None], axis=1)[:, 0]  # [B, block]
    i = jnp.sum(jnp.cumsum(inner, axis=-1) <= (target - before)[:, None], axis=-1)
    last_nonzero = block - 1 - jnp.argmax(inner[:, ::-1] > 0, axis=-1)  # rounding guard
    return (j * block + jnp.minimum(i, last_nonzero)).astype(jnp.int32)


def _sample(logits: Array, keys_b: Array, step: Array, knobs: dict, mode: _Mode, vocab_axis: int = -1) -> tuple[Array, Array]:
    """Next token per row and its log-prob under the untempered, untruncated distribution.

    ``logits``: ``[B, V]``, or ``[V, B]`` with ``vocab_axis=0`` (feature-major decoding): reductions
    over the vocabulary then run across contiguous rows of ``B`` values, which on CPU makes the
    greedy step's log-sum-exp and argmax ~7x faster than on ``[B, V]`` after a transpose.
    """
    top = jnp.max(logits, axis=vocab_axis, keepdims=True)
    lse = jnp.squeeze(top, vocab_axis) + jnp.log(jnp.sum(jnp.exp(logits - top), axis=vocab_axis))
    if mode.greedy:  # the chosen logit is the maximum itself
        return _argmax(logits, top, vocab_axis), jnp.squeeze(top, vocab_axis) - lse
    logits_bv = logits if vocab_axis in (-1, 1) else logits.T
    x = logits_bv / knobs["temperature"]
    w = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))  # softmax(x) up to a per-row factor
    bits = jax.lax.bitcast_convert_type(w, jnp.int32)
    if mode.top_k:  # `lax.top_k` sorts the vocabulary: ~100x slower on CPU
        w = jnp.where(bits >= _floor(bits, False, jnp.full(w.shape[:1], mode.top_k, jnp.float32))[:, None], w, 0.0)
    if mode.top_p:
        bits = jax.lax.bitcast_convert_type(w, jnp.int32)
        w = jnp.where(bits >= _floor(bits, True, knobs["top_p"] * jnp.sum(w, axis=-1))[:, None], w, 0.0)
    u = jax.vmap(lambda kk: jax.random.uniform(jax.random.fold_in(kk, step), (), jnp.float32))(keys_b)
    tok = _inverse_cdf(w, u)
    return tok, jnp.take_along_axis(logits_bv, tok[:, None], axis=1)[:, 0] - lse


# ------------------------------------------------------------------------------- decode state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Rows:
    """Per-row decode state. ``n``: tokens generated so far (the same for every row)."""

    tokens: Array  # [R, Nb] int32, pad after a row is done
    logprobs: Array  # [R, Nb] float32
    last: Array  # [R] int32, the token fed to the next step
    prompt_len: Array  # [R] int32
    done: Array  # [R] bool
    length: Array  # [R] int32, tokens generated including the stop id
    keys: Array  # [R] PRNG keys of the rows
    n: Array  # int32 scalar


def _advance(rows: _Rows, tok: Array, lp: Array, knobs: dict) -> _Rows:
    """Records the token of column ``rows.n`` for every row that is not done yet."""
    live = ~rows.done
    col = rows.n
    tokens = jax.lax.dynamic_update_slice(rows.tokens, jnp.where(live, tok, knobs["pad_id"])[:, None], (0, col))
    logprobs = jax.lax.dynamic_update_slice(rows.logprobs, jnp.where(live, lp, 0.0)[:, None], (0, col))
    stopped = jnp.any(tok[:, None] == knobs["stop_ids"][None, :], axis=-1)
    return _Rows(
        tokens=tokens, logprobs=logprobs, last=tok, prompt_len=rows.prompt_len,
        done=rows.done | stopped, length=jnp.where(live, col + 1, rows.length), keys=rows.keys, n=col + 1,
    )


# ------------------------------------------------------------------------ compiled functions


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


def _start_fn(graphdef, mode, expand, state, weights, cache, h_last, src_r, rows, knobs):
    """Gathers prefill rows to decode rows and samples every row's first token."""
    model = nnx.merge(graphdef, state)
    logits = _logits(model, weights, h_last)
    if expand:
        cache = _cache_rows(cache, src_r)
        logits = jnp.take(logits, src_r, axis=1 - weights.vocab_axis)
    tok, lp = _sample(logits, rows.keys, rows.n, knobs, mode, weights.vocab_axis)
    cache = _constrain_tree(_shard_ctx(model), cache, _cache_axes(cache))
    return cache, _advance(rows, tok, lp, knobs)


def _decode_fn(graphdef, mode, state, weights, cache, rows, knobs):
    """Decodes until the cache is full, every row is done, or ``max_new`` tokens exist."""
    model = nnx.merge(graphdef, state)
    capacity = cache.capacity

    def cond(carry):
        cache, rows = carry
        return (cache.end < capacity) & (rows.n < knobs["max_new"]) & ~jnp.all(rows.done)

    def body(carry):
        cache, rows = carry
        pos = rows.prompt_len + rows.n - 1  # position of the token being fed
        h, cache = _forward(model, cache, rows.last[:, None], pos[:, None], jnp.ones_like(pos)[:, None],
                            weights.layers if weights.feature_major else None)
        logits = _logits(model, weights, h[:, 0])
        tok, lp = _sample(logits, rows.keys, rows.n, knobs, mode, weights.vocab_axis)
        return cache, _advance(rows, tok, lp, knobs)

    return jax.lax.while_loop(cond, body, (cache, rows))


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


# ------------------------------------------------------------------------------------ generate


def _check_prompts(model: Llama, prompts: Sequence[Sequence[int]], extra: int, what: str = "prompt") -> list[list[int]]:
    c = model.config
    out = [[int(t) for t in p] for p in prompts]
    if not out:
        raise ValueError(f"no {what}s given")
    for i, p in enumerate(out):
        if not p:
            raise ValueError(f"{what} {i} is empty: give at least one token (e.g. BOS id {c.bos_token_id})")
        if min(p) < 0 or max(p) >= c.vocab_size:
            raise ValueError(f"{what} {i} has token ids outside [0, {c.vocab_size})")
        if len(p) + extra > c.max_position_embeddings:
            raise ValueError(
                f"{what} {i} has {len(p)} tokens; with {extra} more it exceeds the model's context of "
                f"{c.max_position_embeddings} positions: truncate it or ask for fewer tokens"
            )
    return out


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _prompt_bucket(n: int, buckets: Buckets) -> int:
    if n > buckets.prefill_chunk:
        return _round_up(n, buckets.prefill_chunk)
    return bucket(n, buckets.min_prompt, buckets.prompt_steps)


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
    row, the hidden state of the row's last token in this call.
    """
    ctx = _shard_ctx(model)
    rows = cache.pos.shape[0]
    lens = np.zeros((rows,), np.int32)
    lens[: len(parts)] = [len(p) for p in parts]
    start = int(to_host(cache.end))
    groups = _length_groups(lens, _batch_multiple(ctx), buckets)
    for group in groups:  # each group's call leaves ``cache.end`` at the widest group's end so far
        g = len(group)
        width = _prompt_bucket(int(lens[group].max()), buckets)
        # Attention scores [rows, N, chunk, capacity] in float32 stay under ~1 GiB.
        limit = max(16, (1 << 28) // (g * model.config.num_heads * cache.capacity))
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
    return cache, h_last


def _prefix_fn(ctx, rows: _DecodeCache, first: _DecodeCache) -> _DecodeCache:
    """The empty cache ``rows`` with the first row of the prefilled ``first`` as its shared prefix."""
    cache = dataclasses.replace(rows, prefix_k=[x[0] for x in first.k], prefix_v=[x[0] for x in first.v_bksh],
                                prefix_pos=first.pos[0])
    return _constrain_tree(ctx, cache, _cache_axes(cache))


def _prefill(model, graphdef, state, prompts: list[list[int]], bp: int, pad: int, buckets: Buckets):
    """The prompts' KV cache ``[bp, ...]`` and the hidden state of each prompt's last token.

    A prefix shared by every prompt (a system prompt, a judge's rubric) of at least
    ``buckets.min_shared_prefix`` tokens is prefilled once and stays in the cache once, as its
    shared prefix; the rows' slots hold only the rest.
    """
    c, ctx = model.config, _shard_ctx(model)
    shared = min(_shared_prefix(prompts), min(map(len, prompts)) - 1) if len(prompts) > 1 else 0
    shared = shared if shared >= buckets.min_shared_prefix else 0
    head = _prompt_bucket(shared, buckets) if shared else 0
    keys_last = resolve_impl(c.attention_impl) == "xla"
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
        first, _ = _prefill_part(model, graphdef, state, new_cache(one, head), new_h(one), [prompts[0][:shared]], 0, pad, buckets)
        cache = _run("prefix", _prefix_fn, (ctx,), (new_cache(bp, capacity), first), donate=(0, 1),
                     desc=f"{bp} rows of capacity {capacity} after a shared prefix of {head} slots")
    return _prefill_part(model, graphdef, state, cache, new_h(bp), [p[shared:] for p in prompts], shared, pad, buckets)


def _put_rows(ctx: Optional[ShardingContext], rows: _Rows) -> _Rows:
    if ctx is None:
        return rows
    two, one = ("batch", None), ("batch",)
    return _Rows(
        tokens=_put(ctx, rows.tokens, two), logprobs=_put(ctx, rows.logprobs, two), last=_put(ctx, rows.last, one),
        prompt_len=_put(ctx, rows.prompt_len, one), done=_put(ctx, rows.done, one), length=_put(ctx, rows.length, one),
        keys=_put_keys(ctx, rows.keys), n=_put(ctx, rows.n, ()),
    )


def _put_keys(ctx: ShardingContext, keys: Array) -> Array:
    """Per-row PRNG keys laid out over the batch axes (through their raw data on a multi-process mesh)."""
    sharding = ctx.sharding(("batch",), keys.shape)
    if sharding.is_fully_addressable:
        return jax.device_put(keys, sharding)
    data = np.asarray(jax.random.key_data(keys))
    raw = put_global(data, ctx.sharding(("batch", None), data.shape))
    return jax.random.wrap_key_data(raw, impl=jax.random.key_impl(keys))


def generate(
    model: Llama,
    prompt_tokens: Sequence[Sequence[int]],
    *,
    n_samples: int = 1,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Sequence[int] = (),
    rng: Optional[Array] = None,
    pad_id: Optional[int] = None,
    buckets: Buckets = DEFAULT_BUCKETS,
    row_ids: Optional[Sequence[int]] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples ``n_samples`` continuations of every prompt (token ids in, token ids out).

    Returns ``(tokens, lengths, logprobs)`` for ``B * n_samples`` rows, prompt-major (row
    ``i * n_samples + j`` is sample ``j`` of prompt ``i``): ``tokens`` ``[R, max_new_tokens]`` int32,
    ``pad_id`` (default: the config's pad id, else 0) after a row's stop id; ``lengths`` ``[R]``, new
    tokens including the stop id; ``logprobs`` ``[R, max_new_tokens]`` float32, each sampled token's
    log-prob under the model's untempered, untruncated distribution (0 after the end).
    ``rng`` (a PRNG key) is needed unless ``temperature == 0``. ``row_ids`` (default ``0..R-1``)
    name the rows' random streams; equal ids give equal samples whatever the batch.
    """
    c, ctx = model.config, _shard_ctx(model)
    if max_new_tokens < 1 or n_samples < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and n_samples={n_samples} must be >= 1")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, {top_k})")
    greedy = temperature == 0
    if rng is None and not greedy:
        raise ValueError("sampling with temperature > 0 needs rng (a jax PRNG key)")
    prompts = _check_prompts(model, prompt_tokens, max_new_tokens)
    b, r = len(prompts), len(prompts) * n_samples
    mult = _batch_multiple(ctx)
    bp, bd = (_round_up(bucket(x, 1, buckets.batch_steps), mult) for x in (b, r))
    lens = np.array([len(p) for p in prompts], np.int32)
    pad = int(pad_id if pad_id is not None else (c.pad_token_id or 0))
    mode = _Mode(greedy=greedy, top_k=0 if greedy or top_k >= c.vocab_size else int(top_k), top_p=not greedy and top_p < 1.0)
    graphdef, state = nnx.split(model)
    cache, h_last = _prefill(model, graphdef, state, prompts, bp, pad, buckets)

    src = np.zeros((bd,), np.int32)
    src[:r] = np.arange(r) // n_samples
    ids = np.arange(bd, dtype=np.uint32)
    if row_ids is not None:
        ids[:r] = np.asarray(row_ids, np.uint32)
    key = jax.random.key(0) if rng is None else rng
    key = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
    stops = np.full((bucket(len(stop_ids), buckets.min_stop_ids, 1),), -1, np.int32)
    stops[: len(stop_ids)] = list(stop_ids)
    knobs = dict(
        temperature=jnp.float32(max(temperature, 1e-6)), top_p=jnp.float32(top_p), stop_ids=jnp.asarray(stops),
        pad_id=jnp.int32(pad), max_new=jnp.int32(max_new_tokens),
    )
    nb = bucket(max_new_tokens, buckets.min_new, 2)
    rows = _put_rows(ctx, _Rows(
        tokens=jnp.full((bd, nb), pad, jnp.int32), logprobs=jnp.zeros((bd, nb), jnp.float32),
        last=jnp.zeros((bd,), jnp.int32), prompt_len=jnp.asarray(lens[src]), done=jnp.asarray(np.arange(bd) >= r),
        length=jnp.zeros((bd,), jnp.int32), keys=jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(ids)),
        n=jnp.int32(0),
    ))
    expand = not (n_samples == 1 and bd == bp)
    weights = _decode_weights(model, graphdef, state)
    cache, rows = _run("start", _start_fn, (graphdef, mode, expand), (state, weights, cache, h_last, _put(ctx, src, ("batch",)), rows, knobs),
                       donate=(5,) if expand else (2, 5), desc=f"{bp} prompts -> {bd} rows, capacity {cache.capacity}, {mode}")
    del h_last
    while int(to_host(rows.n)) < max_new_tokens and not bool(to_host(jnp.all(rows.done))):
        if int(to_host(cache.end)) >= cache.capacity:
            grown = bucket(cache.capacity + 1, buckets.min_capacity, buckets.capacity_steps)
            cache = _run("grow", _grow_fn, (ctx, grown), (cache,), desc=f"batch {bd}, capacity {cache.capacity} -> {grown}")
        cache, rows = _run("decode", _decode_fn, (graphdef, mode), (state, weights, cache, rows, knobs), donate=(2, 3),
                           desc=f"batch {bd}, capacity {cache.capacity}, {nb} new, {mode}")
    del cache
    return (
        to_host(rows.tokens)[:r, :max_new_tokens], to_host(rows.length)[:r],
        to_host(rows.logprobs)[:r, :max_new_tokens],
    )


def generate_text(
    model: Llama,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    *,
    n_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    rng: Optional[Array] = None,
    batch_size: int = 64,
    stop_ids: Optional[Sequence[int]] = None,
    progress: bool = True,
) -> list[list[str]]:
    """Chat conversations in, ``n_samples`` reply strings per conversation out (input order).

    Prompts are sorted by length and generated ``batch_size`` sequences at a time, so padding stays
    small; each sequence's random stream is fixed by its position in ``conversations``, so the
    replies do not depend on ``batch_size``. Stops at the tokenizer's EOS ids unless ``stop_ids``.
    """
    from tqdm.auto import tqdm

    prompts = []
    for conv in conversations:
        ids = tokenizer.apply_chat_template(list(conv), add_generation_prompt=True)
        prompts.append([int(t) for t in (ids["input_ids"] if isinstance(ids, dict) else ids)])
    stops = tuple(tokenizer.eos_token_ids if stop_ids is None else stop_ids)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    per_call = max(1, batch_size // n_samples)
    out: list[list[str]] = [[] for _ in prompts]
    with tqdm(total=len(prompts) * n_samples, disable=not progress, desc="generate", unit="seq") as bar:
        for start in range(0, len(order), per_call):
            idx = order[start : start + per_call]
            ids = [int(i) * n_samples + j for i in idx for j in range(n_samples)]
            toks, lens, _ = generate(
                model, [prompts[i] for i in idx], n_samples=n_samples, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, top_k=top_k, stop_ids=stops, rng=rng, row_ids=ids,
            )
            for k, i in enumerate(idx):
                for j in range(n_samples):
                    row = toks[k * n_samples + j, : lens[k * n_samples + j]].tolist()
                    if row and row[-1] in stops:
                        row = row[:-1]
                    out[i].append(tokenizer.decode(row))
            bar.update(len(idx) * n_samples)
    return out


# --------------------------------------------------------------------------------------- score


class Scores(NamedTuple):
    """``total`` ``[N]``: sum of response-token log-probs; ``per_token``: one ``[len(response)]``
    array per sequence; ``hidden`` ``[N, D]``: mean final-norm hidden state over the response tokens."""

    total: np.ndarray
    per_token: Optional[list[np.ndarray]]
    hidden: Optional[np.ndarray]


def _score_fn(graphdef, chunk, state, tokens_bt, seg_bt, plen_b, rlen_b):
    """Per-token log-probs ``[B, R]`` of the response tokens and their mean hidden state ``[B, D]``."""
    model = nnx.merge(graphdef, state)
    b, t = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, _ = model.hidden_states(tokens_bt, positions=positions, segment_ids=seg_bt)
    r = jnp.arange(chunk[1], dtype=jnp.int32)
    valid = r[None, :] < rlen_b[:, None]
    at = jnp.clip(plen_b[:, None] + r[None, :], 0, t - 1)  # response token positions
    target = jnp.take_along_axis(tokens_bt, at, axis=1)
    h_pred = jnp.take_along_axis(h, jnp.maximum(at - 1, 0)[:, :, None], axis=1)  # states that predict them

    def one(args):  # the LM head over `chunk[0]` positions at a time bounds the logits' memory
        hc, tc = args
        logits = model.logits(hc)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.take_along_axis(logits, tc[:, :, None], axis=2)[:, :, 0] - lse

    n = chunk[1] // chunk[0]
    split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk[0], *x.shape[2:]), 1, 0)
    lp = jnp.moveaxis(jax.lax.map(one, (split(h_pred), split(target))), 0, 1).reshape(b, chunk[1])
    lp = jnp.where(valid, lp, 0.0)
    h_resp = jnp.take_along_axis(h, at[:, :, None], axis=1).astype(jnp.float32)
    hidden = jnp.sum(jnp.where(valid[:, :, None], h_resp, 0.0), axis=1) / jnp.maximum(rlen_b, 1)[:, None]
    return lp, hidden


def score(
    model: Llama,
    prompt_tokens: Sequence[Sequence[int]],
    response_tokens: Sequence[Sequence[int]],
    *,
    return_per_token: bool = False,
    return_hidden: bool = False,
    batch_size: int = 16,
    buckets: Buckets = DEFAULT_BUCKETS,
) -> np.ndarray | Scores:
    """Sum of ``log p(response_t | prompt, response_<t)`` per sequence, ``[N]`` float32.

    With ``return_per_token`` or ``return_hidden`` returns `Scores` instead. Sequences are sorted
    by length and run ``batch_size`` at a time through one jitted full forward; padding is masked
    by segment ids, so results do not depend on the batch. An empty response scores 0.
    """
    if len(prompt_tokens) != len(response_tokens):
        raise ValueError(f"{len(prompt_tokens)} prompts but {len(response_tokens)} responses")
    c, ctx = model.config, _shard_ctx(model)
    responses = [[int(t) for t in x] for x in response_tokens]
    prompts = _check_prompts(model, prompt_tokens, 0)
    _check_prompts(model, [p + x for p, x in zip(prompts, responses)], 0, what="prompt + response")
    graphdef, state = nnx.split(model)
    n = len(prompts)
    total = np.zeros((n,), np.float32)
    per_token: list[np.ndarray] = [np.zeros((0,), np.float32)] * n
    hidden = np.zeros((n, c.hidden_size), np.float32)
    order = np.argsort([len(p) + len(x) for p, x in zip(prompts, responses)], kind="stable")
    mult = _batch_multiple(ctx)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        bb = -(-bucket(len(idx), 1, buckets.batch_steps) // mult) * mult
        t = bucket(max(len(prompts[i]) + len(responses[i]) for i in idx), buckets.min_prompt, buckets.prompt_steps)
        rb = bucket(max(1, max(len(responses[i]) for i in idx)), 8, 2)
        # The LM head runs over `step` response positions at a time: at most ~128 MiB of logits.
        step = 1 << max(0, min(int(math.log2(rb)), int(math.log2(max(1, (1 << 25) // (bb * c.vocab_size))))))
        rb = _round_up(rb, step)
        tokens = np.zeros((bb, t), np.int32)
        seg = np.zeros((bb, t), np.int32)
        plen = np.ones((bb,), np.int32)
        rlen = np.zeros((bb,), np.int32)
        for k, i in enumerate(idx):
            seq = prompts[i] + responses[i]
            tokens[k, : len(seq)], seg[k, : len(seq)] = seq, 1
            plen[k], rlen[k] = len(prompts[i]), len(responses[i])
        two, one = ("batch", "length"), ("batch",)
        lp, hid = _run("score", _score_fn, (graphdef, (step, rb)), (
            state, _put(ctx, tokens, two), _put(ctx, seg, two), _put(ctx, plen, one), _put(ctx, rlen, one),
        ), desc=f"batch {bb}, length {t}, response {rb}")
        lp, hid = to_host(lp), to_host(hid)
        for k, i in enumerate(idx):
            per_token[i] = lp[k, : rlen[k]]
            total[i] = lp[k, : rlen[k]].sum(dtype=np.float64)
            hidden[i] = hid[k]
    if not (return_per_token or return_hidden):
        return total
    return Scores(total=total, per_token=per_token if return_per_token else None, hidden=hidden if return_hidden else None)


def _next_token_fn(graphdef, state, tokens_bt, seg_bt, last_b, cand_c):
    """Log-probs ``[B, C]`` of the candidate ids as the token after each row's last real token."""
    model = nnx.merge(graphdef, state)
    b, t = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, _ = model.hidden_states(tokens_bt, positions=positions, segment_ids=seg_bt)
    h_last = jnp.take_along_axis(h, last_b[:, None, None], axis=1)  # [B, 1, D]
    logp = jax.nn.log_softmax(model.logits(h_last)[:, 0], axis=-1)
    return jnp.take(logp, cand_c, axis=1)


def next_token_logprobs(
    model: Llama,
    sequences: Sequence[Sequence[int]],
    candidate_ids: Sequence[int],
    *,
    batch_size: int = 16,
    buckets: Buckets = DEFAULT_BUCKETS,
) -> np.ndarray:
    """``[N, C]`` log p(candidate | sequence) for forced-prefix readouts (a judge's ``Score:``).

    One jitted forward per length-bucketed batch; only the last position goes through the LM head.
    """
    ctx = _shard_ctx(model)
    seqs = _check_prompts(model, sequences, 1, what="sequence")
    graphdef, state = nnx.split(model)
    cand = jnp.asarray(np.asarray(candidate_ids, np.int32))
    out = np.zeros((len(seqs), len(candidate_ids)), np.float32)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    mult = _batch_multiple(ctx)
    for start in range(0, len(seqs), batch_size):
        idx = order[start : start + batch_size]
        bb = -(-bucket(len(idx), 1, buckets.batch_steps) // mult) * mult
        t = bucket(max(len(seqs[i]) for i in idx), buckets.min_prompt, buckets.prompt_steps)
        tokens = np.zeros((bb, t), np.int32)
        seg = np.zeros((bb, t), np.int32)
        last = np.zeros((bb,), np.int32)
        for k, i in enumerate(idx):
            tokens[k, : len(seqs[i])], seg[k, : len(seqs[i])], last[k] = seqs[i], 1, len(seqs[i]) - 1
        two, one = ("batch", "length"), ("batch",)
        lp = _run("next_token", _next_token_fn, (graphdef,), (
            state, _put(ctx, tokens, two), _put(ctx, seg, two), _put(ctx, last, one), cand,
        ), desc=f"batch {bb}, length {t}")
        out[idx] = to_host(lp)[: len(idx)]
    return out
