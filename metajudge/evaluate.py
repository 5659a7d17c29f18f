"""Evaluation statistics: win rate with a bootstrap CI, length-controlled win rate, order averaging.

Conventions
-----------
* ``preferences[i]`` ∈ [0, 1] is the probability that the model's answer beats the baseline's on
  prompt i (1 = model wins, 0 = baseline wins, 0.5 = tie or no verdict). NaN is rejected: an
  unparsed verdict is a tie (0.5), decided in :func:`verdicts_to_preference`.
* The judge runs in both orders. "First" is the run with the model in position A, "second" the run
  with the baseline in position A; every per-run number is P(judge prefers position A).
* Lengths are whatever unit the caller measures (AlpacaEval reports characters).

Length-controlled win rate (AlpacaEval 2's GLM, METHODS.md)
-----------------------------------------------------------
P(model wins on i) = σ(z_i), z_i = θ + φ·x_i + ψ·γ_i, x_i = tanh((L^m_i - L^b_i) / s),
s = std(L^m - L^b) (ddof = 1, as pandas); γ_i a per-instruction difficulty, frozen.
Fitted by penalised maximum likelihood with soft targets p_i (cross-entropy):

    minimise  Σ_i [softplus(z_i) - p_i·z_i] + (λ_φ/2)·φ² + (λ_0/2)·(θ² + ψ²)

(softplus(z) - p·z = -p·log σ(z) - (1-p)·log(1-σ(z))). Solved by SciPy's exact-Hessian trust-region
method from 0 (deterministic). LC = mean_i σ(θ + ψ·γ_i): the predicted win rate with the length term at 0.

Two kinds of LC, named by ``lc_kind`` in :func:`summarize`:

* ``"AlpacaEval LC"`` (``difficulty`` given): γ comes from :func:`instruction_difficulty`, fitted
  once jointly over many models on the same instructions, baseline and judge (per-model θ_m and
  length slope φ_m, shared γ_i), then frozen and reused for every new model. This is AlpacaEval 2's
  model; on its published annotations it reproduces the leaderboard's LC of models left out of the
  γ fit to about a point on average, a few points for models told to be concise (README,
  evaluation section; ``metajudge.alpaca_eval`` reads and writes AlpacaEval's files).
* ``"length-only LC"`` (no ``difficulty``): z_i = θ + φ·x_i. Without γ the length slope also
  absorbs part of the instruction effect (a model's answers are relatively longer on the
  instructions that are easier to win), which inflates φ and with it the LC of models whose answers
  are shorter than the baseline's: biased upward against AlpacaEval's (README, evaluation section:
  about 6 points on average on the fixture's held-out models, 13 for a model told to be concise).
  It is a length correction of our own, never to be reported as AlpacaEval's LC.

* λ_φ = ``length_l2`` (default 1.0, as sklearn's C = 1) keeps φ finite when length alone separates
  wins from losses. It is negligible against the likelihood at n in the hundreds when the judge is
  noisy; when length separates the outcomes exactly, the shrunk φ leaves θ a small bias that fades
  with n (a judge that always picks the longer answer: median LC 0.545 at n = 805, 0.523 at
  n = 5000).
* λ_0 = 1e-3 keeps θ finite when every preference is 0 (or every one is 1): θ then solves
  n·σ(θ) = -λ_0·θ, so n = 50 gives LC ≈ 1.7e-4 and n = 805 gives 1.4e-5. It shrinks toward
  LC = 0.5, the conservative side.
* Degenerate lengths (n < 2, or s = 0, e.g. all lengths equal) give x = 0, hence φ = 0: no length
  term, and LC equals the raw win rate up to λ_0.

AlpacaEval differs in two ways we do not copy: it picks an L1 strength by 5-fold CV (here: fixed
ridges), and it regularises φ and ψ toward two "gamed" (verbose / concise) versions of the
baseline whose judgments we lack. The second is the main source of the remaining difference, which
is largest for models told to be concise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike

from metajudge.prompt_sources import normalise_prompt
from metajudge.prompts import Winner

_WEAK_L2 = 1e-3  # λ_0: on θ and ψ (and per-model θ_m in instruction_difficulty)
DIFFICULTY_L2 = 0.1  # ridge on γ in instruction_difficulty


def _preferences(preferences: ArrayLike) -> np.ndarray:
    """Validated 1-D float64 array of preferences in [0, 1]; at least one."""
    p = np.asarray(preferences, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"preferences must be a non-empty 1-D array, got shape {p.shape}")
    if not np.all((p >= 0.0) & (p <= 1.0)):  # also rejects NaN
        raise ValueError("preferences must lie in [0, 1] (NaN is not allowed)")
    return p


def win_rate(
    preferences: ArrayLike, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(rate, ci_low, ci_high)``: rate = (1/n)·Σ_i p_i, with a percentile bootstrap CI.

    Each of ``n_boot`` replicates draws n prompt indices with replacement (``default_rng(seed)``)
    and takes their mean; the CI is the (α/2, 1 - α/2) quantiles of the replicates,
    α = 1 - confidence.
    Example: [1, 0, 0.5, 1] -> rate 0.625; constant preferences c give (c, c, c).
    """
    p = _preferences(preferences)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    boot = p[rng.integers(0, p.size, size=(n_boot, p.size))].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1.0 - alpha / 2])
    return float(p.mean()), float(lo), float(hi)


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free σ


