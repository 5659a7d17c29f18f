"""Tests for metajudge.evaluate: win rate and CI, length-controlled win rate, order averaging."""

import math

import numpy as np
import pytest

from metajudge.evaluate import (
    fit_length_glm,
    instruction_difficulty,
    lc_win_rate,
    order_averaged_preference,
    summarize,
    verdicts_to_preference,
    win_rate,
)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def simulated_lengths(rng, n):
    """Baseline ~ lognormal around 1650 chars, model a little longer (around 1800)."""
    return rng.lognormal(7.5, 0.4, n), rng.lognormal(7.4, 0.4, n)  # model, baseline


def length_feature(lm, lb):
    d = lm - lb
    return np.tanh(d / np.std(d, ddof=1))


# ---------------------------------------------------------------- win rate and bootstrap CI


def test_win_rate_hand_example():
    # (1 + 0 + 0.5 + 1) / 4 = 0.625
    rate, lo, hi = win_rate([1.0, 0.0, 0.5, 1.0], n_boot=500)
    assert rate == 0.625
    assert 0.0 <= lo <= rate <= hi <= 1.0


def test_win_rate_constant_preferences_have_a_zero_width_ci():
    assert win_rate([0.5] * 7, n_boot=100) == (0.5, 0.5, 0.5)


def test_win_rate_ci_is_deterministic_by_seed_and_changes_with_it():
    p = np.random.default_rng(3).random(100)
    assert win_rate(p, n_boot=300, seed=5) == win_rate(p, n_boot=300, seed=5)
    assert win_rate(p, n_boot=300, seed=5) != win_rate(p, n_boot=300, seed=6)


def test_win_rate_ci_width_matches_the_normal_approximation():
    # n = 400 Bernoulli(0.3): the 95 % CI half-width is ≈ 1.96·sqrt(0.3·0.7/400) = 0.0449
    p = (np.random.default_rng(0).random(400) < 0.3).astype(float)
    rate, lo, hi = win_rate(p, n_boot=2000)
    half = 1.96 * math.sqrt(rate * (1 - rate) / 400)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)


def test_bootstrap_ci_covers_the_true_rate_about_95_percent_of_the_time():
    # verdict-like preferences: 0 / 0.5 / 1 with probabilities 0.25 / 0.1 / 0.65 -> true rate 0.7
    rng = np.random.default_rng(2024)
    covered = 0
    for k in range(200):
        p = rng.choice([0.0, 0.5, 1.0], size=150, p=[0.25, 0.1, 0.65])
        _, lo, hi = win_rate(p, n_boot=400, seed=k)
        covered += lo <= 0.7 <= hi
    assert 180 <= covered <= 198  # 90 % .. 99 %


@pytest.mark.parametrize("bad", [[], [0.5, 1.2], [0.5, -0.1], [0.5, math.nan], [[0.5]]])
def test_win_rate_rejects_bad_preferences(bad):
    with pytest.raises(ValueError):
        win_rate(bad)


# ---------------------------------------------------------------- length-controlled win rate


def test_fit_recovers_theta_and_phi_from_exact_soft_preferences():
    # targets are the model's own probabilities: the unpenalised ML fit is exactly (θ, φ);
    # the ridge on φ moves it by ≈ λ·φ / (Fisher information ≈ 100) ≈ 0.01
    rng = np.random.default_rng(0)
    lm, lb = simulated_lengths(rng, 2000)
    theta, phi = -0.4, 1.5
    p = sigmoid(theta + phi * length_feature(lm, lb))
    glm = fit_length_glm(p, lm, lb)
    assert glm.theta == pytest.approx(theta, abs=0.02)
    assert glm.phi == pytest.approx(phi, abs=0.03)
    assert glm.psi == 0.0
    assert glm.length_scale == pytest.approx(np.std(lm - lb, ddof=1))
    assert lc_win_rate(p, lm, lb) == pytest.approx(sigmoid(theta), abs=0.005)


