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


def _judged(pid, means):
    return [{"id": pid, "response_index": k, "mean": m} for k, m in enumerate(means)]


def test_anchored_then_future_guided_pairs_on_hand_worked_records():
    from experiments.loop import anchored_pairs, future_guided_pairs

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
    pairs, stats = build_pairs(LoopConfig(), 1, generated, judged, metajudged, actor=actor)
    assert pairs[0] == actor[0] and {p["kind"] for p in pairs[1:]} == {"judge"}
    assert stats["actor_pairs"] == 1 and stats["score_gap"] == 3.5
    assert stats["future_chosen"] == 1 and stats["initial_rejected"] == 1


def test_hidden_cosine_equals_numpy_cosine_of_plain_forward_hidden_means():
    import jax.numpy as jnp
    import numpy as np

    import models
    from experiments.loop import hidden_cosine
    from experiments.sft import tiny_config

    tok = models.load_tokenizer(models.EMBEDDED_NAME)
    model = models.create_model(tiny_config(tok, "float32"), seed=3)
    pairs = [{"kind": "actor", "prompt": "Name a colour.", "chosen": "Red, like a rose.", "rejected": "Blue"},
             {"kind": "judge", "prompt": "ignored", "chosen": "x", "rejected": "y"},
             {"kind": "actor", "prompt": "Say hi.", "chosen": "Hello there, friend!", "rejected": "Hi."}]
    cos = []
    for p in (pairs[0], pairs[2]):
        prompt = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}])
        means = []
        for side in ("chosen", "rejected"):
            resp = tok.encode(p[side])
            h, _ = model.hidden_states(jnp.asarray([prompt + resp], jnp.int32))
            means.append(np.asarray(h[0, len(prompt):], np.float64).mean(0))
        cos.append(means[0] @ means[1] / np.linalg.norm(means[0]) / np.linalg.norm(means[1]))
    assert abs(hidden_cosine(model, tok, pairs) - np.mean(cos)) < 1e-5
    assert np.isnan(hidden_cosine(model, tok, pairs[1:2]))


def test_future_model_settings_start_from_the_dpo_settings():
    from experiments.cli import apply_overrides
    from experiments.presets import get_preset

    cfg = get_preset("tiny", "self_reward")
    assert cfg.future_dpo is None and cfg.group_default("future_dpo") == cfg.dpo
    fut = apply_overrides(cfg, ["future_dpo.train.learning_rate=2e-5"]).future_dpo
    assert fut.train.learning_rate == 2e-5
    assert dataclasses.replace(fut, train=cfg.dpo.train) == cfg.dpo


def test_fit_batch_shrinks_to_what_the_pairs_fill_on_the_mesh():
    from experiments.dpo import DPORunConfig
    from experiments.loop import fit_batch
    from metajudge.train import TrainConfig

    class Mesh:
        shape = {"data": 2, "fsdp": 2, "tensor": 2}

    run = DPORunConfig(batch_size=16, train=TrainConfig(grad_accum_steps=2))
    assert fit_batch(run, 40, Mesh, "x") is run
    assert fit_batch(run, 13, Mesh, "x").batch_size == 8  # multiples of data*fsdp*grad_accum = 4*2
    assert fit_batch(run, 7, Mesh, "x") is None


def test_order_averaged_battle_rule_ranks_judgments_from_first_position_probabilities():
    generated, judged, metajudged = _records()
    # p(first wins) per battle; averaged over both orders: P(0 beats 1) = (0.9 + 1 - 0.6) / 2 = 0.65,
    # P(0 beats 2) = (0.9 + 1 - 0.7) / 2 = 0.6, P(1 beats 2) = (0.8 + 1 - 0.9) / 2 = 0.45:
    # 0 is best, 1 is worst (it loses to both).
    p = {(0, 1): 0.9, (1, 0): 0.6, (0, 2): 0.9, (2, 0): 0.7, (1, 2): 0.8, (2, 1): 0.9}
    for b in metajudged[0]["battles"]:
        b["p_first"] = p[(b["first"], b["second"])]
    cfg = dataclasses.replace(LoopConfig(), battle_rule="order_averaged")
    pairs, stats = build_pairs(cfg, 1, generated, judged, metajudged)
    judge = [(q["chosen"], q["rejected"]) for q in pairs if q["kind"] == "judge"]
    assert judge == [("long judgment d", "e")]
    assert stats["battle_rule"] == "order_averaged"
    assert stats["first_position_prob"] == pytest.approx(sum(p.values()) / 6)
    assert stats["first_position_win_rate"] == pytest.approx(4 / 6)  # from the verdicts, either rule