def _fit_logistic(x, p: np.ndarray, l2: np.ndarray, *, tol: float = 1e-12) -> np.ndarray:
    """``β = argmin Σ_i [softplus(x_i·β) - p_i·x_i·β] + ½·Σ_j l2_j·β_j²`` (soft labels, ridge).

    g = Xᵀ(σ(Xβ) - p) + l2⊙β, H = Xᵀ·diag(σ(1-σ))·X + diag(l2), from β = 0 (deterministic).
    A dense X (a few coefficients) is solved by SciPy's exact-Hessian trust-region method
    (``scipy.optimize.minimize``, ``trust-exact``); a ``scipy.sparse`` X (the joint fit of
    :func:`instruction_difficulty`, hundreds of coefficients) by the Krylov trust-region method
    (``trust-krylov``) on Hessian-vector products H·v, which never forms H. ``tol`` is the gradient
    norm at which the solver stops. Every l2_j > 0, so the objective is strictly convex and the
    minimiser unique and finite. (scikit-learn's ``LogisticRegression`` takes neither soft targets
    nor a separate penalty per coefficient, both of which this fit needs.)
    """
    from scipy.optimize import minimize
    from scipy.sparse import issparse

    def fun(b: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ b
        return float(np.sum(_softplus(z) - p * z) + 0.5 * np.dot(l2 * b, b)), x.T @ (_sigmoid(z) - p) + l2 * b

    def hess(b: np.ndarray) -> np.ndarray:
        q = _sigmoid(x @ b)
        return (x.T * (q * (1.0 - q))) @ x + np.diag(l2)

    def hessp(b: np.ndarray, v: np.ndarray) -> np.ndarray:
        q = _sigmoid(x @ b)
        return x.T @ (q * (1.0 - q) * (x @ v)) + l2 * v

    b0 = np.zeros(x.shape[1])
    if issparse(x):
        res = minimize(fun, b0, jac=True, hessp=hessp, method="trust-krylov", options={"gtol": tol})
    else:
        res = minimize(fun, b0, jac=True, hess=hess, method="trust-exact", options={"gtol": tol})
    if not np.all(np.isfinite(res.x)):
        raise FloatingPointError(f"the logistic fit did not converge: {res.message}")
    return res.x


@dataclass(frozen=True)
class LengthGLM:
    """Fitted z_i = θ + φ·tanh((L^m_i - L^b_i)/length_scale) + ψ·γ_i.

    length_scale = 0 means no length term (φ = 0); ψ = 0 when no difficulty was given.
    """

    theta: float
    phi: float
    psi: float
    length_scale: float


def _length_feature(
    model_lengths: ArrayLike, baseline_lengths: ArrayLike, n: int
) -> tuple[np.ndarray, float]:
    """``(x, s)``: x_i = tanh(d_i/s), d = L^m - L^b, s = std(d, ddof=1);
    x = 0 and s = 0 when n < 2 or s = 0.
    """
    lm = np.asarray(model_lengths, dtype=np.float64)
    lb = np.asarray(baseline_lengths, dtype=np.float64)
    if lm.shape != (n,) or lb.shape != (n,):
        raise ValueError(f"{n} preferences but lengths of shape {lm.shape} and {lb.shape}")
    if not (np.all(np.isfinite(lm)) and np.all(np.isfinite(lb))):
        raise ValueError("lengths must be finite")
    d = lm - lb
    s = float(np.std(d, ddof=1)) if n >= 2 else 0.0
    if not s > 0.0:
        return np.zeros(n), 0.0
    return np.tanh(d / s), s


def fit_length_glm(
    preferences: ArrayLike,
    model_lengths: ArrayLike,
    baseline_lengths: ArrayLike,
    *,
    difficulty: Optional[ArrayLike] = None,
    length_l2: float = 1.0,
) -> LengthGLM:
    """Penalised ML fit of P(model wins on i) = σ(θ + φ·x_i + ψ·γ_i) to soft preferences p_i.

    See the module docstring for the objective; ψ = 0 (column absent) when ``difficulty`` is None.
    γ enters with a fitted coefficient ψ, as in AlpacaEval, so any scale of difficulty works; a
    γ on the logit scale (e.g. from :func:`instruction_difficulty`) gives ψ ≈ 1.
    """
    p = _preferences(preferences)
    if length_l2 <= 0:
        raise ValueError(f"length_l2 must be > 0, got {length_l2}")
    x_len, s = _length_feature(model_lengths, baseline_lengths, p.size)
    gamma = _difficulty(difficulty, p.size)
    x = np.stack([np.ones(p.size), x_len, gamma], axis=1)
    l2 = np.array([_WEAK_L2, length_l2, _WEAK_L2])
    theta, phi, psi = _fit_logistic(x, p, l2)
    return LengthGLM(theta=float(theta), phi=float(phi), psi=float(psi), length_scale=s)


def _difficulty(difficulty: Optional[ArrayLike], n: int) -> np.ndarray:
    """γ as n finite floats; zeros (no difficulty column effect: ψ = 0) when None."""
    if difficulty is None:
        return np.zeros(n)
    gamma = np.asarray(difficulty, dtype=np.float64)
    if gamma.shape != (n,) or not np.all(np.isfinite(gamma)):
        raise ValueError(f"difficulty must be {n} finite numbers, got shape {gamma.shape}")
    return gamma


# Same arguments as ``fit_length_glm``, which it calls: the fit and its win rate take one input.
def lc_win_rate(
    preferences: ArrayLike,
    model_lengths: ArrayLike,
    baseline_lengths: ArrayLike,
    *,
    difficulty: Optional[ArrayLike] = None,
    length_l2: float = 1.0,
) -> float:
    """Length-controlled win rate LC = (1/n)·Σ_i σ(θ + ψ·γ_i), θ, ψ from :func:`fit_length_glm`.

    Without ``difficulty`` this is σ(θ). With equal lengths (no length term) it equals the raw win
    rate up to the weak penalty λ_0; always finite and in [0, 1].
    """
    glm = fit_length_glm(
        preferences, model_lengths, baseline_lengths, difficulty=difficulty, length_l2=length_l2
    )
    gamma = _difficulty(difficulty, np.asarray(preferences).size)
    return float(np.mean(_sigmoid(glm.theta + glm.psi * gamma)))


def instruction_difficulty(
    preferences_mn: ArrayLike,
    model_lengths_mn: Optional[ArrayLike] = None,
    baseline_lengths_mn: Optional[ArrayLike] = None,
    *,
    l2: float = DIFFICULTY_L2,
    length_l2: float = 1.0,
) -> np.ndarray:
    """Per-instruction difficulty γ (logit scale, mean 0), fitted jointly over M models.

    ``preferences_mn[m, i]``: model m against the same baseline on instruction i (NaN = no
    judgment: the cell is left out). With lengths (``[M, N]`` arrays, the caller's unit) the joint
    model is AlpacaEval 2's per-model GLM with a shared instruction term,

        P(model m wins on i) = σ(θ_m + φ_m·x_mi + γ_i),  x_mi = tanh(d_mi / s_m),

    d_m = L^m - L^b over m's judged instructions and s_m = std(d_m, ddof = 1) (as in
    :func:`fit_length_glm`; x_m = 0 when s_m = 0). It is fitted by soft-label penalised ML,

        minimise  Σ_{m,i judged} [softplus(z_mi) - p_mi·z_mi]
                  + (λ_0/2)·Σ_m θ_m² + (length_l2/2)·Σ_m φ_m² + (l2/2)·Σ_i γ_i²,

    and γ - mean(γ) is returned. The ridge on γ identifies it (θ_m + c, γ_i - c fit equally well)
    and shrinks instructions seen by few models; λ_0 = 1e-3 as in the module docstring. γ is then
    frozen and passed as ``difficulty`` to :func:`lc_win_rate` / :func:`summarize` for any model on
    the same instructions and baseline (its scale does not matter there: ψ is fitted per model).

    Without lengths there is no φ_m term: P = σ(θ_m + γ_i). That γ absorbs the length effect
    (instructions where models answer longer look easier), which biases a later LC downward; it is
    kept for callers that have no lengths. γ is only identified across models: use M ≥ 2 (better
    ≥ 10). ``l2`` default (0.1) was chosen on the AlpacaEval fixture (README, evaluation section).
    """
    from scipy.sparse import csr_matrix

    p = np.asarray(preferences_mn, dtype=np.float64)
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"preferences_mn must be a non-empty [M, N] array, got shape {p.shape}")
    if l2 <= 0 or length_l2 <= 0:
        raise ValueError(f"l2 and length_l2 must be > 0, got {l2} and {length_l2}")
    m, n = p.shape
    judged = ~np.isnan(p)
    for k in range(m):
        if not judged[k].any():
            raise ValueError(f"model {k} has no judged instruction (all preferences NaN)")
    _preferences(p[judged])
    if (model_lengths_mn is None) != (baseline_lengths_mn is None):
        raise ValueError("give both model_lengths_mn and baseline_lengths_mn, or neither")
    with_length = model_lengths_mn is not None
    if with_length:
        lm = np.asarray(model_lengths_mn, dtype=np.float64)
        lb = np.asarray(baseline_lengths_mn, dtype=np.float64)
        if lm.shape != p.shape or lb.shape != p.shape:
            raise ValueError(f"preferences of shape {p.shape} but lengths of shape {lm.shape} and {lb.shape}")
        x_len = np.zeros_like(p)
        for k in range(m):
            x_len[k, judged[k]] = _length_feature(lm[k, judged[k]], lb[k, judged[k]], int(judged[k].sum()))[0]
    # one row per judged cell (m, i): columns θ_0..θ_{M-1}, [φ_0..φ_{M-1}], γ_0..γ_{N-1}
    model_idx, instr_idx = np.nonzero(judged)
    rows = np.arange(model_idx.size)
    cols = [model_idx, m * with_length + m + instr_idx]
    vals = [np.ones(rows.size), np.ones(rows.size)]
    if with_length:
        cols.append(m + model_idx)
        vals.append(x_len[model_idx, instr_idx])
    x = csr_matrix(
        (np.concatenate(vals), (np.tile(rows, len(cols)), np.concatenate(cols))),
        shape=(rows.size, m * (1 + with_length) + n),
    )
    l2_vec = np.concatenate([np.full(m, _WEAK_L2), np.full(m * with_length, length_l2), np.full(n, l2)])
    beta = _fit_logistic(x, p[judged], l2_vec, tol=1e-8)
    gamma = beta[m * (1 + with_length):]
    return gamma - gamma.mean()