def test_fit_recovers_theta_and_phi_from_bernoulli_outcomes():
    # n = 20 000 hard 0/1 outcomes from σ(θ + φ·x): standard errors ≈ 0.02 (θ), 0.03 (φ)
    rng = np.random.default_rng(1)
    n = 20_000
    lm, lb = simulated_lengths(rng, n)
    theta, phi = -0.5, 1.2
    y = (rng.random(n) < sigmoid(theta + phi * length_feature(lm, lb))).astype(float)
    glm = fit_length_glm(y, lm, lb)
    assert glm.theta == pytest.approx(theta, abs=0.08)
    assert glm.phi == pytest.approx(phi, abs=0.12)
    lc = lc_win_rate(y, lm, lb)
    assert lc == pytest.approx(sigmoid(theta), abs=0.02)
    assert y.mean() > lc + 0.02  # the raw rate is inflated by the model's longer answers


def test_a_judge_that_prefers_the_longer_answer_gives_lc_near_one_half():
    # preference = 1 iff the model's answer is longer; the model is longer ≈ 77 % of the time.
    # Length separates the outcomes perfectly, so only the ridge on φ stops φ → ∞; it leaves θ a
    # small positive bias that shrinks with n (median LC over seeds: 0.545 at n = 805, 0.523 at
    # n = 5000, worst of 100 seeds 0.551)
    rng = np.random.default_rng(0)
    n = 5000
    lb = rng.uniform(500, 3000, n)
    lm = lb + rng.normal(300, 400, n)
    p = (lm > lb).astype(float)
    rate, _, _ = win_rate(p, n_boot=200)
    assert rate > 0.7
    assert abs(lc_win_rate(p, lm, lb) - 0.5) < 0.07


def test_a_noisy_judge_driven_only_by_length_gives_lc_near_one_half():
    # P(model wins) = σ(3·x_i): equal quality (θ = 0), strong length bias; |LC - 0.5| ≤ 0.027 over
    # 100 seeds
    rng = np.random.default_rng(1)
    n = 5000
    lb = rng.uniform(500, 3000, n)
    lm = lb + rng.normal(300, 400, n)
    y = (rng.random(n) < sigmoid(3.0 * length_feature(lm, lb))).astype(float)
    assert y.mean() > 0.65
    assert abs(lc_win_rate(y, lm, lb) - 0.5) < 0.04


def test_lc_with_given_difficulty_recovers_all_coefficients_and_averages_over_instructions():
    rng = np.random.default_rng(7)
    n = 3000
    lm, lb = simulated_lengths(rng, n)
    gamma = rng.normal(0.0, 1.5, n)
    theta, phi = 0.3, 0.8
    p = sigmoid(theta + phi * length_feature(lm, lb) + gamma)  # ψ = 1
    glm = fit_length_glm(p, lm, lb, difficulty=gamma)
    assert (glm.theta, glm.phi, glm.psi) == pytest.approx((theta, phi, 1.0), abs=0.02)
    expected = np.mean(sigmoid(theta + gamma))  # ≈ 0.55, well below σ(0.3) = 0.574
    assert lc_win_rate(p, lm, lb, difficulty=gamma) == pytest.approx(expected, abs=0.005)


def test_instruction_difficulty_is_recovered_from_several_models():
    # 8 models of known strength θ_m against one baseline on 300 instructions of difficulty γ_i
    rng = np.random.default_rng(11)
    m, n = 8, 300
    theta_m = np.linspace(-1.0, 1.0, m)
    gamma = rng.normal(0.0, 1.0, n)
    y = (rng.random((m, n)) < sigmoid(theta_m[:, None] + gamma[None, :])).astype(float)
    est = instruction_difficulty(y)
    assert abs(est.mean()) < 1e-12
    assert np.corrcoef(est, gamma)[0, 1] > 0.65  # 0.72 .. 0.81 over 50 seeds


def test_equal_lengths_drop_the_length_term_and_lc_equals_the_raw_rate():
    p = [1.0, 0.0, 0.5, 1.0, 1.0]
    lengths = [1000] * 5
    glm = fit_length_glm(p, lengths, lengths)
    assert glm.phi == 0.0 and glm.length_scale == 0.0
    assert lc_win_rate(p, lengths, lengths) == pytest.approx(0.7, abs=1e-3)  # up to λ_0


