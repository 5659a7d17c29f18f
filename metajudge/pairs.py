"""Actor preference pairs with length control (one prompt's K responses at a time).

Decisions
---------
* A NaN score marks an unjudged response (every judgment failed to parse); it takes no part.
* Both score bands are closed; their bounds get a tolerance of ``1e-9`` so a score that lies on a
  bound in exact arithmetic is not lost to rounding (e.g. 0.68·5 + 0.32·1).
* Within a band the pick is ``tiebreak="length"`` (length control: the shortest chosen, the longest
  rejected; among equally long candidates the lowest index wins) or ``tiebreak="random"`` (uniform
  over the band with the given generator: with ρ = 0, Self-Rewarding's highest versus lowest score
  with no length preference).
* ρ must lie in [0, 0.5]. Below 0.5 the bands are disjoint whenever S_max > S_min; at 0.5 they
  share the midpoint, and a pair whose chosen score is not strictly above its rejected score
  (possibly the same response) gives None.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import numpy as np

_BAND_TOL = 1e-9
TIEBREAKS = ("length", "random")
Tiebreak = Literal["length", "random"]


def select_actor_pair(
    scores: Sequence[float], lengths: Sequence[int], rho: float, *, tiebreak: Tiebreak = "length",
    rng: Optional[np.random.Generator] = None,
) -> Optional[tuple[int, int]]:
    """``(chosen, rejected)`` response indices for one prompt, or None.

    chosen = the shortest response with score in [(1-ρ)·S_max + ρ·S_min, S_max];
    rejected = the longest response with score in [S_min, (1-ρ)·S_min + ρ·S_max].
    None when fewer than 2 scores are valid or all valid scores are equal. ρ = 0 is plain best
    versus worst. Example: scores [5, 4, 1, 2], lengths [900, 300, 100, 400], ρ = 0.25: chosen
    band [4, 5] -> index 1 (300 chars); rejected band [1, 2] -> index 3 (400 chars).

    ``tiebreak="random"`` picks uniformly within each band instead (``rng`` required): scores
    [4, 2, 4, 2], ρ = 0 -> chosen 0 or 2, rejected 1 or 3, whatever the lengths.
    """
    if tiebreak not in TIEBREAKS:
        raise ValueError(f"tiebreak must be one of {TIEBREAKS}, got {tiebreak!r}")
    if tiebreak == "random" and rng is None:
        raise ValueError("tiebreak='random' needs rng")
    if not 0.0 <= rho <= 0.5:
        raise ValueError(f"rho must lie in [0, 0.5], got {rho}")
    s = np.asarray(scores, dtype=np.float64)
    length = np.asarray(lengths)
    if s.shape != length.shape:
        raise ValueError(f"{len(scores)} scores but {len(lengths)} lengths")
    valid = np.flatnonzero(np.isfinite(s))
    if len(valid) < 2:
        return None
    s_max, s_min = s[valid].max(), s[valid].min()
    if s_max == s_min:
        return None
    top = valid[s[valid] >= (1 - rho) * s_max + rho * s_min - _BAND_TOL]
    bottom = valid[s[valid] <= (1 - rho) * s_min + rho * s_max + _BAND_TOL]
    if tiebreak == "random":
        chosen, rejected = int(rng.choice(top)), int(rng.choice(bottom))
    else:
        chosen = int(top[np.argmin(length[top])])  # argmin/argmax: first of equals = lowest index
        rejected = int(bottom[np.argmax(length[bottom])])
    if not s[chosen] > s[rejected]:
        return None
    return chosen, rejected