def order_averaged_preference(p_model_first: ArrayLike, p_model_second: ArrayLike) -> np.ndarray:
    """Preference from both orders: (p_first + (1 - p_second)) / 2.

    p_first[i] = P(judge prefers A) with the model as A; p_second[i] = P(judge prefers A) with the
    baseline as A. A judge that favours position A by a fixed b (p_first = π + b,
    p_second = 1 - π + b) gives back π; one that always says A gives 0.5.
    """
    first = _preferences(p_model_first)
    second = _preferences(p_model_second)
    if first.shape != second.shape:
        raise ValueError(f"{first.size} first-order but {second.size} second-order judgments")
    return 0.5 * (first + (1.0 - second))


_P_FIRST_POSITION = {"A": 1.0, "B": 0.0, None: 0.5}


def verdicts_to_preference(
    verdicts_first: Sequence[Optional[Winner]], verdicts_second: Sequence[Optional[Winner]]
) -> np.ndarray:
    """Order-averaged preference from parsed verdicts: P(A) = 1 for 'A', 0 for 'B', 0.5 for None.

    Example: first (model is A) ['A', 'B', None], second (baseline is A) ['B', 'B', 'A']
    -> model view (1 + 1)/2, (0 + 1)/2, (0.5 + 0)/2 = [1, 0.5, 0.25].
    """
    try:
        first = [_P_FIRST_POSITION[v] for v in verdicts_first]
        second = [_P_FIRST_POSITION[v] for v in verdicts_second]
    except KeyError as e:
        raise ValueError(f"verdict must be 'A', 'B' or None, got {e.args[0]!r}") from None
    return order_averaged_preference(first, second)


