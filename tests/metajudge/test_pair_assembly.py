"""Pair assembly (stage records -> DPO records) on hand-made stage records (no model)."""

from __future__ import annotations

import pytest

from metajudge.pair_assembly import anchored_pairs, build_pairs, future_guided_pairs

# The loop's default settings (LoopConfig): rho 0 in iteration 1, the paper's battle rule,
# judgments over 1500 characters dropped.
DEFAULTS = dict(rho=0.0, battle_rule="paper", judgment_max_chars=1500)


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
    pairs, stats = build_pairs(generated, judged, metajudged, **DEFAULTS)
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
    cfg = dict(DEFAULTS, judgment_max_chars=5)  # "long judgment d" has 15 chars
    pairs, stats = build_pairs(generated, judged, metajudged, **cfg)
    assert stats["judge_pairs"] == 0 and all(p["kind"] == "actor" for p in pairs)


def _judged(pid, means):
    return [{"id": pid, "response_index": k, "mean": m} for k, m in enumerate(means)]


def test_anchored_then_future_guided_pairs_on_hand_worked_records():
    generated = [{"id": p, "prompt": p + "?", "responses": [f"{p}-cur{k}" for k in range(3)]} for p in ("a", "b", "c", "d")]
    judged = _judged("a", [3, 5, 2]) + _judged("b", [3, 5, 2]) + _judged("c", [4, 4, 4]) + _judged("d", [2, 4, 3])
    initial = [{"id": p, "prompt": p + "?", "responses": [f"{p}-init{k}" for k in range(2)]} for p in ("a", "b", "c", "d")]
    # a: M_0's worst (1) is below M_t's worst (2) -> rejected from M_0, index 0
    # b: M_0's worst (2) ties M_t's worst -> not strictly lower, rejected stays M_t's index 2
    # c: all M_t scores equal, M_0's worst 4 is not lower -> no pair
    # d: M_0's worst 1.5 (index 1) replaces M_t's worst 2
    initial_judged = _judged("a", [1, 4]) + _judged("b", [2, 4]) + _judged("c", [4, 4.5]) + _judged("d", [3, 1.5])
    d1 = anchored_pairs(generated, judged, initial, initial_judged)
    assert [(p["id"], p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"], p["rejected_source"]) for p in d1] == [
        ("a", "a-cur1", "a-init0", 5.0, 1.0, "initial"),
        ("b", "b-cur1", "b-cur2", 5.0, 2.0, "current"),
        ("d", "d-cur1", "d-init1", 4.0, 1.5, "initial"),
    ]
    # Without M_0's responses (iteration 1) the rejected is M_t's worst.
    assert [p["rejected"] for p in anchored_pairs(generated, judged, None, None)] == ["a-cur2", "b-cur2", "d-cur0"]

    future = [{"id": p, "prompt": p + "?", "responses": [f"{p}-fut{k}" for k in range(3)]} for p in ("a", "b", "d")]
    # a: future best 5.5 (index 2, first of the ties) > 5 -> replaces the chosen
    # b: future best 5 ties the chosen -> kept from M_t
    # d: future scores all NaN (no valid judgment) -> kept from M_t
    future_judged = _judged("a", [4, 5.5, 5.5])[::-1] + _judged("b", [5, 1, 0]) + _judged("d", [float("nan")] * 3)
    d2 = future_guided_pairs(d1, future, future_judged)
    assert [(p["id"], p["chosen"], p["chosen_score"], p["chosen_source"], p["rejected"]) for p in d2] == [
        ("a", "a-fut1", 5.5, "future", "a-init0"),
        ("b", "b-cur1", 5.0, "current", "b-cur2"),
        ("d", "d-cur1", 4.0, "current", "d-init1"),
    ]


def test_build_pairs_uses_given_actor_pairs_and_counts_their_sources():
    generated, judged, metajudged = _records()
    actor = [{"kind": "actor", "id": "p1", "prompt": "Name a colour.", "chosen": "x", "rejected": "y",
              "chosen_score": 4.5, "rejected_score": 1.0, "chosen_source": "future", "rejected_source": "initial"}]
    pairs, stats = build_pairs(generated, judged, metajudged, **DEFAULTS, actor=actor)
    assert pairs[0] == actor[0] and {p["kind"] for p in pairs[1:]} == {"judge"}
    assert stats["actor_pairs"] == 1 and stats["score_gap"] == 3.5
    assert stats["future_chosen"] == 1 and stats["initial_rejected"] == 1


def test_order_averaged_battle_rule_ranks_judgments_from_first_position_probabilities():
    generated, judged, metajudged = _records()
    # p(first wins) per battle; averaged over both orders: P(0 beats 1) = (0.9 + 1 - 0.6) / 2 = 0.65,
    # P(0 beats 2) = (0.9 + 1 - 0.7) / 2 = 0.6, P(1 beats 2) = (0.8 + 1 - 0.9) / 2 = 0.45:
    # 0 is best, 1 is worst (it loses to both).
    p = {(0, 1): 0.9, (1, 0): 0.6, (0, 2): 0.9, (2, 0): 0.7, (1, 2): 0.8, (2, 1): 0.9}
    for b in metajudged[0]["battles"]:
        b["p_first"] = p[(b["first"], b["second"])]
    cfg = dict(DEFAULTS, battle_rule="order_averaged")
    pairs, stats = build_pairs(generated, judged, metajudged, **cfg)
    judge = [(q["chosen"], q["rejected"]) for q in pairs if q["kind"] == "judge"]
    assert judge == [("long judgment d", "e")]
    assert stats["battle_rule"] == "order_averaged"
    assert stats["first_position_prob"] == pytest.approx(sum(p.values()) / 6)
    assert stats["first_position_win_rate"] == pytest.approx(4 / 6)  # from the verdicts, either rule


def test_random_tiebreak_depends_on_seed_and_prompt_only():
    """p1's best mean (4.0) is shared by responses 0 and 2: the random tie-break takes either,
    the same one for the same seed whatever else is in the batch, and both over seeds."""
    generated, judged, _ = _records()
    picks = {}
    for seed in range(40):
        pairs, _ = build_pairs(generated, judged, None, **DEFAULTS, tiebreak="random", seed=seed)
        assert len(pairs) == 1 and pairs[0]["rejected"] == "Blue is a colour of the sky."
        picks[seed] = pairs[0]["chosen"]
        alone, _ = build_pairs(generated[:1], judged[:3], None, **DEFAULTS, tiebreak="random", seed=seed)
        assert alone[0]["chosen"] == picks[seed]
    assert set(picks.values()) == {"Red.", "Green, the colour of grass and leaves."}
