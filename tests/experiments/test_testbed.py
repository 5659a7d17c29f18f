"""The verifiable testbed: gold grader, generators, tokenizer, metrics, and a one-iteration run."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import pytest

from metajudge import testbed as tb
from metajudge import testbed_metrics as tbm
from metajudge import testbed_tokenizer as tbt
from metajudge.prompts import judge_prompt, meta_judge_prompt, parse_score, parse_winner

SORT = "Sort the list: 3 8 1 4 4"


# ------------------------------------------------------------------------------------ grading


def test_problems_state_and_solve_every_op():
    cases = {
        "sort": ("Sort the list: 3 8 1 4 4", (1, 3, 4, 4, 8)),
        "reverse": ("Reverse the list: 3 8 1 4 4", (4, 4, 1, 8, 3)),
        "increment": ("Add one to each digit: 3 8 1 4 9", (4, 9, 2, 5, 0)),
        "rotate": ("Move the first digit to the end: 3 8 1 4 4", (8, 1, 4, 4, 3)),
    }
    for op, (text, answer) in cases.items():
        p = tb.parse_instruction(text)
        assert p is not None and p.op == op and p.instruction == text and p.answer == answer
    assert tb.parse_instruction("Sort the list: 3 8 1") is None
    assert tb.parse_instruction("Write a poem: 1 2 3 4 5") is None
    with pytest.raises(ValueError, match="not a testbed instruction"):
        tb.grade("Tell me a joke", "1 2 3 4 5")


@pytest.mark.parametrize("response, quality, marks, exact, filler", [
    ("1 3 4 4 8", 5, "+++++", True, False),
    ("Sure. 1 3 4 4 8 I hope this helps.", 5, "+++++", True, True),  # filler changes nothing
    ("1 3 4 8 4", 3, "+++--", False, False),
    ("1 3 4 4 8 9", 4, "+++++x", False, False),  # an extra digit costs a point
    ("1 3", 2, "++---", False, False),  # missing digits are wrong
    ("3 8 1 4 4", 1, "---+-", False, False),  # the unsorted list is right by chance at one place
    ("", 0, "-----", False, False),
    ("Done.", 0, "-----", False, True),
    ("9 9 9 9 9 9 9", 0, "-----xx", False, False),  # floored at 0
])
def test_grade_on_hand_worked_cases(response, quality, marks, exact, filler):
    g = tb.grade(SORT, response)
    assert (g.quality, "".join(g.marks), g.exact, g.filler) == (quality, marks, exact, filler)


def test_gold_judgment_is_parseable_and_matches_the_grade():
    p = tb.parse_instruction(SORT)
    j = tb.gold_judgment(p, "Sure. 1 3 4 8 4")
    assert j.text == "Got: 1 3 4 8 4\nExpected: 1 3 4 4 8\nCheck: 1 1 + 3 3 + 4 4 + 8 4 - 4 8 -\nScore: 3"
    assert parse_score(j.text) == 3.0 and tb.judgment_summary(j.text) == (3, 3)
    assert tb.gold_judgment(p, "no digits").text.startswith("Got: none\n")
    short_long = tb.gold_judgment(p, "1 3 5 6 7 8 9")  # two digits too many
    assert "Check: 1 1 + 3 3 + 5 4 - 6 4 - 7 8 - 8 _ x 9 _ x\nScore: 0" in short_long.text
    assert "Check: 1 1 + _ 3 - _ 4 - _ 4 - _ 8 -\nScore: 1" in tb.gold_judgment(p, "1").text


def test_noisy_judgments_follow_their_noise_settings():
    p = tb.parse_instruction(SORT)
    rng = random.Random(0)
    clean = tb.JudgeNoise(expected_error=0, score_error=0, length_bias=0)
    for resp in ("1 3 4 4 8", "Sure. 1 3 8 4 4 Done.", "5 5"):
        assert tb.noisy_judgment(p, resp, clean, rng) == tb.gold_judgment(p, resp)
    biased = tb.JudgeNoise(expected_error=0, score_error=0, length_bias=1)
    assert tb.noisy_judgment(p, "Sure. 1 3 4 8 4", biased, rng).score == 4  # one point for the filler
    assert tb.noisy_judgment(p, "1 3 4 8 4", biased, rng).score == 3
    inconsistent = tb.JudgeNoise(expected_error=0, score_error=1, length_bias=0)
    for _ in range(20):
        j = tb.noisy_judgment(p, "1 3 4 8 4", inconsistent, rng)
        checked, given = tb.judgment_summary(j.text)
        assert checked == 3 and given != 3 and 0 <= given <= 5
    with pytest.raises(ValueError, match="length_bias"):
        tb.JudgeNoise(length_bias=1.5)


def test_meta_judgment_names_the_judgment_closer_to_gold():
    assert tb.gold_winner(3, 3, 4) == "A" and tb.gold_winner(3, 1, 4) == "B" and tb.gold_winner(3, 2, 4) is None
    p = tb.parse_instruction(SORT)
    own = tb.gold_judgment(p, "1 3 4 8 4")
    a, b = own, dataclasses.replace(own, score=4)
    text = tb.render_meta_judgment(own, a, b, "A")
    assert text == own.text + "\nDistance: A 3 3 0, B 4 3 1. So 0 < 1.\nWinner: Judgment A"
    assert text.startswith("Got: 1 3 4 8 4\nExpected: 1 3 4 4 8\n")
    assert parse_winner(text) == "A"


# ---------------------------------------------------------------------------------- generators


def _small() -> tb.DataConfig:
    return dataclasses.replace(tb.DataConfig(), n_train_problems=60, n_loop_problems=20, n_eval_problems=8,
                               n_ift=40, n_eft=40, n_meta=10, eval_judge_problems=4, eval_meta_pairs=6)


def test_generators_are_deterministic_and_splits_disjoint():
    cfg = _small()
    sft, loop, ev = cfg.problems(0)
    assert (len(sft), len(loop), len(ev)) == (60, 20, 8)
    assert not ({*sft} & {*loop} or {*sft} & {*ev} or {*loop} & {*ev})
    assert cfg.problems(0) == (sft, loop, ev) and cfg.problems(1) != (sft, loop, ev)
    recs = tb.sft_records(cfg, 0, sft)
    assert recs == tb.sft_records(cfg, 0, sft) and recs != tb.sft_records(cfg, 1, sft)
    assert sorted({r["kind"] for r in recs}) == ["eft", "ift", "meta"] and len(recs) == 90
    assert tb.eval_sets(cfg, 0, ev) == tb.eval_sets(cfg, 0, ev)
    for r in recs:  # the judge-side records use the project's own templates
        user = r["messages"][0]["content"]
        if r["kind"] == "eft":
            assert user.startswith(judge_prompt("", "")[:40]) and parse_score(r["messages"][1]["content"]) is not None
        if r["kind"] == "meta":
            assert user.startswith(meta_judge_prompt("", "", "", "")[:40]) and parse_winner(r["messages"][1]["content"])


def test_eval_sets_have_graded_responses_and_known_winners():
    cfg = _small()
    sets = tb.eval_sets(cfg, 0, cfg.problems(0)[2])
    assert len(sets["judge"]) == 4 * cfg.eval_responses_per_problem and len(sets["meta"]) == 6
    for x in sets["judge"]:
        assert tb.grade(x["instruction"], x["response"]).quality == x["gold"]
    for m in sets["meta"]:
        truth = tbm.battle_truth(m["instruction"], m["response"], m["a"], m["b"])
        assert truth == (1 if m["winner"] == "A" else -1)


# ------------------------------------------------------------------------------------- metrics


def test_pairwise_accuracy_counts_ties_as_half_and_skips_equal_gold():
    groups, gold = [0, 0, 0, 1, 1], [1, 3, 5, 2, 2]
    assert tbm.pairwise_accuracy(groups, gold, [1, 2, 3, 0, 9]) == 1.0
    assert tbm.pairwise_accuracy(groups, gold, [3, 2, 1, 0, 0]) == 0.0
    assert tbm.pairwise_accuracy(groups, gold, [2, 2, None, 0, 0]) == 0.5
    assert tbm.pairwise_accuracy([0], [1], [1]) != tbm.pairwise_accuracy([0], [1], [1])  # NaN: no pair


def test_judge_meta_and_pair_metrics_on_hand_cases():
    # pairs (0,2), (1,2) ordered right; (0,3), (1,3) against an unparsed score count one half
    m = tbm.judge_metrics([0, 0, 0, 0], [5, 5, 2, 2], [5.0, 4.0, 3.0, None], [True, False, True, False])
    assert m["judge_acc"] == 0.75 and m["judge_mae"] == pytest.approx(2 / 3) and m["judge_parsed"] == 0.75
    assert m["judge_length_bonus"] == pytest.approx(0.5 - (-1.0))
    # scored battles: right, wrong, a tie verdict (wrong); decisive verdicts: two of three first
    assert tbm.meta_accuracy([1, -1, None, 1], [1, 1, -1, 0]) == {"meta_acc": 1 / 3, "meta_first": 2 / 3}
    p = tb.parse_instruction(SORT)
    good, bad = tb.gold_judgment(p, "1 3 4 8 4"), dataclasses.replace(tb.gold_judgment(p, "1 3 4 8 4"), score=0)
    bad = tb.render_judgment((1, 3, 4, 8, 4), p.answer, bad.marks, 0)
    pairs = [
        {"kind": "actor", "id": "x", "prompt": SORT, "chosen": "Sure. 1 3 4 4 8", "rejected": "1 3 4 8 4"},
        {"kind": "actor", "id": "y", "prompt": SORT, "chosen": "1 3", "rejected": "1 3 4 4 8"},
        {"kind": "judge", "id": "x", "prompt": "...", "chosen": good.text, "rejected": bad},
    ]
    m = tbm.pair_metrics(pairs, {"x": (SORT, "1 3 4 8 4")})
    assert m["gold_gap"] == pytest.approx(((5 - 3) + (2 - 5)) / 2) and m["pair_precision"] == 0.5
    assert m["chosen_minus_rejected_chars"] == pytest.approx(((15 - 9) + (3 - 9)) / 2)
    assert m["judge_pair_precision"] == 1.0


# ------------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import models

    cfg = _small()
    recs = tb.sft_records(cfg, 0, cfg.problems(0)[0])
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    tbt.build_tokenizer(path, (m["content"] for r in recs for m in r["messages"]))
    return models.load_tokenizer(path), recs


def test_tokenizer_round_trips_and_keeps_templates_whole(tokenizer):
    tok, recs = tokenizer
    assert tok.vocab_size < 1000 and tok.eos_token_ids == (tok.encode("<|end|>")[0],)
    for r in recs[:30]:
        for m in r["messages"]:
            assert tok.decode(tok.encode(m["content"])) == m["content"]
    odd = "Score: 4\n<<<RESPONSE>>> ünïcode ✓ 12"  # text the tiny model never saw still round-trips
    assert tok.decode(tok.encode(odd)) == odd
    for piece in tbt.template_pieces():
        assert len(tok.encode(piece)) == 1
    eft = next(r for r in recs if r["kind"] == "eft")
    assert len(tok.apply_chat_template(eft["messages"][:1])) < 40
    from metajudge.roles import SCORE_LABELS, _forced_readout

    assert len(_forced_readout(tok, "Score:", SCORE_LABELS)[1]) == 6
    assert len(_forced_readout(tok, "Winner: Judgment", ("A", "B"))[1]) == 2


def test_chat_template_is_prefix_stable(tokenizer):
    from metajudge.data import sft_tokens

    tok, recs = tokenizer
    full, mask = sft_tokens(recs[0], tok)
    assert tok.decode(full, skip_special_tokens=False).startswith("<|user|>")
    answer = [t for t, m in zip(full, mask) if m]
    assert tok.decode(answer, skip_special_tokens=False) == recs[0]["messages"][1]["content"] + "<|end|>"


# --------------------------------------------------------------------------------- a real run


def _tiny_testbed(tmp_path, **kw):
    from experiments import testbed as xt

    return dataclasses.replace(
        xt.quick_config(), iterations=1, prompts_per_iteration=4, prompts_per_shard=4,
        cache_dir=str(tmp_path / "cache"), seed_training=dataclasses.replace(xt.SeedTraining(), steps=3),
        data=dataclasses.replace(_small(), eval_meta_pairs=2, eval_judge_problems=2, n_eval_problems=2),
        model=xt.ModelSize(hidden=32, layers=1, heads=2, mlp=64, max_positions=1024),
        dpo=dataclasses.replace(xt.quick_config().dpo, batch_size=8),  # a multiple of the 8 test devices
        **kw,
    )


def test_one_method_one_iteration_end_to_end(tmp_path):
    """Seed SFT (a few steps), one Meta-Rewarding iteration with the project's loop, gold metrics,
    the table; then a second call reuses the cached seed and the finished run."""
    from experiments import testbed as xt

    cfg = _tiny_testbed(tmp_path, methods=("meta_reward",), workers=1)
    out = str(tmp_path / "run")
    res = xt.run_testbed(cfg, out, command="test")
    rows = res["rows"]["meta_reward"][0]
    assert [r["iteration"] for r in rows] == [0, 1]
    for key in ("actor_quality", "actor_chars", "judge_acc", "meta_acc"):
        assert key in rows[0] and key in rows[1]
    assert 0.0 <= rows[1]["actor_quality"] <= 1.0
    table = open(os.path.join(out, "table.md")).read()
    assert "| Meta-Rewarding (LC) | 1 |" in table and "Claims:" in table
    assert os.path.getsize(os.path.join(out, "testbed.png")) > 0
    assert json.load(open(os.path.join(out, "config.json")))["methods"] == ["meta_reward"]
    seed_path = xt.seed_dir(cfg, 0)
    assert os.path.exists(os.path.join(seed_path, "model", "config.json"))
    built = os.path.getmtime(os.path.join(seed_path, "manifest.json"))
    again = xt.run_testbed(cfg, out, command="test")
    assert os.path.getmtime(os.path.join(seed_path, "manifest.json")) == built  # the cached seed, not a new one
    assert json.dumps(again["rows"]["meta_reward"][0]) == json.dumps(rows)  # read back, not recomputed


def test_worker_processes_do_the_work_a_serial_rerun_then_reads_back(tmp_path, capsys):
    """Two seeds in two worker processes (each pinned to its own core): every seed model is built
    once, each worker logs to its own file, and a serial call afterwards finds every seed model,
    run and evaluation finished and returns the same rows."""
    from experiments import testbed as xt

    cfg = _tiny_testbed(tmp_path, seeds=(0, 1), methods=("self_reward",), workers=2)
    out = str(tmp_path / "run")
    res = xt.run_testbed(cfg, out, command="test")
    assert res["workers"] == 2
    cores = len(os.sched_getaffinity(0))
    per_worker = sorted({len(range(i, cores, 2)) for i in (0, 1)})  # round-robin: every core to one of the two
    placed = "not pinned" if cores < 2 else f"pinned to {'-'.join(map(str, per_worker))} core(s) each"
    assert f"2 worker processes, {placed}" in capsys.readouterr().err
    assert list(res["rows"]["self_reward"]) == [0, 1]  # seed order, whichever finished first
    assert [r["iteration"] for r in res["rows"]["self_reward"][1]] == [0, 1]
    logs = sorted(os.listdir(os.path.join(out, "logs")))
    assert logs == ["worker-0.log", "worker-1.log"]
    assert any("seed model ready" in open(os.path.join(out, "logs", f)).read() for f in logs)
    built = {s: os.path.getmtime(os.path.join(xt.seed_dir(cfg, s), "manifest.json")) for s in (0, 1)}
    again = xt.run_testbed(dataclasses.replace(cfg, workers=1), out, command="test")
    assert again["workers"] == 1
    assert {s: os.path.getmtime(os.path.join(xt.seed_dir(cfg, s), "manifest.json")) for s in (0, 1)} == built
    assert json.dumps(again["rows"]) == json.dumps(res["rows"])


def test_worker_count_is_one_per_core_and_seed_and_refuses_a_negative_one():
    from experiments import testbed as xt
    from experiments.cli import UsageError

    cores = len(os.sched_getaffinity(0))
    five = xt.TestbedConfig()  # seeds 0-4; the tests run on the CPU backend
    assert xt.resolve_workers(five, tasks=25) == min(cores, 8, 5)
    assert xt.resolve_workers(dataclasses.replace(five, seeds=(0,)), tasks=5) == 1  # one seed: one process
    assert xt.resolve_workers(dataclasses.replace(five, workers=3), tasks=2) == 2
    assert xt.resolve_workers(dataclasses.replace(five, workers=1), tasks=25) == 1
    with pytest.raises(UsageError, match="workers=-1"):
        xt.resolve_workers(dataclasses.replace(five, workers=-1), tasks=25)


def test_a_repeated_seed_is_refused_before_any_work(tmp_path):
    from experiments import testbed as xt
    from experiments.cli import UsageError

    with pytest.raises(UsageError, match=r"repeats a seed"):
        xt.run_testbed(xt.TestbedConfig(seeds=(0, 1, 0)), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
