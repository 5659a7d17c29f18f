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

Prefill and decode share `models.decode_forward._forward`, the computation of
``Llama.hidden_states`` on 2-D weights, with keys cached transposed (``[B, K, H, S]``) so both
attention products are plain batched matmuls, and the LM head as one matmul. Prefill runs on views
of the parameters (no copy). On CPU the decode loop runs feature-major, on transposed copies of the
weights made once per model (`models.decode_forward._DecodeWeights`); elsewhere it uses the views.
``score`` uses the model's own forward. Tests check both layouts against a plain forward and
against Hugging Face.

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

This module holds ``generate``, ``generate_text`` and the decode loop; the parts live in their own
modules: `models.buckets` (static shapes, prompt checks), `models.executables` (compiled calls),
`models.placement` (arrays on a mesh), `models.decode_cache` (the KV cache), `models.decode_forward`
(the forward pass on it, shared-prefix attention, decode weights), `models.prefill`,
`models.sampling` (token sampling) and `models.scoring` (``score``, ``next_token_logprobs``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from models.buckets import DEFAULT_BUCKETS, Buckets, _check_prompts, _round_up, bucket
from models.decode_cache import _cache_axes, _cache_rows, _grow_fn
from models.decode_forward import _decode_weights, _forward, _logits
from models.distributed import put_global, to_host
from models.executables import _run, compiling_only
from models.llama import Llama, compute_copy
from models.placement import _batch_multiple, _constrain_tree, _put, _shard_ctx
from models.prefill import _prefill
from models.sampling import _Mode, _sample
from models.sharding import ShardingContext

Array = jax.Array


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


# ------------------------------------------------------------------------------------ generate


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
    if compiling_only():
        return jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(keys, sharding)
    data = np.asarray(jax.random.key_data(keys))
    raw = put_global(data, ctx.sharding(("batch", None), data.shape))
    return jax.random.wrap_key_data(raw, impl=jax.random.key_impl(keys))


def _progress(rows: _Rows, cache: Any, planned_n: int, planned_end: int) -> tuple[int, bool, int]:
    """Tokens generated so far, whether every row is done, and the cache slots filled. Under
    `models.executables.compile_only` nothing ran: the planned counts (no row stops early)."""
    if compiling_only():
        return planned_n, False, planned_end
    return int(to_host(rows.n)), bool(to_host(jnp.all(rows.done))), int(to_host(cache.end))


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
    model = compute_copy(model)
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
    cache, h_last, end = _prefill(model, graphdef, state, prompts, bp, pad, buckets)

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
    n, done, end = _progress(rows, cache, 1, end)
    while n < max_new_tokens and not done:
        if end >= cache.capacity:
            grown = bucket(cache.capacity + 1, buckets.min_capacity, buckets.capacity_steps)
            cache = _run("grow", _grow_fn, (ctx, grown), (cache,), desc=f"batch {bd}, capacity {cache.capacity} -> {grown}")
        cache, rows = _run("decode", _decode_fn, (graphdef, mode), (state, weights, cache, rows, knobs), donate=(2, 3),
                           desc=f"batch {bd}, capacity {cache.capacity}, {nb} new, {mode}")
        steps = min(cache.capacity - end, max_new_tokens - n)  # each step fills one slot and adds one token
        n, done, end = _progress(rows, cache, n + steps, end + steps)
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