LC_KIND_ALPACA_EVAL = "AlpacaEval LC"  # lc_kind with a frozen instruction difficulty γ
LC_KIND_LENGTH_ONLY = "length-only LC"  # lc_kind without γ: not AlpacaEval's number


def summarize(
    preferences: ArrayLike,
    model_lengths: ArrayLike,
    baseline_lengths: ArrayLike,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    difficulty: Optional[ArrayLike] = None,
) -> dict[str, float | int | str]:
    """One results-table row for an iteration's model against the baseline.

    win_rate, ci_low, ci_high (95 % bootstrap), lc_win_rate: fractions in [0, 1];
    avg_length, baseline_avg_length: mean lengths in the caller's unit (chars); n: prompts;
    lc_kind: which LC ``lc_win_rate`` is, ``"AlpacaEval LC"`` when ``difficulty`` (a frozen γ, one
    per prompt, from :func:`instruction_difficulty`) is given, ``"length-only LC"`` otherwise
    (module docstring).
    """
    p = _preferences(preferences)
    rate, lo, hi = win_rate(p, n_boot=n_boot, seed=seed)
    return {
        "win_rate": rate,
        "ci_low": lo,
        "ci_high": hi,
        "lc_win_rate": lc_win_rate(p, model_lengths, baseline_lengths, difficulty=difficulty),
        "lc_kind": LC_KIND_LENGTH_ONLY if difficulty is None else LC_KIND_ALPACA_EVAL,
        "avg_length": float(np.mean(np.asarray(model_lengths, dtype=np.float64))),
        "baseline_avg_length": float(np.mean(np.asarray(baseline_lengths, dtype=np.float64))),
        "n": int(p.size),
    }


