"""From stage records to DPO records: the loop's pairs stage, one rule of METHODS.md per function.

The stages of an iteration store plain records (``metajudge.stages``):

* generated: ``{"id", "prompt", "responses": [K texts]}`` per prompt;
* judged: ``{"id", "response_index", "scores": [N], "mean", "judgments": [N texts]}`` per response;
* meta-judged: ``{"id", "prompt", "response_index", "response", "judgments", "battles": [{"first",
  "second", "verdict", "p_first"}, ...]}`` per prompt.

The functions here turn them into DPO records ``{"kind": "actor" | "judge", "id", "prompt",
"chosen", "rejected", ...}``, applying the per-prompt rules of :mod:`metajudge.pairs`,
:mod:`metajudge.temporal` and :mod:`metajudge.meta_judge`. They take the settings they need
(ρ, the battle rule, the judgment length limit) as values and touch no model.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

import numpy as np

from metajudge import meta_judge as mj
from metajudge.judge import highest_variance_index
from metajudge.pairs import Tiebreak, select_actor_pair
from metajudge.prompts import judge_prompt
from metajudge.temporal import anchored_pair, future_guided_chosen


def by_prompt(judged: list[dict]) -> dict[str, list[dict]]:
    """Judged records grouped by prompt id, each group in response order."""
    out: dict[str, list[dict]] = {}
    for r in judged:
        out.setdefault(r["id"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r["response_index"])
    return out


def _actor_record(g: dict, chosen: str, rejected: str, s_c: float, s_r: float, **extra: Any) -> dict:
    return {"kind": "actor", "id": g["id"], "prompt": g["prompt"], "chosen": chosen, "rejected": rejected,
            "chosen_score": float(s_c), "rejected_score": float(s_r), **extra}


def tiebreak_rng(seed: int, prompt_id: str) -> np.random.Generator:
    """The generator of one prompt's random tie-break: a function of the run's seed, the iteration
    (folded into ``seed`` by the caller) and the prompt id only, so a resumed run picks the same."""
    return np.random.default_rng([seed, zlib.crc32(prompt_id.encode())])


def actor_pairs(generated: list[dict], judged: list[dict], rho: float, *, tiebreak: Tiebreak = "length",
                seed: int = 0) -> list[dict]:
    """Self-/Meta-Rewarding actor pairs, one per prompt at most.

    With S_max, S_min a prompt's highest and lowest mean scores: chosen from the responses scored
    in [(1-ρ)·S_max + ρ·S_min, S_max], rejected from those scored in [S_min, (1-ρ)·S_min + ρ·S_max]
    (:func:`metajudge.pairs.select_actor_pair`): with ``tiebreak="length"`` (length control) the
    shortest chosen and the longest rejected; with ``"random"`` uniformly, seeded per prompt by
    :func:`tiebreak_rng` (``seed``, prompt id). ρ = 0 is best vs worst; prompts whose scores are all
    equal give no pair.
    """
    grouped = by_prompt(judged)
    pairs = []
    for g in generated:
        scores = [r["mean"] for r in grouped[g["id"]]]
        rng = tiebreak_rng(seed, g["id"]) if tiebreak == "random" else None
        sel = select_actor_pair(scores, [len(x) for x in g["responses"]], rho, tiebreak=tiebreak, rng=rng)
        if sel is not None:
            c, r = sel
            pairs.append(_actor_record(g, g["responses"][c], g["responses"][r], scores[c], scores[r]))
    return pairs


def anchored_pairs(generated: list[dict], judged: list[dict], initial_generated: Optional[list[dict]],
                   initial_judged: Optional[list[dict]]) -> list[dict]:
    """D1 of Temporal Self-Rewarding: M_t's best vs the lower of M_0's worst and M_t's worst.

    All scores are M_t's judgments. Without initial responses (iteration 1, where M_0 = M_t) the
    rejected is M_t's worst. Records carry ``rejected_source`` ("initial" or "current").
    """
    grouped = by_prompt(judged)
    init_gen = {g["id"]: g for g in initial_generated or []}
    init_scores = {pid: [r["mean"] for r in rows] for pid, rows in by_prompt(initial_judged or []).items()}
    pairs = []
    for g in generated:
        scores = [r["mean"] for r in grouped[g["id"]]]
        initial = init_scores.get(g["id"], [])
        sel = anchored_pair(scores, initial)
        if sel is None:
            continue
        c, source, r = sel
        rejected, s_r = ((init_gen[g["id"]]["responses"][r], initial[r]) if source == "initial"
                         else (g["responses"][r], scores[r]))
        pairs.append(_actor_record(g, g["responses"][c], rejected, scores[c], s_r,
                                   chosen_source="current", rejected_source=source))
    return pairs


def future_guided_pairs(anchored: list[dict], future_generated: list[dict], future_judged: list[dict]) -> list[dict]:
    """D2 of Temporal Self-Rewarding: the future model's best replaces an anchored pair's chosen
    response when M_t scores it strictly higher; the rejected is kept; ties are dropped."""
    fut_gen = {g["id"]: g for g in future_generated}
    fut_scores = {pid: [r["mean"] for r in rows] for pid, rows in by_prompt(future_judged).items()}
    pairs = []
    for p in anchored:
        sel = future_guided_chosen(p["chosen_score"], p["rejected_score"], fut_scores.get(p["id"], []))
        if sel is None:
            continue
        source, i = sel
        if source == "future":
            p = dict(p, chosen=fut_gen[p["id"]]["responses"][i], chosen_score=float(fut_scores[p["id"]][i]),
                     chosen_source="future")
        pairs.append(p)
    return pairs


def meta_judge_targets(generated: list[dict], judged: list[dict]) -> list[dict]:
    """Step 1 of the judge pairs: per prompt, the response whose N judgment scores have the highest
    variance, with its judgments (the meta-judge stage's items); prompts without one are skipped."""
    grouped = by_prompt(judged)
    targets = []
    for g in generated:
        rows = grouped[g["id"]]
        k = highest_variance_index([r["scores"] for r in rows])
        if k is not None:
            targets.append({"id": g["id"], "prompt": g["prompt"], "response_index": k,
                            "response": g["responses"][k], "judgments": rows[k]["judgments"]})
    return targets


def _p_first(b: dict) -> float:
    """p(first position wins) of a stored battle; runs from before it was recorded: from the verdict."""
    return b.get("p_first", mj.first_position_probability(b["verdict"]))


def judge_pairs(metajudged: list[dict], battle_rule: mj.BattleRule, judgment_max_chars: Optional[int]) -> tuple[list[dict], dict]:
    """Meta-Rewarding judge pairs: chosen = the highest-Elo judgment, rejected = the lowest, with
    ε = argmax Σ B_mn·log σ(ε_m − ε_n); pairs whose chosen judgment is over ``judgment_max_chars``
    are dropped. B under ``battle_rule``: ``paper``, B_mn = ω1·[r^{mn} = 1] + ω2·[r^{nm} = -1] with
    the position weights ω over the batch's verdicts; ``order_averaged``, P(m beats n) averaged over
    both orders. Returns the pairs and their statistics (weights, Elo spread, position rates)."""
    battles = [b for x in metajudged for b in x["battles"]]
    verdicts = [b["verdict"] for b in battles]
    w1, w2 = mj.positional_weights(verdicts)
    pairs, spreads = [], []
    for x in metajudged:
        n = len(x["judgments"])
        r = mj.results_matrix(n, {(b["first"], b["second"]): b["verdict"] for b in x["battles"]})
        p = mj.probability_matrix(n, {(b["first"], b["second"]): _p_first(b) for b in x["battles"]})
        elo = mj.elo_scores(mj.battle_scores(battle_rule, r, p, (w1, w2)))
        spreads.append(float(elo.max() - elo.min()))
        sel = mj.judge_pair(elo, [len(j) for j in x["judgments"]], judgment_max_chars)
        if sel is not None:
            c, rj = sel
            pairs.append({"kind": "judge", "id": x["id"], "prompt": judge_prompt(x["prompt"], x["response"]),
                          "chosen": x["judgments"][c], "rejected": x["judgments"][rj]})
    decisive = sum(v != 0 for v in verdicts)
    stats = {"judge_pairs": len(pairs), "position_weights": [w1, w2], "battle_rule": battle_rule,
             "elo_spread": float(np.mean(spreads)) if spreads else float("nan"),
             "first_position_win_rate": (sum(v == 1 for v in verdicts) / decisive) if decisive else float("nan"),
             "first_position_prob": float(np.mean([_p_first(b) for b in battles])) if battles else float("nan")}
    return pairs, stats


def build_pairs(generated: list[dict], judged: list[dict], metajudged: Optional[list[dict]], *, rho: float,
                battle_rule: mj.BattleRule, judgment_max_chars: Optional[int],
                actor: Optional[list[dict]] = None, tiebreak: Tiebreak = "length",
                seed: int = 0) -> tuple[list[dict], dict]:
    """An iteration's DPO records with statistics: the actor pairs (``actor`` when given, e.g. the
    temporally anchored ones; else :func:`actor_pairs` with ``rho``, ``tiebreak`` and ``seed``), then the judge pairs of
    :func:`judge_pairs` when there are meta-judged records."""
    pairs = actor if actor is not None else actor_pairs(generated, judged, rho, tiebreak=tiebreak, seed=seed)
    gaps = [p["chosen_score"] - p["rejected_score"] for p in pairs]
    stats: dict[str, Any] = {"actor_pairs": len(pairs), "score_gap": float(np.mean(gaps)) if gaps else float("nan")}
    if actor is not None:
        stats["future_chosen"] = sum(p.get("chosen_source") == "future" for p in pairs)
        stats["initial_rejected"] = sum(p.get("rejected_source") == "initial" for p in pairs)
    if metajudged:
        jp, js = judge_pairs(metajudged, battle_rule, judgment_max_chars)
        pairs = pairs + jp
        stats.update(js)
    return pairs, stats
