"""Tests for metajudge.meta_judge: battles, position weights, battle matrix, Elo, judge pairs."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metajudge.meta_judge import (
    battle_matrix,
    battle_pairs,
    battle_scores,
    elo_scores,
    first_position_probability,
    judge_pair,
    order_averaged_matrix,
    positional_weights,
    probability_matrix,
    results_matrix,
    verdict_to_result,
)

# --- independent oracles ------------------------------------------------------------------------


def _bt_mle_by_minorisation(b: np.ndarray, iters: int = 20000) -> np.ndarray:
    """Unpenalised Bradley-Terry MLE by Hunter's (2004) MM algorithm, centred log-strengths.

    p_i <- W_i / Σ_{j≠i} N_ij / (p_i + p_j), W_i = Σ_j B_ij, N_ij = B_ij + B_ji. Needs every
    judgment to win and lose somewhere in a connected comparison graph (true when B > 0 off the
    diagonal).
    """
    wins, games = b.sum(axis=1), b + b.T
    p = np.ones(b.shape[0])
    for _ in range(iters):
        new = wins / np.sum(games / (p[:, None] + p[None, :]), axis=1)  # games has a 0 diagonal
        new /= np.exp(np.mean(np.log(new)))
        if np.max(np.abs(new - p)) < 1e-14:
            break
        p = new
    return np.log(p) - np.mean(np.log(p))


def _penalised_objective(b: np.ndarray, e: np.ndarray, l2: float) -> float:
    """Σ_{m≠n} B_mn log σ(e_m - e_n) - (l2/2) Σ e², written out term by term."""
    total = 0.0
    for m in range(len(e)):
        for n in range(len(e)):
            if m != n:
                total += b[m, n] * -math.log1p(math.exp(-(e[m] - e[n])))
    return total - 0.5 * l2 * sum(x * x for x in e)


# --- battles and weights ------------------------------------------------------------------------


def test_battle_pairs_lists_both_orders_of_each_pair():
    assert battle_pairs(3) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 11])
def test_battle_pairs_count_is_n_times_n_minus_one_and_each_pair_appears_in_both_orders(n):
    pairs = battle_pairs(n)
    assert len(pairs) == n * (n - 1) == len(set(pairs))
    assert all((k, m) in pairs and m != k for m, k in pairs)


def test_verdict_to_result_maps_first_position_win_to_plus_one():
    assert [verdict_to_result(v) for v in ("A", "B", None)] == [1, -1, 0]


def test_position_weights_hand_example():
    # win_1st = 3 (A), win_2nd = 1 (B), None ignored: ω1 = 1/(3+1), ω2 = 3/(3+1)
    assert positional_weights([1, 1, 1, -1, 0]) == (0.25, 0.75)


@pytest.mark.parametrize("verdicts", [[], [0, 0]])
def test_position_weights_without_decisive_verdicts_are_one_half_each(verdicts):
    assert positional_weights(verdicts) == (0.5, 0.5)


def test_position_weights_when_second_position_always_wins():
    # win_1st = 0, win_2nd = 2: ω1 = 2/2 = 1 (first-position wins are rare, so worth full), ω2 = 0
    assert positional_weights(iter([-1, -1])) == (1.0, 0.0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([1, -1, 0]), max_size=40))
def test_position_weights_match_numpy_counts(verdicts):
    v = np.array(verdicts)
    win_1st, win_2nd = int(np.sum(v == 1)), int(np.sum(v == -1))
    w1, w2 = positional_weights(verdicts)
    if win_1st + win_2nd:
        assert w1 == pytest.approx(win_2nd / (win_1st + win_2nd))
        assert w2 == pytest.approx(win_1st / (win_1st + win_2nd))
        assert w1 + w2 == pytest.approx(1.0)


# --- battle matrix ------------------------------------------------------------------------------


def test_battle_matrix_hand_example():
    # ω1 = 0.25, ω2 = 0.75.
    # (0,1): r=1  -> B[0,1] += ω1 (0 won in first position)
    # (1,0): r=-1 -> B[0,1] += ω2 (0 won in second position)      => B[0,1] = 1.0
    # (0,2): r=0  -> nothing;  (2,0): r=1 -> B[2,0] += ω1          => B[2,0] = 0.25
    # (1,2): r=-1 -> B[2,1] += ω2;  (2,1): r=1 -> B[2,1] += ω1     => B[2,1] = 1.0
    results = {(0, 1): 1, (1, 0): -1, (0, 2): 0, (2, 0): 1, (1, 2): -1, (2, 1): 1}
    expected = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.25, 1.0, 0.0]])
    np.testing.assert_array_equal(battle_matrix(results_matrix(3, results), 0.25, 0.75), expected)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.sampled_from([1, -1, 0]), min_size=n * (n - 1), max_size=n * (n - 1)),
            st.floats(0, 1),
        )
    )
)
def test_battle_matrix_matches_the_formula_entry_by_entry(case):
    n, rs, w1 = case
    w2 = 1.0 - w1
    results = dict(zip(battle_pairs(n), rs))
    b = battle_matrix(results_matrix(n, results), w1, w2)
    for m in range(n):
        for k in range(n):
            want = 0.0 if m == k else w1 * (results[(m, k)] == 1) + w2 * (results[(k, m)] == -1)
            assert b[m, k] == pytest.approx(want)


def test_battle_matrix_missing_battle_counts_as_no_result():
    b = battle_matrix(results_matrix(2, {(0, 1): -1}), 0.5, 0.5)  # (1, 0) absent; (0, 1): 1 won as second
    np.testing.assert_array_equal(b, [[0.0, 0.0], [0.5, 0.0]])


@pytest.mark.parametrize("results", [{(0, 0): 1}, {(0, 2): 1}, {(0, 1): 2}])
def test_results_matrix_rejects_bad_battles(results):
    with pytest.raises(ValueError):
        results_matrix(2, results)


def test_battle_matrix_rejects_verdicts_outside_plus_minus_one_and_zero():
    with pytest.raises(ValueError):
        battle_matrix(np.array([[0, 2], [1, 0]]), 0.5, 0.5)


# --- Elo ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [(3.0, 1.0), (1.0, 4.0), (0.4, 0.4)])
def test_elo_two_players_difference_is_log_of_win_ratio(a, b):
    # maximise a·log σ(d) + b·log σ(-d): σ(d) = a/(a+b), so d = log(a/b)
    e = elo_scores(np.array([[0.0, a], [b, 0.0]]), l2=1e-10)
    assert e[0] - e[1] == pytest.approx(math.log(a / b), abs=1e-6)
    assert e.sum() == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5), st.integers(0, 2**32 - 1))
def test_elo_matches_minorisation_maximum_likelihood(n, seed):
    b = np.random.default_rng(seed).uniform(0.1, 2.0, size=(n, n))
    np.fill_diagonal(b, 0.0)
    np.testing.assert_allclose(elo_scores(b, l2=1e-10), _bt_mle_by_minorisation(b), atol=1e-6)


def test_elo_with_a_judgment_winning_every_battle_is_finite_and_a_stationary_point():
    # judgment 0 beats everyone, 2 loses to everyone: no finite MLE, the L2 term makes one
    b = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 0.5], [0.0, 0.2, 0.0]])
    e = elo_scores(b, l2=0.1)
    assert np.all(np.isfinite(e)) and e[0] > e[1] > e[2]
    assert e.sum() == pytest.approx(0.0, abs=1e-12)
    h = 1e-6  # central finite differences of the written-out objective vanish at the maximiser
    for j in range(3):
        step = np.eye(3)[j] * h
        up, down = _penalised_objective(b, e + step, 0.1), _penalised_objective(b, e - step, 0.1)
        grad = (up - down) / (2 * h)
        assert abs(grad) < 1e-6
    for trial in np.random.default_rng(0).normal(scale=0.1, size=(20, 3)):
        assert _penalised_objective(b, e + trial, 0.1) <= _penalised_objective(b, e, 0.1)


def test_elo_of_symmetric_battles_is_all_zero():
    b = np.full((4, 4), 0.5)
    np.fill_diagonal(b, 0.0)
    np.testing.assert_array_equal(elo_scores(b), np.zeros(4))


def test_elo_rejects_non_positive_l2():
    with pytest.raises(ValueError):
        elo_scores(np.zeros((2, 2)), l2=0.0)


# --- judge pair ---------------------------------------------------------------------------------


def test_judge_pair_picks_highest_versus_first_lowest_elo():
    # max 0.3 at index 2; min -0.5 at indices 1 and 3 -> the first, 1
    assert judge_pair([0.2, -0.5, 0.3, -0.5], [10, 20, 30, 40], max_len=100) == (2, 1)


def test_judge_pair_drops_a_chosen_judgment_over_the_length_limit():
    assert judge_pair([0.2, -0.5, 0.3], [10, 20, 30], max_len=29) is None
    assert judge_pair([0.2, -0.5, 0.3], [10, 20, 30], max_len=30) == (2, 1)  # limit inclusive
    assert judge_pair([0.2, -0.5, 0.3], [10, 20, 10**6], max_len=None) == (2, 1)


def test_judge_pair_is_none_when_all_elo_scores_are_equal():
    assert judge_pair([0.0, 0.0, 0.0], [1, 2, 3], max_len=None) is None


def test_judge_pair_end_to_end_hand_example():
    # battles (0,1) (1,0) (0,2) (2,0) (1,2) (2,1) with verdicts B A B A A None:
    # win_1st = 3, win_2nd = 2 -> ω1 = 2/5, ω2 = 3/5
    # B[1,0] = ω1·[r10=1] + ω2·[r01=-1] = 2/5 + 3/5 = 1;  B[2,0] likewise = 1
    # B[1,2] = ω1·[r12=1] + ω2·[r21=-1] = 2/5 + 0
    # B[2,1] = ω1·[r21=1] + ω2·[r12=-1] = 0 + 0
    # 1 beats 0 and 2, 2 beats only 0, 0 beats nobody -> Elo order 1 > 2 > 0, pair (1, 0)
    verdicts = {(0, 1): "B", (1, 0): "A", (0, 2): "B", (2, 0): "A", (1, 2): "A", (2, 1): None}
    assert sorted(verdicts) == sorted(battle_pairs(3))
    results = {pair: verdict_to_result(v) for pair, v in verdicts.items()}
    w1, w2 = positional_weights(results.values())
    assert (w1, w2) == pytest.approx((0.4, 0.6))
    b = battle_matrix(results_matrix(3, results), w1, w2)
    np.testing.assert_allclose(b, [[0, 0, 0], [1, 0, 0.4], [1, 0, 0]])
    e = elo_scores(b)
    assert e[1] > e[2] > e[0]
    assert judge_pair(e, [100, 200, 300], max_len=250) == (1, 0)


def test_elo_with_judgments_that_had_no_battles_is_finite_and_zero_for_them():
    # Judgment 2 never battled (all verdicts unparsable): it must get 0, not NaN.
    b = np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    e = elo_scores(b)
    assert np.all(np.isfinite(e)) and abs(e.sum()) < 1e-9
    assert e[0] > 0 > e[1] and abs(e[2]) < 1e-6
    assert np.all(elo_scores(np.zeros((4, 4))) == 0.0)


def test_first_position_probability_from_probabilities_or_the_verdict():
    assert first_position_probability(1, 0.6, 0.2) == pytest.approx(0.75)
    assert first_position_probability(-1, 0.1, 0.3) == pytest.approx(0.25)
    assert [first_position_probability(r) for r in (1, -1, 0)] == [1.0, 0.0, 0.5]
    assert first_position_probability(0, 0.0, 0.0) == 0.5  # no mass on either letter: the verdict decides


def test_order_averaged_matrix_hand_example():
    # p[0,1] = 0.8 (0 shown first wins w.p. 0.8), p[1,0] = 0.7 (1 shown first wins w.p. 0.7):
    # B[0,1] = (0.8 + 1 - 0.7) / 2 = 0.55, B[1,0] = (0.7 + 1 - 0.8) / 2 = 0.45
    b = order_averaged_matrix(np.array([[0.5, 0.8], [0.7, 0.5]]))
    np.testing.assert_allclose(b, [[0.0, 0.55], [0.45, 0.0]])
    # Two players: the Elo difference is log(B01 / B10) (the l2 term shrinks it by ~1e-3).
    e = elo_scores(b, l2=1e-9)
    assert e[0] - e[1] == pytest.approx(np.log(0.55 / 0.45), rel=1e-6)


def test_order_averaged_scores_cancel_a_constant_position_bias_that_the_paper_rule_cannot_rank():
    # A meta-judge that says "A" every time, with p(A) slightly higher when judgment 2 is shown first
    # and slightly lower when judgment 0 is: the paper's weights make every battle the same score
    # (flat Elo, no pair); the order-averaged scores still rank 2 > 1 > 0.
    n = 3
    lean = {0: -0.02, 1: 0.0, 2: 0.02}
    pairs = battle_pairs(n)
    p = probability_matrix(n, {(m, k): 0.8 + lean[m] - lean[k] for m, k in pairs})
    r = results_matrix(n, {pair: 1 for pair in pairs})
    w = positional_weights(r[~np.eye(n, dtype=bool)])
    flat = elo_scores(battle_scores("paper", r, p, w))
    assert judge_pair(flat, [1, 1, 1], max_len=None) is None
    ranked = elo_scores(battle_scores("order_averaged", r, p, w))
    assert ranked[2] > ranked[1] > ranked[0]
    assert judge_pair(ranked, [1, 1, 1], max_len=None) == (2, 0)
    # Numpy oracle of the rule, battle by battle.
    b = battle_scores("order_averaged", r, p, w)
    for m, k in pairs:
        assert b[m, k] == pytest.approx(0.5 * (p[m, k] + 1 - p[k, m]))
        assert b[m, k] + b[k, m] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="battle rule 'x'"):
        battle_scores("x", r, p, w)


def test_probability_matrix_fills_absent_battles_with_one_half_and_rejects_bad_entries():
    np.testing.assert_allclose(probability_matrix(2, {(0, 1): 0.9}), [[0.5, 0.9], [0.5, 0.5]])
    with pytest.raises(ValueError):
        probability_matrix(2, {(0, 1): 1.5})
    with pytest.raises(ValueError):
        probability_matrix(2, {(1, 1): 0.5})
