"""Judge preference pairs: meta-judge battles, position-bias weights, Elo, and the pair choice.

Conventions
-----------
* A battle ``(m, n)`` shows judgment m in the first position (``Judgment A``) and judgment n in
  the second (``Judgment B``). Its result ``r^{mn}`` is 1 if the first position wins, -1 if the
  second wins, 0 for a tie or an unparsable verdict (:func:`verdict_to_result`).
* ``p[m, n]`` is the probability that the first position wins battle (m, n): 1 or 0 for a parsed
  verdict, p(A) / (p(A) + p(B)) from the meta-judge's next-token probabilities otherwise
  (:func:`first_position_probability`).
* Two battle-score rules (``BATTLE_RULES``): ``"paper"``, the positional weights ω of
  Meta-Rewarding over hard verdicts (:func:`battle_matrix`), and ``"order_averaged"``, the
  probability that m beats n averaged over both orders (:func:`order_averaged_matrix`), which
  cancels a position bias battle by battle instead of by batch-wide counts.
* Elo scores are Bradley-Terry log-strengths (natural-log scale, not chess points): the model says
  judgment m beats n with probability σ(e_m - e_n).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Literal, Mapping, Optional, Sequence

import numpy as np

from metajudge.prompts import Winner

Pair = tuple[int, int]
BattleRule = Literal["paper", "order_averaged"]
BATTLE_RULES: tuple[str, ...] = ("paper", "order_averaged")


def battle_pairs(n: int) -> list[Pair]:
    """Every ordered pair ``(m, k)`` of distinct judgments ``0..n-1``: both orders of each pair.

    n = 3 -> [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]; n(n-1) battles in all.
    """
    return [(m, k) for m, k in itertools.product(range(n), repeat=2) if m != k]


def verdict_to_result(verdict: Optional[Winner]) -> int:
    """r = 1 for ``"A"`` (first position wins), -1 for ``"B"``, 0 for None (tie or unparsable)."""
    return {"A": 1, "B": -1, None: 0}[verdict]


def first_position_probability(result: int, p_a: Optional[float] = None, p_b: Optional[float] = None) -> float:
    """p(first position wins) of one battle: ``p_a / (p_a + p_b)`` when the meta-judge's
    probabilities of ``A`` and ``B`` are given (and not both 0), else 1, 0 or 1/2 for r = 1, -1, 0.
    Example: p_a = 0.6, p_b = 0.2 -> 0.75; r = -1 alone -> 0.0.
    """
    if p_a is not None and p_b is not None and p_a + p_b > 0:
        return float(p_a) / (float(p_a) + float(p_b))
    return {1: 1.0, -1: 0.0, 0: 0.5}[int(result)]


def positional_weights(verdicts: Iterable[int]) -> tuple[float, float]:
    """Position-bias weights ``(ω1, ω2)`` over all comparisons of a batch.

    ``verdicts`` hold r in {1, -1, 0} (1: the first position won, -1: the second, 0: tie or
    unparsable). With win_1st = #(r = 1) and win_2nd = #(r = -1):
    ω1 = win_2nd / (win_1st + win_2nd), ω2 = win_1st / (win_1st + win_2nd), so a win in the
    favoured position is worth less. With no decisive verdict: (0.5, 0.5).
    Example: 1, 1, 1, -1, 0 -> (1/4, 3/4).
    """
    verdicts = [int(v) for v in verdicts]
    if any(v not in (1, -1, 0) for v in verdicts):
        raise ValueError(f"verdicts must be 1, -1 or 0, got {sorted(set(verdicts))}")
    win_1st, win_2nd = verdicts.count(1), verdicts.count(-1)
    decisive = win_1st + win_2nd
    if decisive == 0:
        return 0.5, 0.5
    return win_2nd / decisive, win_1st / decisive


def battle_matrix(r: np.ndarray, w1: float, w2: float) -> np.ndarray:
    """Battle scores ``B[m, n] = ω1·[r[m, n] = 1] + ω2·[r[n, m] = -1]``, float64 ``[N, N]``.

    ``r[m, n]`` is the verdict of the battle that shows judgment m first and n second (1, -1 or
    0; 0 also for a battle that was not held). B[m, n] is m's weighted count of wins over n: in the
    first position of battle (m, n) and in the second position of battle (n, m). The diagonal is 0.
    """
    r = np.asarray(r)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or not np.isin(r, (1, -1, 0)).all():
        raise ValueError(f"r must be a square matrix of 1, -1, 0; got shape {r.shape}")
    b = w1 * (r == 1) + w2 * (r.T == -1)
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float64)


def order_averaged_matrix(p: np.ndarray) -> np.ndarray:
    """Battle scores ``B[m, n] = (p[m, n] + 1 - p[n, m]) / 2``, float64 ``[N, N]``, diagonal 0.

    ``p[m, n]`` is the probability that the first position wins battle (m, n) (m shown first).
    B[m, n] is the probability that m beats n, averaged over the two orders, so B[m, n] + B[n, m] = 1
    and a meta-judge that always prefers one position (p constant) gives B = 1/2 everywhere: its
    bias cancels in every battle, and only what depends on the judgments themselves remains.
    Example: p[0, 1] = 0.8, p[1, 0] = 0.7 -> B[0, 1] = 0.55, B[1, 0] = 0.45.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != p.shape[1] or not ((p >= 0) & (p <= 1)).all():
        raise ValueError(f"p must be a square matrix of probabilities; got shape {p.shape}")
    b = 0.5 * (p + 1.0 - p.T)
    np.fill_diagonal(b, 0.0)
    return b


