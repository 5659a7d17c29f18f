"""The loop's pair building on hand-made stage records (no model)."""

from __future__ import annotations

import dataclasses

import pytest

from experiments.loop import LoopConfig, build_pairs


def _records():
    generated = [
        {"id": "p1", "prompt": "Name a colour.", "responses": ["Red.", "Blue is a colour of the sky.", "Green, the colour of grass and leaves."]},
        {"id": "p2", "prompt": "Say hi.", "responses": ["Hi!", "Hello."]},
    ]
    judged = [
        # p1: means 4, 2, 4 -> with rho=0: chosen = shortest of the 4s (index 0), rejected = index 1
        {"id": "p1", "response_index": 0, "scores": [4, 4, 4], "mean": 4.0, "judgments": ["a", "b", "c"]},
        {"id": "p1", "response_index": 1, "scores": [1, 3, 2], "mean": 2.0, "judgments": ["long judgment d", "e", "f"]},
        {"id": "p1", "response_index": 2, "scores": [5, 3, 4], "mean": 4.0, "judgments": ["g", "h", "i"]},
        # p2: equal means -> no actor pair
        {"id": "p2", "response_index": 0, "scores": [3, 3, 3], "mean": 3.0, "judgments": ["j", "k", "l"]},
        {"id": "p2", "response_index": 1, "scores": [3, 3, 3], "mean": 3.0, "judgments": ["m", "n", "o"]},
    ]
    # Meta-judge on p1's response 1 (highest variance). Verdicts r[m, n] (m shown first):
    # (0,1)=1 (1,0)=-1 -> judgment 0 beats 1 in both orders; (0,2)=1 (2,0)=-1 -> 0 beats 2;
    # (1,2)=1 (2,1)=1 -> split by position. win_1st = 4, win_2nd = 2 -> w1 = 1/3, w2 = 2/3.
    battles = [(0, 1, 1), (1, 0, -1), (0, 2, 1), (2, 0, -1), (1, 2, 1), (2, 1, 1)]
    metajudged = [{"id": "p1", "prompt": "Name a colour.", "response_index": 1, "response": "Blue is a colour of the sky.",
                   "judgments": ["long judgment d", "e", "f"],
                   "battles": [{"first": m, "second": n, "verdict": v, "fallback": False} for m, n, v in battles]}]
    return generated, judged, metajudged


def test_actor_and_judge_pairs_from_hand_worked_records():
    generated, judged, metajudged = _records()
    pairs, stats = build_pairs(LoopConfig(), 1, generated, judged, metajudged)
    actor = [p for p in pairs if p["kind"] == "actor"]
    judge = [p for p in pairs if p["kind"] == "judge"]
    assert [(p["chosen"], p["rejected"]) for p in actor] == [("Red.", "Blue is a colour of the sky.")]
    assert stats["actor_pairs"] == 1 and stats["score_gap"] == pytest.approx(2.0)
    # B[0,1] = w1 + w2 = 1, B[0,2] = 1, B[1,2] = w1 = 1/3, B[2,1] = w1 = 1/3: judgment 0 is best;
    # 1 and 2 tie for worst, the lowest index (1) is rejected.
    assert stats["position_weights"] == pytest.approx([1 / 3, 2 / 3])
    assert stats["first_position_win_rate"] == pytest.approx(4 / 6)
    assert [(p["chosen"], p["rejected"]) for p in judge] == [("long judgment d", "e")]
    assert "Blue is a colour of the sky." in judge[0]["prompt"] and "Score:" in judge[0]["prompt"]


def test_judgment_length_cap_drops_the_judge_pair():
    generated, judged, metajudged = _records()
    cfg = dataclasses.replace(LoopConfig(), judgment_max_chars=5)  # "long judgment d" has 15 chars
    pairs, stats = build_pairs(cfg, 1, generated, judged, metajudged)
    assert stats["judge_pairs"] == 0 and all(p["kind"] == "actor" for p in pairs)


def test_rho_schedule_takes_the_iteration_value_and_repeats_the_last():
    cfg = dataclasses.replace(LoopConfig(), rho=(0.0, 0.32, 0.4))
    assert [cfg.rho_at(t) for t in (1, 2, 3, 4, 5)] == [0.0, 0.32, 0.4, 0.4, 0.4]
