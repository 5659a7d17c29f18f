"""The three roles one model plays: actor, judge and meta-judge.

Each role turns text into text (or scores) through the batched sampler; the rules that act on the
outputs are the pure functions of ``prompts``, ``judge`` and ``meta_judge``.

Score readout (``readout``):
- ``"parse"`` (the papers' way): a judgment's score is its final ``Score:`` line; a judgment
  without one is dropped and counted as a fallback.
- ``"expected"``: a judgment with a parseable final ``Score:`` line keeps it; for one without,
  the text is followed by a forced ``Score:`` prefix and the score is the expected value
  Σ k·p(k) / Σ p(k) over the model's next-token probabilities of ``0``..``5`` (counted as a
  fallback). The meta-judge likewise compares p(``A``) and p(``B``) after a forced
  ``Winner: Judgment`` prefix when its verdict does not parse.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Literal, Optional, Sequence

import jax
import numpy as np

from metajudge.judge import aggregate_scores
from metajudge.meta_judge import first_position_probability, verdict_to_result
from metajudge.prompts import (
    DEFAULT_PAIRWISE_TEMPLATE, DEFAULT_TEMPLATES, PromptTemplates, judge_prompt, meta_judge_prompt, pairwise_prompt,
    parse_score, parse_winner,
)
from models.sampler import generate_text
from models.scoring import next_token_logprobs

Readout = Literal["parse", "expected"]
SCORE_LABELS = ("0", "1", "2", "3", "4", "5")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one role samples: ``n`` samples per input, temperature, nucleus, length cap."""

    n: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 256


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _generate(model, tokenizer, prompts: Sequence[str], s: Sampling, rng, batch_size: int, progress: bool) -> list[list[str]]:
    return generate_text(
        model, tokenizer, [_user(p) for p in prompts], n_samples=s.n, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, rng=rng, batch_size=batch_size,
        progress=progress,
    )


def _generate_fitting(model, tokenizer, prompts: Sequence[str], s: Sampling, rng, batch_size: int,
                      progress: bool) -> tuple[list[list[str]], list[bool]]:
    """``_generate`` for the prompts that leave room for ``s.max_new_tokens`` in the model's
    context; a prompt that does not (a judge or meta-judge prompt around a very long response) gets
    ``s.n`` empty texts and ``True`` in the second list, so it reads as unparsed and is counted,
    instead of stopping the run."""
    limit = model.config.max_position_embeddings - s.max_new_tokens
    too_long = [len(tokenizer.apply_chat_template(_user(p), add_generation_prompt=True)) > limit for p in prompts]
    kept = [p for p, skip in zip(prompts, too_long) if not skip]
    if len(kept) < len(prompts):
        print(f"{len(prompts) - len(kept)} of {len(prompts)} prompt(s) leave no room for {s.max_new_tokens} new tokens "
              f"in the model's context of {model.config.max_position_embeddings}: skipped (counted as unparsed)",
              file=sys.stderr)
    texts = iter(_generate(model, tokenizer, kept, s, rng, batch_size, progress) if kept else [])
    return [[""] * s.n if skip else next(texts) for skip in too_long], too_long


def act(model, tokenizer, instructions: Sequence[str], s: Sampling, *, rng, batch_size: int = 64, progress: bool = False) -> list[list[str]]:
    """``s.n`` sampled responses per instruction."""
    return _generate(model, tokenizer, instructions, s, rng, batch_size, progress)


@functools.lru_cache(maxsize=32)
def _forced_readout(tokenizer: Any, prefix: str, labels: tuple[str, ...]) -> tuple[str, tuple[int, ...]]:
    """The text to append and the single-token ids of ``labels`` that may follow it.

    Tokenizers differ in whether the space before a label belongs to the label's token (``" 4"``)
    or to the prefix; the variant whose labels are all single, distinct tokens is used.
    """
    for text, lead in ((prefix + " ", ""), (prefix, " ")):
        base = tokenizer.encode(text)
        ids = []
        for label in labels:
            full = tokenizer.encode(text + lead + label)
            if full[: len(base)] != base or len(full) != len(base) + 1:
                break
            ids.append(full[-1])
        if len(ids) == len(labels) and len(set(ids)) == len(ids):
            return text, tuple(ids)
    raise ValueError(
        f"the tokenizer does not encode {labels} as single tokens after {prefix!r}; "
        "use readout='parse' for this model"
    )


