"""Tests for metajudge.temporal: past-anchored rejection and future-guided chosen."""

import math

import pytest

from metajudge.temporal import anchored_pair, future_guided_chosen

NAN = math.nan


# --- anchored_pair ------------------------------------------------------------------------------


def test_anchored_pair_takes_the_initial_worst_when_strictly_below_the_current_worst():
    # current best 5 (index 1), current worst 2; initial worst 1 (index 0) < 2 -> initial anchors
    assert anchored_pair([3, 5, 2], [1, 4]) == (1, "initial", 0)


def test_anchored_pair_keeps_the_current_worst_when_the_initial_worst_only_ties_it():
    # initial worst 2 == current worst 2: not strictly below -> current index 2
    assert anchored_pair([3, 5, 2], [2, 4]) == (1, "current", 2)


def test_anchored_pair_keeps_the_current_worst_when_the_initial_is_better():
    assert anchored_pair([3, 5, 2], [4, 3]) == (1, "current", 2)


def test_anchored_pair_ties_go_to_the_first_index():
    # best 5 at 0 and 1 -> 0; current worst 1 at 2 and 3 -> 2; initial worst 0 at 1 and 2 -> 1
    assert anchored_pair([5, 5, 1, 1], [3, 3, 4]) == (0, "current", 2)
    assert anchored_pair([5, 5, 1, 1], [3, 0, 0]) == (0, "initial", 1)


def test_anchored_pair_ignores_unjudged_nan_scores():
    # current valid: 4 (index 1) only; initial valid: 2 (index 1)
    assert anchored_pair([NAN, 4], [NAN, 2]) == (1, "initial", 1)
    assert anchored_pair([3, NAN, 1], [NAN, NAN]) == (0, "current", 2)


def test_anchored_pair_all_equal_current_scores_give_a_pair_only_through_the_initial_model():
    # current all 3: chosen 3 vs current worst 3 -> no pair; an initial 2 anchors -> pair
    assert anchored_pair([3, 3], [3, 4]) is None
    assert anchored_pair([3, 3], [3, 2]) == (0, "initial", 1)


@pytest.mark.parametrize("current, initial", [([NAN, NAN], [1, 2]), ([], [1]), ([2], [])])
def test_anchored_pair_is_none_without_a_chosen_strictly_above_a_rejected(current, initial):
    assert anchored_pair(current, initial) is None


# --- future_guided_chosen -----------------------------------------------------------------------


def test_future_guided_chosen_replaces_with_the_future_best_when_strictly_higher():
    # future best 4.5 at indices 1 and 2 -> first, 1; 4.5 > current chosen 4 -> future
    assert future_guided_chosen(4.0, 1.0, [3, 4.5, 4.5]) == ("future", 1)


def test_future_guided_chosen_keeps_the_current_chosen_on_a_tie_or_a_worse_future():
    assert future_guided_chosen(4.0, 1.0, [4.0, 2.0]) == ("current", None)
    assert future_guided_chosen(4.0, 1.0, [0.5]) == ("current", None)


def test_future_guided_chosen_keeps_the_current_chosen_when_the_future_is_unjudged():
    assert future_guided_chosen(4.0, 1.0, [NAN, NAN]) == ("current", None)
    assert future_guided_chosen(4.0, 1.0, []) == ("current", None)


def test_future_guided_chosen_ignores_nan_when_finding_the_future_best():
    assert future_guided_chosen(3.0, 1.0, [NAN, 3.5, NAN]) == ("future", 1)


def test_future_guided_chosen_can_rescue_a_pair_with_no_margin():
    # chosen 2 == rejected 2: kept alone it gives no pair; the future's 3 > 2 replaces it
    assert future_guided_chosen(2.0, 2.0, [1.0]) is None
    assert future_guided_chosen(2.0, 2.0, [1.0, 3.0]) == ("future", 1)


def test_future_guided_chosen_is_none_when_the_final_chosen_is_not_above_the_rejected():
    assert future_guided_chosen(1.0, 2.0, [1.5]) is None  # future 1.5 > 1 replaces, 1.5 <= 2


@pytest.mark.parametrize("chosen, rejected", [(NAN, 1.0), (4.0, NAN), (math.inf, 1.0)])
def test_future_guided_chosen_rejects_non_finite_current_scores(chosen, rejected):
    with pytest.raises(ValueError):
        future_guided_chosen(chosen, rejected, [1.0])