def battle_scores(rule: BattleRule, r: np.ndarray, p: np.ndarray, weights: tuple[float, float]) -> np.ndarray:
    """The battle matrix of ``rule``: :func:`battle_matrix` of the verdicts ``r`` with the batch's
    ``weights`` (ω1, ω2) for ``"paper"``, :func:`order_averaged_matrix` of ``p`` for ``"order_averaged"``."""
    if rule == "paper":
        return battle_matrix(r, *weights)
    if rule == "order_averaged":
        return order_averaged_matrix(p)
    raise ValueError(f"battle rule {rule!r}: expected one of {', '.join(BATTLE_RULES)}")


def results_matrix(n: int, results: Mapping[Pair, int]) -> np.ndarray:
    """The ``[n, n]`` verdict matrix ``r`` from a mapping ``(m, k) -> r^{mk}``; absent battles are 0."""
    r = np.zeros((n, n), dtype=np.int64)
    for (m, k), v in results.items():
        if m == k or not (0 <= m < n and 0 <= k < n) or v not in (1, -1, 0):
            raise ValueError(f"bad battle {(m, k)} -> {v} for n={n}")
        r[m, k] = v
    return r


def probability_matrix(n: int, probs: Mapping[Pair, float]) -> np.ndarray:
    """The ``[n, n]`` matrix ``p`` from a mapping ``(m, k) -> p(first position wins battle (m, k))``;
    absent battles (and the diagonal) are 1/2, no preference."""
    p = np.full((n, n), 0.5)
    for (m, k), v in probs.items():
        if m == k or not (0 <= m < n and 0 <= k < n) or not 0.0 <= v <= 1.0:
            raise ValueError(f"bad battle {(m, k)} -> {v} for n={n}")
        p[m, k] = v
    return p


def _bt_objective(b: np.ndarray, e: np.ndarray, l2: float) -> float:
    """``Σ_{m,k} B[m,k]·log σ(e_m - e_k) - (l2/2)·‖e‖²``."""
    d = e[:, None] - e[None, :]
    return float(np.sum(b * -np.logaddexp(0.0, -d)) - 0.5 * l2 * np.dot(e, e))


def _bt_gradient_hessian(b: np.ndarray, e: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and Hessian of :func:`_bt_objective` in ``e``.

    With p = σ(e_m - e_k): g_j = Σ_k B[j,k](1-p_jk) - Σ_m B[m,j](1-p_mj) - l2·e_j;
    H = -(diag(S·1) - S) - l2·I where S = C + Cᵀ, C[m,k] = B[m,k]·p_mk·(1-p_mk).
    """
    d = e[:, None] - e[None, :]
    p = 0.5 * (1.0 + np.tanh(0.5 * d))  # σ(d), overflow-free
    w = b * (1.0 - p)
    g = w.sum(axis=1) - w.sum(axis=0) - l2 * e
    c = b * p * (1.0 - p)
    s = c + c.T
    h = -(np.diag(s.sum(axis=1)) - s) - l2 * np.eye(len(e))
    return g, h


def elo_scores(
    b: np.ndarray, *, l2: float = 1e-3, iters: int = 100, tol: float = 1e-10
) -> np.ndarray:
    """Bradley-Terry scores ``ε = argmax Σ B[m,k]·log σ(ε_m - ε_k) - (l2/2)·‖ε‖²``.

    The L2 term (l2 > 0) makes the maximiser unique and finite, also when a judgment wins or
    loses every battle; it also centres it (Σ ε = 0 at the optimum). Solved by Newton's method
    from ε = 0 with step halving, so the result is deterministic. Two players with B[0,1] = a,
    B[1,0] = b and l2 → 0 give ε_0 - ε_1 = log(a/b).
    """
    if l2 <= 0:
        raise ValueError("l2 must be > 0 for a unique, finite maximiser")
    b = np.asarray(b, dtype=np.float64)
    e = np.zeros(b.shape[0])
    for _ in range(iters):
        g, h = _bt_gradient_hessian(b, e, l2)
        step = np.linalg.solve(h, -g)
        t, base = 1.0, _bt_objective(b, e, l2)
        while _bt_objective(b, e + t * step, l2) < base and t > 1e-8:
            t *= 0.5
        e = e + t * step
        e = e - e.mean()
        if np.max(np.abs(t * step)) < tol:
            break
    return e


def judge_pair(
    elo: Sequence[float],
    judgment_lengths: Sequence[int],
    max_len: Optional[int],
    *,
    atol: float = 1e-9,
) -> Optional[Pair]:
    """``(chosen, rejected)`` = (highest-Elo judgment, lowest-Elo judgment), or None.

    Ties go to the lowest index on both sides. None when max(ε) - min(ε) <= atol (all judgments
    equal) or when the chosen judgment is longer than ``max_len`` (None: no limit); lengths are in
    whatever unit ``max_len`` uses (characters or tokens).
    """
    elo = np.asarray(elo, dtype=np.float64)
    chosen, rejected = int(np.argmax(elo)), int(np.argmin(elo))
    if elo[chosen] - elo[rejected] <= atol:
        return None
    if max_len is not None and judgment_lengths[chosen] > max_len:
        return None
    return chosen, rejected
