"""Gold metrics of the verifiable testbed (:mod:`metajudge.testbed`): the actor's graded answers,
the judge's pairwise ranking accuracy and length bonus, the meta-judge's accuracy on judgment
pairs with a known better judgment, and the gold view of an iteration's DPO pairs."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from metajudge.prompts import parse_score
from metajudge.testbed import MAX_SCORE, gold_winner, grade

def pairwise_accuracy(groups: Sequence[int], gold: Sequence[float], scores: Sequence[Optional[float]]) -> float:
    """Share of same-group pairs with different gold that ``scores`` order the same way.

    A tie in ``scores`` counts one half, a missing score (None or NaN) as a tie. NaN if no pair.
    """
    hits, total = 0.0, 0
    n = len(gold)
    for i in range(n):
        for j in range(i + 1, n):
            if groups[i] != groups[j] or gold[i] == gold[j]:
                continue
            total += 1
            si, sj = scores[i], scores[j]
            if si is None or sj is None or si != si or sj != sj or si == sj:
                hits += 0.5
            elif (si > sj) == (gold[i] > gold[j]):
                hits += 1.0
    return hits / total if total else float("nan")


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def response_metrics(instructions: Sequence[str], responses: Sequence[Sequence[str]]) -> dict[str, float]:
    """Gold metrics of sampled responses: ``quality`` (mean grade / 5), ``exact`` (share exactly
    right), ``chars`` (mean length) and ``filler`` (share with filler)."""
    grades = [grade(i, r) for i, rs in zip(instructions, responses) for r in rs]
    lengths = [len(r) for rs in responses for r in rs]
    return {"quality": _mean([g.quality / MAX_SCORE for g in grades]), "exact": _mean([float(g.exact) for g in grades]),
            "chars": _mean(lengths), "filler": _mean([float(g.filler) for g in grades])}


def judge_metrics(groups: Sequence[Any], gold: Sequence[int], scores: Sequence[Optional[float]],
                  filler: Sequence[bool]) -> dict[str, float]:
    """How well judge scores (one per response; None or NaN when no judgment parsed) match gold.

    ``judge_acc``: :func:`pairwise_accuracy` within each group (prompt); ``judge_mae``: mean
    absolute error; ``judge_length_bonus``: mean (score - gold) on responses with filler minus the
    same on responses without (> 0: the judge pays for length).
    """
    ok = [s is not None and s == s for s in scores]
    err = [s - g for s, g, k in zip(scores, gold, ok) if k]
    with_f = [s - g for s, g, f, k in zip(scores, gold, filler, ok) if k and f]
    without = [s - g for s, g, f, k in zip(scores, gold, filler, ok) if k and not f]
    return {"judge_acc": pairwise_accuracy(groups, gold, scores), "judge_mae": _mean([abs(e) for e in err]),
            "judge_length_bonus": _mean(with_f) - _mean(without) if with_f and without else float("nan"),
            "judge_parsed": _mean([float(k) for k in ok])}


def battle_truth(instruction: str, response: str, first: str, second: str) -> Optional[int]:
    """The gold verdict of a meta-judge battle: 1 if the first judgment's score is closer to the
    gold grade, -1 if the second's, None for a tie or when a score does not parse."""
    sa, sb = parse_score(first), parse_score(second)
    if sa is None or sb is None:
        return None
    w = gold_winner(grade(instruction, response).quality, sa, sb)
    return None if w is None else (1 if w == "A" else -1)


def meta_accuracy(truths: Sequence[Optional[int]], verdicts: Sequence[int]) -> dict[str, float]:
    """``meta_acc``: share of battles with a gold winner whose verdict names it (a tie or an
    unparsed verdict is wrong); ``meta_first``: share of decisive verdicts for the first position."""
    scored = [(t, v) for t, v in zip(truths, verdicts) if t is not None]
    decisive = [v for v in verdicts if v != 0]
    return {"meta_acc": _mean([float(t == v) for t, v in scored]),
            "meta_first": _mean([float(v == 1) for v in decisive])}


def pair_metrics(pairs: Sequence[dict], judged_responses: dict[str, tuple[str, str]]) -> dict[str, float]:
    """Gold view of one iteration's DPO pairs.

    Actor pairs: ``gold_gap`` (mean grade of chosen minus rejected), ``pair_precision`` (share with
    a strictly better chosen), ``chosen_minus_rejected_chars``. Judge pairs (``judged_responses``
    maps a pair's id to the (instruction, response) its judgments are about):
    ``judge_pair_precision``, the share whose chosen judgment's score is strictly closer to gold.
    """
    actor = [p for p in pairs if p.get("kind", "actor") == "actor"]
    gaps, better, dlen = [], [], []
    for p in actor:
        gc, gr = grade(p["prompt"], p["chosen"]).quality, grade(p["prompt"], p["rejected"]).quality
        gaps.append(gc - gr)
        better.append(float(gc > gr))
        dlen.append(len(p["chosen"]) - len(p["rejected"]))
    judge_hits = []
    for p in pairs:
        if p.get("kind") == "judge" and p["id"] in judged_responses:
            t = battle_truth(*judged_responses[p["id"]], p["chosen"], p["rejected"])
            if t is not None:
                judge_hits.append(float(t == 1))
    return {"gold_gap": _mean(gaps), "pair_precision": _mean(better), "chosen_minus_rejected_chars": _mean(dlen),
            "judge_pair_precision": _mean(judge_hits)}


