"""Verdicts on claims from paired differences over seeds.

A claim compares two quantities measured on the same seeds (e.g. Meta-Rewarding's and
Self-Rewarding's judge accuracy at the last iteration, both started from seed s's model). Its
evidence is the per-seed difference ``d_s``; :func:`paired_interval` gives the mean of ``d`` with a
two-sided Student-t confidence interval, ``mean ± t_{(1+level)/2, n-1} · sd(d) / sqrt(n)`` (sample
sd, ``ddof=1``), and :func:`verdict` reads it against the claimed sign:

* ``"reproduced"``: the interval lies entirely on the claimed side of zero;
* ``"not reproduced"``: it lies entirely on the other side;
* ``"inconclusive"``: it contains zero (or there are fewer than two seeds).

A claim that something stays *flat* cannot be shown by excluding zero; :func:`flat_verdict` calls it
reproduced when the whole interval lies inside ``±margin``, not reproduced when the whole interval
lies outside it, inconclusive otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import numpy as np
from scipy import stats

Verdict = Literal["reproduced", "not reproduced", "inconclusive"]


@dataclasses.dataclass(frozen=True)
class Interval:
    """Mean of the paired differences and its confidence interval ``[lo, hi]`` over ``n`` seeds."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    def text(self, fmt: str = "{:+.3f}") -> str:
        """``+0.042 [+0.010, +0.074]`` (the mean, then the interval)."""
        return f"{fmt.format(self.mean)} [{fmt.format(self.lo)}, {fmt.format(self.hi)}]"


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> Interval:
    """Student-t interval of the mean of per-seed differences (non-finite entries are dropped).

    With one difference the interval is unbounded (``[-inf, inf]``), with none the mean is NaN.
    Example: d = [1, 2, 3] -> mean 2, sd 1, t_{0.975, 2} = 4.303, interval 2 ± 4.303/sqrt(3) =
    [-0.484, 4.484].
    """
    d = np.asarray([x for x in diffs if math.isfinite(x)], dtype=np.float64)
    n = len(d)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, level)
    mean = float(d.mean())
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1, level)
    half = float(stats.t.ppf((1 + level) / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n, level)


def verdict(iv: Interval, direction: Literal[1, -1]) -> Verdict:
    """The claim "the difference has sign ``direction``" read from ``iv`` (module docstring)."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be 1 or -1, got {direction!r}")
    lo, hi = (iv.lo, iv.hi) if direction == 1 else (-iv.hi, -iv.lo)
    if iv.n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "not reproduced"
    return "inconclusive"


def flat_verdict(iv: Interval, margin: float) -> Verdict:
    """The claim "the difference stays within ``±margin``" read from ``iv``."""
    if iv.n < 2 or not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return "inconclusive"
    if -margin < iv.lo and iv.hi < margin:
        return "reproduced"
    if iv.lo >= margin or iv.hi <= -margin:
        return "not reproduced"
    return "inconclusive"


def combine(*verdicts: Verdict) -> Verdict:
    """A claim made of parts: reproduced when every part is, not reproduced when any part is not."""
    if any(v == "not reproduced" for v in verdicts):
        return "not reproduced"
    if verdicts and all(v == "reproduced" for v in verdicts):
        return "reproduced"
    return "inconclusive"