# ------------------------------------------------------------------ pairwise judging (pure parts)

_VERDICT_P_A = {"a": 1.0, "b": 0.0, "tie": 0.5}


def judge_outputs_to_p_a(outputs: Sequence[object]) -> tuple[np.ndarray, list[str]]:
    """``(p_a, kinds)`` from a pairwise judge's outputs, one per (instruction, A, B).

    An output is either a probability that A is the better answer (a real number in [0, 1],
    ``kind = "prob"``) or a verdict (``kind = "verdict"``): ``"A"`` -> 1, ``"B"`` -> 0, ``"tie"`` or
    None -> 0.5 (verdict strings are case-insensitive, surrounding spaces ignored).
    Example: [0.8, "B", "tie", None] -> p_a [0.8, 0, 0.5, 0.5], kinds [prob, verdict, verdict,
    verdict]. Anything else (NaN, 1.3, "C", a bool) raises ValueError naming the position.
    """
    p_a: list[float] = []
    kinds: list[str] = []
    for k, out in enumerate(outputs):
        if out is None:
            p_a.append(0.5)
            kinds.append("verdict")
        elif isinstance(out, str):
            key = out.strip().lower()
            if key not in _VERDICT_P_A:
                raise ValueError(f"judge output {k} is {out!r}: verdicts must be 'A', 'B' or 'tie'")
            p_a.append(_VERDICT_P_A[key])
            kinds.append("verdict")
        elif isinstance(out, (int, float, np.integer, np.floating)) and not isinstance(out, (bool, np.bool_)):
            value = float(out)
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"judge output {k} is {out!r}: probabilities must lie in [0, 1]")
            p_a.append(value)
            kinds.append("prob")
        else:
            raise ValueError(
                f"judge output {k} is {out!r} ({type(out).__name__}): expected a probability in "
                "[0, 1] or a verdict 'A', 'B' or 'tie'"
            )
    return np.asarray(p_a, dtype=np.float64), kinds


