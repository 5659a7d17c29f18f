"""Aggregation of a response's N sampled judge scores (no model code).

A score is missing when its judgment could not be parsed: ``None`` (what
:func:`metajudge.prompts.parse_score` returns) or a non-finite float. Missing scores are dropped.

Variance is the population variance (divide by the number of valid scores, ``ddof=0``). Sums use
:func:`math.fsum`, which is exactly rounded, so the result does not depend on the order of the
scores and exact ties between responses stay exact ties.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

Score = Optional[float]


def _valid(scores: Sequence[Score]) -> list[float]:
    """The scores that are present and finite, in order."""
    return [float(s) for s in scores if s is not None and math.isfinite(s)]


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    """``mean = Σx/n``, ``var = Σ(x - mean)²/n`` with exact sums; ``(nan, nan)`` when n = 0."""
    if not values:
        return math.nan, math.nan
    mean = math.fsum(values) / len(values)
    return mean, math.fsum((x - mean) ** 2 for x in values) / len(values)


def aggregate_scores(scores: Sequence[Score]) -> tuple[float, float, int, int]:
    """``(mean, variance, n_valid, n_failed)`` of one response's judge scores.

    Over the n valid scores: mean = Σx/n, variance = Σ(x - mean)²/n (0.0 for one score);
    both are nan when no score is valid. Example: [4, None, 2, 3] -> (3.0, 2/3, 3, 1).
    """
    valid = _valid(scores)
    mean, var = _mean_var(valid)
    return mean, var, len(valid), len(scores) - len(valid)


def highest_variance_index(score_lists: Sequence[Sequence[Score]]) -> Optional[int]:
    """Index of the response whose valid judge scores have the highest variance.

    Only responses with at least 2 valid scores take part; ties go to the lowest index; None when
    no response takes part. A maximum variance of 0 (all judges agree) still returns an index:
    whether such a prompt is worth a meta-judge round is the caller's decision.
    """
    best_index, best_var = None, -math.inf
    for index, scores in enumerate(score_lists):
        valid = _valid(scores)
        if len(valid) < 2:
            continue
        var = _mean_var(valid)[1]
        if var > best_var:
            best_index, best_var = index, var
    return best_index