def test_a_constant_length_difference_has_zero_std_and_no_length_term():
    p = [1.0, 0.0, 1.0]
    glm = fit_length_glm(p, [300, 400, 500], [100, 200, 300])  # d = 200 everywhere, std 0
    assert glm.phi == 0.0 and glm.length_scale == 0.0
    assert lc_win_rate(p, [300, 400, 500], [100, 200, 300]) == pytest.approx(2 / 3, abs=1e-3)


@pytest.mark.parametrize("value", [0.0, 1.0])
@pytest.mark.parametrize("n", [1, 50])
def test_all_wins_or_all_losses_give_a_finite_lc_near_the_edge(value, n):
    rng = np.random.default_rng(n)
    lm, lb = rng.uniform(100, 2000, n), rng.uniform(100, 2000, n)
    lc = lc_win_rate(np.full(n, value), lm, lb)
    assert math.isfinite(lc) and 0.0 <= lc <= 1.0
    assert abs(lc - value) < 0.01


def test_all_losses_stationarity_matches_the_documented_penalty():
    # all p = 0, n = 50, no length term: θ solves 50·σ(θ) = -1e-3·θ, i.e. LC ≈ 1.74e-4
    lc = lc_win_rate(np.zeros(50), np.ones(50), np.ones(50))
    theta = math.log(lc / (1 - lc))
    assert 50 * lc == pytest.approx(-1e-3 * theta, rel=1e-6)
    assert lc == pytest.approx(1.74e-4, rel=0.01)


def test_length_that_perfectly_separates_outcomes_still_gives_a_finite_fit():
    lm = np.array([100.0, 200, 300, 400, 500, 600])
    lb = np.full(6, 350.0)
    p = (lm > lb).astype(float)
    glm = fit_length_glm(p, lm, lb)
    assert all(math.isfinite(v) for v in (glm.theta, glm.phi))
    assert glm.phi > 1.0
    assert 0.0 <= lc_win_rate(p, lm, lb) <= 1.0


def test_lc_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        lc_win_rate([0.5, 1.0], [1, 2, 3], [1, 2])


# ---------------------------------------------------------------- order averaging


def test_order_averaging_removes_a_pure_position_bias():
    # a judge that always prefers position A, whoever stands there
    assert np.array_equal(order_averaged_preference([1.0, 1.0], [1.0, 1.0]), [0.5, 0.5])
    assert np.array_equal(verdicts_to_preference(["A"] * 4, ["A"] * 4), [0.5] * 4)


def test_order_averaging_recovers_the_preference_under_an_additive_position_bias():
    # true preference π, judge adds b = 0.15 to position A: p_first = π + b, p_second = 1 - π + b
    pi = np.array([0.2, 0.4, 0.5, 0.8])
    out = order_averaged_preference(pi + 0.15, 1 - pi + 0.15)
    assert out == pytest.approx(pi)


def test_verdicts_to_preference_hand_example():
    # model view, first order (model is A): A -> 1, B -> 0, None -> 0.5, A -> 1
    # second order (model is B):            B -> 1, B -> 1, A -> 0, None -> 0.5
    out = verdicts_to_preference(["A", "B", None, "A"], ["B", "B", "A", None])
    assert out.tolist() == [1.0, 0.5, 0.25, 0.75]


def test_verdicts_to_preference_rejects_unknown_verdicts():
    with pytest.raises(ValueError):
        verdicts_to_preference(["A", "tie"], ["B", "A"])
    with pytest.raises(ValueError):
        verdicts_to_preference(["A"], ["B", "A"])


# ---------------------------------------------------------------- results row


def test_summarize_hand_example():
    row = summarize([1.0, 0.0, 1.0, 0.5], [100, 200, 300, 400], [100, 100, 100, 100], n_boot=200)
    assert set(row) == {
        "win_rate", "ci_low", "ci_high", "lc_win_rate", "avg_length", "baseline_avg_length", "n"
    }
    assert row["win_rate"] == 0.625
    assert row["avg_length"] == 250.0 and row["baseline_avg_length"] == 100.0 and row["n"] == 4
    assert 0.0 <= row["ci_low"] <= 0.625 <= row["ci_high"] <= 1.0
    assert 0.0 <= row["lc_win_rate"] <= 1.0
