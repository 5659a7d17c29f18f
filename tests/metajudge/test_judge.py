"""Tests for metajudge.judge: aggregation of sampled judge scores."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metajudge.judge import aggregate_scores, highest_variance_index


def test_aggregate_scores_hand_example_drops_failed_judgments():
    # valid 4, 2, 3: mean = 9/3 = 3; variance = ((4-3)² + (2-3)² + (3-3)²)/3 = 2/3
    mean, var, n_valid, n_failed = aggregate_scores([4.0, None, 2.0, 3.0])
    assert mean == 3.0
    assert var == pytest.approx(2 / 3, abs=1e-15)
    assert (n_valid, n_failed) == (3, 1)


def test_aggregate_scores_counts_nan_as_failed():
    # valid 5, 1: mean 3, variance ((5-3)² + (1-3)²)/2 = 4
    assert aggregate_scores([5.0, math.nan, 1.0]) == (3.0, 4.0, 2, 1)


def test_aggregate_scores_single_valid_score_has_zero_variance():
    assert aggregate_scores([None, 2.5]) == (2.5, 0.0, 1, 1)


@pytest.mark.parametrize("scores, n_failed", [([None, None], 2), ([], 0)])
def test_aggregate_scores_with_no_valid_score_gives_nan(scores, n_failed):
    mean, var, n_valid, failed = aggregate_scores(scores)
    assert math.isnan(mean) and math.isnan(var)
    assert (n_valid, failed) == (0, n_failed)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(0, 10).map(lambda k: k / 2)), max_size=12))
def test_aggregate_scores_matches_numpy_population_mean_and_variance(scores):
    valid = np.array([s for s in scores if s is not None], dtype=np.float64)
    mean, var, n_valid, n_failed = aggregate_scores(scores)
    assert (n_valid, n_failed) == (len(valid), len(scores) - len(valid))
    if len(valid):
        assert mean == pytest.approx(np.mean(valid), abs=1e-12)
        assert var == pytest.approx(np.var(valid, ddof=0), abs=1e-12)


def test_highest_variance_index_hand_example():
    # variances: [3,3,3] -> 0; [1,5] -> ((1-3)² + (5-3)²)/2 = 4; [2,4,3] -> (1+1+0)/3 = 2/3
    assert highest_variance_index([[3, 3, 3], [1, 5, None], [2, 4, 3]]) == 1


def test_highest_variance_index_ties_go_to_the_first_response():
    # [1,3] and [3,1] both have variance 1
    assert highest_variance_index([[1, 3], [3, 1], [2, 2]]) == 0


def test_highest_variance_index_exact_tie_survives_reordering_of_float_scores():
    # the same multiset in another order has exactly the same variance: the first one wins
    assert highest_variance_index([[0.1, 0.2, 0.7, 3.3], [3.3, 0.7, 0.1, 0.2]]) == 0


def test_highest_variance_index_skips_responses_with_fewer_than_two_valid_scores():
    # response 0 has only one valid score (its variance would be 0 anyway); response 2 has none
    assert highest_variance_index([[0.0, None], [2, 3], [None, math.nan]]) == 1


@pytest.mark.parametrize("score_lists", [[], [[4.0]], [[None, 1.0], [math.nan]]])
def test_highest_variance_index_is_none_without_a_response_with_two_valid_scores(score_lists):
    assert highest_variance_index(score_lists) is None


def test_highest_variance_index_returns_first_eligible_when_all_judges_agree():
    assert highest_variance_index([[5], [2, 2], [3, 3]]) == 1
