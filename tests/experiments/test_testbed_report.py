"""The testbed's claims on hand-made per-seed rows: verdicts follow the paired intervals."""

from __future__ import annotations

import pytest

from experiments.testbed_report import aggregate, claims, claims_markdown, regressions


def _rows(q, j, chars, gap):
    """Rows for iterations 0..len(q)-1 with the given actor quality, judge acc, length and gold gap."""
    return [{"iteration": t, "actor_quality": q[t], "judge_acc": j[t], "actor_chars": chars[t],
             **({"gold_gap": gap[t]} if t else {})} for t in range(len(q))]


def _world(seeds=5):
    """Per seed s (offsets e = 0.01*s keep the seeds apart but the differences steady):
    Self-Rewarding: quality .60 -> .70 -> .70 -> .70, judge flat at .80 ± .002, length 40 -> 50,
    gap 1.0 -> 0.5; Meta-Rewarding: judge .80 -> .85, quality .72 + small noise at iter 3;
    temporal: gap 1.0 -> 1.0 (wider by 0.5 at iterations 2..3)."""
    rows = {"self_reward": {}, "meta_reward": {}, "temporal_self_reward": {}}
    for s in range(seeds):
        e = 0.01 * s
        sign = 1 if s % 2 else -1
        rows["self_reward"][s] = _rows([.6 + e, .7 + e, .7 + e, .7 + e], [.8, .8, .8, .8 + .002 * sign],
                                       [40, 45, 48, 50 + s], [0, 1.0, .5, .5])
        rows["meta_reward"][s] = _rows([.6 + e, .7 + e, .71 + e, .7 + e + .02 * sign], [.8, .82, .84, .85 + .001 * s],
                                       [40, 42, 41, 40], [0, 1.0, .7, .6])
        rows["temporal_self_reward"][s] = _rows([.6 + e, .75 + e, .7 + e, .6 + e], [.8] * 4, [40, 45, 50, 55],
                                                [0, 1.0, 1.0 + .01 * s, 1.0])
    return rows


def test_claims_verdicts_from_hand_made_seeds():
    found = {c["claim"]: c for c in claims(_world(), 3)}
    stall = found["Self-Rewarding improves the actor, then stalls, while the judge stays flat"]
    # later gain 0 minus first gain 0.1 = -0.1 on every seed; judge change ±0.002, inside ±0.03
    assert stall["parts"]["stall"]["interval"]["mean"] == pytest.approx(-0.1)
    assert stall["verdict"] == "reproduced"
    judge = found["Meta-Rewarding raises judge accuracy"]
    # (.85 + .001 s) - (.80 -/+ .002) = .052, .049, .054, .051, .056: mean .0524, well above 0
    assert judge["parts"]["judge"]["interval"]["mean"] == pytest.approx(0.0524)
    assert judge["verdict"] == "reproduced"
    # Meta-Rewarding's actor is ±0.02 around Self-Rewarding's: the interval holds 0
    assert found["Meta-Rewarding ends with a better actor than Self-Rewarding"]["verdict"] == "inconclusive"
    length = found["Without length control, length inflates"]
    assert length["parts"]["length"]["diffs"] == [10, 11, 12, 13, 14] and length["verdict"] == "reproduced"
    gap = found["Temporal anchoring keeps the chosen-rejected gap wider than Self-Rewarding"]
    assert gap["parts"]["gap"]["interval"]["mean"] == pytest.approx(0.5 + 0.01 * 2 / 2)
    assert gap["verdict"] == "reproduced"
    text = claims_markdown(list(found.values()))
    assert "over 5 seeds" in text and "**inconclusive**" in text


def test_a_judge_that_moves_fails_the_flat_part_and_reversed_differences_are_not_reproduced():
    rows = _world()
    for s, r in rows["self_reward"].items():
        r[3]["judge_acc"] = 0.9 + 0.001 * s  # +0.1: outside ±0.03
    for s, r in rows["meta_reward"].items():
        r[3]["judge_acc"] = 0.7 - 0.001 * s
    found = {c["claim"]: c["verdict"] for c in claims(rows, 3)}
    assert found["Self-Rewarding improves the actor, then stalls, while the judge stays flat"] == "not reproduced"
    assert found["Meta-Rewarding raises judge accuracy"] == "not reproduced"


def test_regressions_name_the_method_whose_actor_falls_by_more_than_the_spread():
    rows = _world()
    agg = aggregate(rows, 3)
    found = regressions(agg, 3)
    assert len(found) == 1 and found[0].startswith("Temporal Self-Rewarding: actor quality 0.770")
