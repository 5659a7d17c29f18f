"""Tests for metajudge.pairs: actor pairs with length control."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metajudge.pairs import select_actor_pair

NAN = math.nan


def test_select_actor_pair_hand_example_with_length_control():
    # S_max = 5, S_min = 1, ρ = 0.25: chosen band [0.75·5 + 0.25·1, 5] = [4, 5] -> indices 0, 1,
    # shortest is 1 (300); rejected band [1, 0.75·1 + 0.25·5] = [1, 2] -> indices 2, 3,
    # longest is 3 (400)
    assert select_actor_pair([5, 4, 1, 2], [900, 300, 100, 400], rho=0.25) == (1, 3)


def test_select_actor_pair_rho_zero_is_best_versus_worst():
    # bands collapse to {5} and {1}: the long 4.9 and short 1.1 are out
    assert select_actor_pair([4.9, 5, 1, 1.1], [1, 500, 900, 2], rho=0.0) == (1, 2)


def test_select_actor_pair_rho_zero_still_prefers_the_shortest_of_equal_best():
    # two responses score S_max = 5: the shorter (40) is chosen
    assert select_actor_pair([3, 5, 1, 5], [1, 50, 2, 40], rho=0.0) == (3, 2)


def test_select_actor_pair_ignores_unjudged_nan_scores():
    # index 0 is NaN (and the shortest): the valid scores are 2 and 4
    assert select_actor_pair([NAN, 2, 4], [1, 100, 100], rho=0.0) == (2, 1)


@pytest.mark.parametrize("scores", [[3, 3, 3], [NAN, 2, NAN], [NAN, NAN], [], [4.0, 4.0, NAN]])
def test_select_actor_pair_is_none_for_equal_scores_or_fewer_than_two_valid(scores):
    assert select_actor_pair(scores, [10] * len(scores), rho=0.2) is None


def test_select_actor_pair_equal_lengths_go_to_the_lowest_index():
    assert select_actor_pair([5, 5, 1, 1], [10, 10, 30, 30], rho=0.0) == (0, 2)


def test_select_actor_pair_band_bound_is_inclusive_despite_float_rounding():
    # ρ = 0.1, S_max = 3, S_min = 1: chosen band lower bound = 0.9·3 + 0.1·1 = 2.8 exactly,
    # but in float64 it is 2.8000000000000003 > 2.8; the response scoring 2.8 (e.g. the mean
    # of five judgments summing to 14) must still qualify
    assert (1 - 0.1) * 3 + 0.1 * 1 > 2.8
    assert select_actor_pair([3, 2.8, 1], [100, 10, 50], rho=0.1) == (1, 2)


def test_select_actor_pair_at_rho_one_half_drops_a_pair_of_one_response_with_itself():
    # ρ = 0.5: both bands contain the midpoint 3; index 1 is the shortest in [3, 5] and the
    # longest in [1, 3], so chosen == rejected: no pair
    assert select_actor_pair([5, 3, 1], [100, 50, 10], rho=0.5) is None


@pytest.mark.parametrize("rho", [-0.1, 0.51, 1.0])
def test_select_actor_pair_rejects_rho_outside_zero_to_one_half(rho):
    with pytest.raises(ValueError):
        select_actor_pair([1, 2], [1, 2], rho=rho)


def test_select_actor_pair_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        select_actor_pair([1, 2, 3], [1, 2], rho=0.0)


def _oracle(scores, lengths, rho):
    """The METHODS.md rule by enumeration, bounds computed exactly on integer half-points."""
    valid = [i for i, s in enumerate(scores) if not math.isnan(s)]
    if len(valid) < 2 or len({scores[i] for i in valid}) == 1:
        return None
    hi, lo = max(scores[i] for i in valid), min(scores[i] for i in valid)
    top = [i for i in valid if scores[i] * 100 >= (100 - rho) * hi + rho * lo]  # ρ in percent
    bottom = [i for i in valid if scores[i] * 100 <= (100 - rho) * lo + rho * hi]
    chosen = min(top, key=lambda i: (lengths[i], i))
    rejected = min(bottom, key=lambda i: (-lengths[i], i))
    return (chosen, rejected) if scores[chosen] > scores[rejected] else None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.one_of(st.integers(0, 5), st.just(None)), st.integers(1, 6)), max_size=8),
    st.sampled_from([0, 10, 25, 32, 40, 50]),
)
def test_select_actor_pair_matches_enumeration_oracle(rows, rho_percent):
    scores = [NAN if s is None else float(s) for s, _ in rows]
    lengths = [n for _, n in rows]
    expected = _oracle(scores, lengths, rho_percent)
    assert select_actor_pair(scores, lengths, rho_percent / 100) == expected


def test_random_tiebreak_picks_uniformly_among_equal_best_and_worst_with_no_length_preference():
    """Scores [4, 2, 4, 2] at ρ=0: chosen is 0 or 2, rejected 1 or 3, each about half the time over
    4,000 draws (a binomial's 3-sigma band is ±0.024), although index 2 is the shortest and 1 the longest."""
    import numpy as np

    rng = np.random.default_rng(0)
    picks = [select_actor_pair([4, 2, 4, 2], [500, 900, 10, 20], 0.0, tiebreak="random", rng=rng) for _ in range(4000)]
    assert {p[0] for p in picks} == {0, 2} and {p[1] for p in picks} == {1, 3}
    assert abs(np.mean([p[0] == 2 for p in picks]) - 0.5) < 0.025
    assert abs(np.mean([p[1] == 3 for p in picks]) - 0.5) < 0.025
    # a unique best and worst leave nothing to chance
    assert select_actor_pair([1, 5, 3], [1, 2, 3], 0.0, tiebreak="random", rng=rng) == (1, 0)
    with pytest.raises(ValueError, match="needs rng"):
        select_actor_pair([1, 5], [1, 2], 0.0, tiebreak="random")