def _forced_probs(model, tokenizer, prompts: Sequence[str], texts: Sequence[str], prefix: str, labels: tuple[str, ...], batch_size: int) -> np.ndarray:
    """``[len(texts), len(labels)]`` renormalised next-token probabilities after ``text + prefix``."""
    append, ids = _forced_readout(tokenizer, prefix, labels)
    seqs = [
        tokenizer.apply_chat_template(_user(p)) + tokenizer.encode(t.rstrip() + "\n" + append)
        for p, t in zip(prompts, texts)
    ]
    logp = next_token_logprobs(model, seqs, list(ids), batch_size=batch_size)
    p = np.exp(logp - logp.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _check_readout(readout: str) -> None:
    if readout not in ("parse", "expected"):
        raise ValueError(f"readout={readout!r}: expected 'parse' or 'expected'")


def judge(
    model,
    tokenizer,
    items: Sequence[tuple[str, str]],
    s: Sampling,
    *,
    rng,
    readout: Readout = "parse",
    templates: PromptTemplates = DEFAULT_TEMPLATES,
    batch_size: int = 64,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """``s.n`` judgments per ``(instruction, response)``; scores, mean, variance, fallbacks.

    An item whose judge prompt leaves no room for ``s.max_new_tokens`` in the model's context is
    not generated: its judgments are empty, its scores None (every one a fallback), its mean NaN and
    ``too_long`` is True."""
    _check_readout(readout)
    prompts = [judge_prompt(i, r, templates) for i, r in items]
    judgments, too_long = _generate_fitting(model, tokenizer, prompts, s, rng, batch_size, progress)
    scores = [[parse_score(t) for t in js] for js in judgments]
    fallbacks = [[sc is None for sc in row] for row in scores]
    if readout == "expected":
        flat = [(i, j) for i, row in enumerate(scores) for j, sc in enumerate(row) if sc is None and not too_long[i]]
        if flat:
            probs = _forced_probs(model, tokenizer, [prompts[i] for i, _ in flat],
                                  [judgments[i][j] for i, j in flat], "Score:", SCORE_LABELS, batch_size)
            expected = probs @ np.arange(len(SCORE_LABELS), dtype=np.float64)
            for (i, j), value in zip(flat, expected):
                scores[i][j] = float(value)
    out = []
    for js, sc, fb, skip in zip(judgments, scores, fallbacks, too_long):
        mean, var, n_valid, n_failed = aggregate_scores(sc)
        out.append({"judgments": js, "scores": sc, "mean": mean, "variance": var,
                    "n_valid": n_valid, "n_fallback": int(sum(fb)), "too_long": skip})
    return out


# Same options as ``judge``: the loop and the evaluation call the two roles alike.
def meta_judge(
    model,
    tokenizer,
    battles: Sequence[tuple[str, str, str, str]],
    s: Sampling,
    *,
    rng,
    readout: Readout = "parse",
    templates: PromptTemplates = DEFAULT_TEMPLATES,
    batch_size: int = 64,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One verdict per ``(instruction, response, judgment_a, judgment_b)``: r in {1, -1, 0}, and
    ``p_first``, the probability that judgment A (the first position) wins: 1, 0 or 1/2 from a
    parsed verdict, p(A) / (p(A) + p(B)) where the ``expected`` readout fills in a fallback. A
    battle whose prompt does not fit the model's context with ``s.max_new_tokens`` more is not
    generated: an empty text, a tie (0) counted as a fallback, ``too_long`` True."""
    _check_readout(readout)
    prompts = [meta_judge_prompt(i, r, a, b, templates) for i, r, a, b in battles]
    rows, too_long = _generate_fitting(model, tokenizer, prompts, dataclasses.replace(s, n=1), rng, batch_size, progress)
    texts = [row[0] for row in rows]
    verdicts = [verdict_to_result(parse_winner(t)) for t in texts]
    fallback = [parse_winner(t) is None for t in texts]
    p_first = [first_position_probability(v) for v in verdicts]
    if readout == "expected":
        idx = [i for i, f in enumerate(fallback) if f and not too_long[i]]
        if idx:
            probs = _forced_probs(model, tokenizer, [prompts[i] for i in idx], [texts[i] for i in idx],
                                  "Winner: Judgment", ("A", "B"), batch_size)
            for i, (pa, pb) in zip(idx, probs):
                verdicts[i] = 1 if pa > pb else -1 if pb > pa else 0
                p_first[i] = first_position_probability(verdicts[i], pa, pb)
    return [{"text": t, "verdict": v, "fallback": f, "p_first": p, "too_long": skip}
            for t, v, f, p, skip in zip(texts, verdicts, fallback, p_first, too_long)]


def shard_rng(seed: int, *parts: int) -> jax.Array:
    """A key that depends only on the seed and the given integers (iteration, stage, shard)."""
    key = jax.random.key(seed)
    for p in parts:
        key = jax.random.fold_in(key, p)
    return key


# ------------------------------------------------------------------ pairwise evaluation judge

PairwiseReadout = Literal["logprob", "verdict"]
PAIRWISE_PREFIX = "Winner:"


def pairwise_judge(
    model,
    tokenizer,
    items: Sequence[tuple[str, str, str]],
    *,
    readout: PairwiseReadout = "logprob",
    s: Optional[Sampling] = None,
    rng=None,
    template: Optional[str] = None,
    batch_size: int = 64,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """P(reply A is better) for each ``(instruction, answer_a, answer_b)``, in input order.

    ``readout="logprob"``: the judge's reply is forced to start with ``Winner:`` and
    ``p_a = p(A) / (p(A) + p(B))`` over its next-token probabilities (no text is generated;
    ``kind="prob"``). ``readout="verdict"``: the judge writes its reply with sampling ``s`` (one
    sample; greedy when ``s`` is None) and the last ``Winner:`` line decides: ``p_a`` = 1 for A,
    0 for B, 0.5 when it does not parse (``kind="verdict"``, ``verdict`` None). Each record is
    ``{"p_a", "kind", "verdict", "text"}``.
    """
    if readout not in ("logprob", "verdict"):
        raise ValueError(f"readout={readout!r}: expected 'logprob' or 'verdict'")
    if not items:
        return []
    prompts = [pairwise_prompt(i, a, b, template or DEFAULT_PAIRWISE_TEMPLATE) for i, a, b in items]
    if readout == "logprob":
        append, ids = _forced_readout(tokenizer, PAIRWISE_PREFIX, ("A", "B"))
        seqs = [tokenizer.apply_chat_template(_user(p)) + tokenizer.encode(append) for p in prompts]
        logp = next_token_logprobs(model, seqs, list(ids), batch_size=batch_size)
        d = logp[:, 0].astype(np.float64) - logp[:, 1]
        p_a = 0.5 * (1.0 + np.tanh(0.5 * d))  # p(A) / (p(A) + p(B)) = σ(log p(A) - log p(B))
        return [{"p_a": float(p), "kind": "prob", "verdict": None, "text": None} for p in p_a]
    s = dataclasses.replace(s or Sampling(temperature=0.0, top_p=1.0, max_new_tokens=64), n=1)
    texts = [row[0] for row in _generate(model, tokenizer, prompts, s, rng, batch_size, progress)]
    out = []
    for t in texts:
        w = parse_winner(t)
        out.append({"p_a": {"A": 1.0, "B": 0.0, None: 0.5}[w], "kind": "verdict", "verdict": w, "text": t})
    return out
