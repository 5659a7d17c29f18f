"""Paired-difference intervals and verdicts against hand-worked numbers (t quantiles from tables)."""

from __future__ import annotations

import math

import pytest

from metajudge.intervals import Interval, combine, flat_verdict, paired_interval, verdict


def test_paired_interval_of_three_differences_uses_the_t_quantile_with_two_degrees_of_freedom():
    # d = 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.3027 (printed tables) -> 2 ± 4.3027 / sqrt(3)
    iv = paired_interval([1.0, 2.0, 3.0])
    assert iv.mean == pytest.approx(2.0) and iv.n == 3
    assert iv.lo == pytest.approx(2 - 4.3027 / math.sqrt(3), abs=1e-3)
    assert iv.hi == pytest.approx(2 + 4.3027 / math.sqrt(3), abs=1e-3)


def test_five_seeds_with_a_clear_gain_reproduce_and_the_opposite_claim_fails():
    # d = .05 .07 .06 .04 .08: mean .06, sd .0158, t_{0.975, 4} = 2.7764 -> .06 ± .0196 = [.0404, .0796]
    iv = paired_interval([0.05, 0.07, 0.06, 0.04, 0.08])
    assert iv.lo == pytest.approx(0.0404, abs=2e-4) and iv.hi == pytest.approx(0.0796, abs=2e-4)
    assert verdict(iv, 1) == "reproduced"
    assert verdict(iv, -1) == "not reproduced"


def test_an_interval_containing_zero_or_too_few_seeds_is_inconclusive():
    assert verdict(paired_interval([0.1, -0.05, 0.02, 0.0, -0.03]), 1) == "inconclusive"
    assert verdict(paired_interval([0.5]), 1) == "inconclusive"
    assert verdict(paired_interval([float("nan"), 0.5]), 1) == "inconclusive"  # one finite seed left
    assert math.isnan(paired_interval([]).mean)


def test_flat_verdict_needs_the_whole_interval_inside_the_margin():
    assert flat_verdict(Interval(0.0, -0.01, 0.02, 5), 0.03) == "reproduced"
    assert flat_verdict(Interval(0.02, -0.01, 0.05, 5), 0.03) == "inconclusive"
    assert flat_verdict(Interval(-0.1, -0.15, -0.05, 5), 0.03) == "not reproduced"


def test_combine_parts():
    assert combine("reproduced", "reproduced") == "reproduced"
    assert combine("reproduced", "inconclusive") == "inconclusive"
    assert combine("inconclusive", "not reproduced") == "not reproduced"
