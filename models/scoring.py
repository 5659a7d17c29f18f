"""Scoring given tokens with the model's own forward: `score` sums (or returns per token) the
log-probs of responses after prompts and the mean hidden state over them (`Scores`);
`next_token_logprobs` reads the log-probs of candidate ids after each sequence (a judge's
``Score:``). Sequences are sorted by length, bucketed, and run a batch at a time.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.buckets import DEFAULT_BUCKETS, Buckets, _check_prompts, _round_up, bucket
from models.distributed import to_host
from models.executables import _run
from models.llama import Llama, compute_copy, with_sharding
from models.placement import _batch_multiple, _put, _shard_ctx, forward_shard
from models.sharding import ShardingContext


class Scores(NamedTuple):
    """``total`` ``[N]``: sum of response-token log-probs; ``per_token``: one ``[len(response)]``
    array per sequence; ``hidden`` ``[N, D]``: mean final-norm hidden state over the response tokens."""

    total: np.ndarray
    per_token: Optional[list[np.ndarray]]
    hidden: Optional[np.ndarray]


def _layout(model: Llama, graphdefs: dict, rows: int, tokens: int) -> tuple[Optional[ShardingContext], nnx.GraphDef]:
    """The sharding of one batch's forward (`models.placement.forward_shard`) and the model's
    graph for it, built once per layout into ``graphdefs`` (the state is shared by all)."""
    ctx = forward_shard(model, rows, tokens)
    if ctx not in graphdefs:
        graphdefs[ctx] = nnx.split(with_sharding(model, ctx))[0]
    return ctx, graphdefs[ctx]


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
    model = compute_copy(model)
    c, ctx = model.config, _shard_ctx(model)
    responses = [[int(t) for t in x] for x in response_tokens]
    prompts = _check_prompts(model, prompt_tokens, 0)
    _check_prompts(model, [p + x for p, x in zip(prompts, responses)], 0, what="prompt + response")
    graphdef, state = nnx.split(model)
    graphdefs = {ctx: graphdef}
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
        at, g = _layout(model, graphdefs, bb, t)
        lp, hid = _run("score", _score_fn, (g, (step, rb)), (
            state, _put(at, tokens, two), _put(at, seg, two), _put(at, plen, one), _put(at, rlen, one),
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
    model = compute_copy(model)
    ctx = _shard_ctx(model)
    seqs = _check_prompts(model, sequences, 1, what="sequence")
    graphdef, state = nnx.split(model)
    graphdefs = {ctx: graphdef}
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
        at, g = _layout(model, graphdefs, bb, t)
        lp = _run("next_token", _next_token_fn, (g,), (
            state, _put(at, tokens, two), _put(at, seg, two), _put(at, last, one), cand,
        ), desc=f"batch {bb}, length {t}")
        out[idx] = to_host(lp)[: len(idx)]
    return out
