"""Temporal Self-Rewarding: past-anchored rejection and future-guided chosen responses.

All scores are the current judge M_i's averaged scores for one prompt; NaN marks a response with
no valid judgment and takes no part. Tie-breaks: among equal best (or equal worst) scores the
lowest index wins. "Strictly" everywhere: an equal score never replaces, anchors, or makes a pair.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import numpy as np

Source = Literal["current", "initial", "future"]


def _best_worst(scores: Sequence[float]) -> Optional[tuple[int, int]]:
    """(first index of the highest, first index of the lowest) finite score; None if none is."""
    s = np.asarray(scores, dtype=np.float64)
    valid = np.flatnonzero(np.isfinite(s))
    if len(valid) == 0:
        return None
    return int(valid[np.argmax(s[valid])]), int(valid[np.argmin(s[valid])])


def anchored_pair(
    current_scores: Sequence[float], initial_scores: Sequence[float]
) -> Optional[tuple[int, Source, int]]:
    """``(chosen_index, rejected_source, rejected_index)`` with the past model as anchor, or None.

    chosen = argmax of M_i's scores; rejected = argmin of M_0's scores (source ``"initial"``) if
    it is strictly below min of M_i's scores, else argmin of M_i's (``"current"``). None when
    M_i has no valid score or s_chosen <= s_rejected. Example: current [3, 5, 2], initial [1, 4]
    -> (1, "initial", 0); current [3, 5, 2], initial [2, 4] -> (1, "current", 2).
    """
    current = _best_worst(current_scores)
    if current is None:
        return None
    chosen, rejected = current
    s_chosen, s_rejected = float(current_scores[chosen]), float(current_scores[rejected])
    source: Source = "current"
    initial = _best_worst(initial_scores)
    if initial is not None and initial_scores[initial[1]] < s_rejected:
        source, rejected, s_rejected = "initial", initial[1], float(initial_scores[initial[1]])
    if not s_chosen > s_rejected:
        return None
    return chosen, source, rejected


def future_guided_chosen(
    chosen_score: float, rejected_score: float, future_scores: Sequence[float]
) -> Optional[tuple[Source, Optional[int]]]:
    """``("future", i)`` if the future model's best i beats the chosen, else ``("current", None)``.

    i = argmax of M_f's scores, used only when s_i > chosen_score strictly. The rejected response
    is kept. None when the final chosen score is not strictly above ``rejected_score``.
    Example: chosen 4, rejected 1, future [3, 4.5, 4.5] -> ("future", 1).
    """
    if not (math.isfinite(chosen_score) and math.isfinite(rejected_score)):
        raise ValueError("chosen_score and rejected_score must be finite")
    result: tuple[Source, Optional[int]] = ("current", None)
    final_score = chosen_score
    future = _best_worst(future_scores)
    if future is not None and future_scores[future[0]] > chosen_score:
        result, final_score = ("future", future[0]), float(future_scores[future[0]])
    if not final_score > rejected_score:
        return None
    return result