def both_orders(
    instructions: Sequence[str], model_answers: Sequence[str], baseline_answers: Sequence[str]
) -> list[tuple[str, str, str]]:
    """The judge's inputs for every prompt in both orders: ``2n`` ``(instruction, A, B)`` triples.

    Item ``2i`` has the model's answer as A, item ``2i + 1`` the baseline's; pass the judge's
    P(A) of these items to :func:`preferences_from_both_orders`.
    """
    if not len(instructions) == len(model_answers) == len(baseline_answers):
        raise ValueError(
            f"{len(instructions)} instructions, {len(model_answers)} model answers and "
            f"{len(baseline_answers)} baseline answers: need one of each per prompt"
        )
    out: list[tuple[str, str, str]] = []
    for i, m, b in zip(instructions, model_answers, baseline_answers):
        out += [(i, m, b), (i, b, m)]
    return out


def preferences_from_both_orders(p_a: ArrayLike) -> np.ndarray:
    """Per-prompt preference for the model from P(A) of the :func:`both_orders` items.

    ``p_a[2i]`` (model is A) and ``p_a[2i + 1]`` (baseline is A) give
    :func:`order_averaged_preference`: (p_a[2i] + 1 - p_a[2i + 1]) / 2.
    """
    p = _preferences(p_a)
    if p.size % 2:
        raise ValueError(f"need both orders for every prompt, got an odd number ({p.size}) of judgments")
    return order_averaged_preference(p[0::2], p[1::2])


def select_eval_prompts(
    candidates: Sequence[dict],
    train_prompts: Sequence[dict],
    *,
    max_prompts: int = 0,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """``(selected, overlapping)``: the evaluation prompts that were never training prompts.

    A candidate whose normalised text (case-folded, whitespace collapsed) equals a training
    prompt's is put in ``overlapping`` and never selected; among equal texts only the first
    candidate is kept. The rest are ordered by a SHA-256 hash of (seed, text), which mixes
    categories and does not depend on the file order, and the first ``max_prompts`` are
    selected (all when ``max_prompts`` is 0).
    """
    if max_prompts < 0:
        raise ValueError(f"max_prompts must be >= 0 (0 = all), got {max_prompts}")
    train = {normalise_prompt(p["prompt"]) for p in train_prompts}
    seen: set[str] = set()
    kept: list[tuple[str, dict]] = []
    overlapping: list[dict] = []
    for p in candidates:
        key = normalise_prompt(p["prompt"])
        if key in train:
            overlapping.append(p)
        elif key not in seen:
            seen.add(key)
            digest = hashlib.sha256(f"eval\x1f{seed}\x1f{key}".encode("utf-8")).hexdigest()
            kept.append((digest, p))
    kept.sort(key=lambda x: x[0])
    selected = [p for _, p in kept]
    return (selected[:max_prompts] if max_prompts else selected), overlapping
