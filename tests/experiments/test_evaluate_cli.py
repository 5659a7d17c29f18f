"""`python -m experiments.evaluate` on a hand-built run of random tiny models (CPU, seconds).

The run has two finished iterations: iteration 1's model is an exact copy of the seed model
(which is also the default baseline and judge), iteration 2's is another random model.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.cli import config_dict, run_main
from experiments.configs import EvalConfig, RunInfo
from experiments.eval_inputs import ModelPool
from experiments.evaluate import Evaluator, evaluate_iteration, main
from metajudge.prompt_sources import load_seed_prompts, normalise_prompt, split_prompts
from metajudge.prompts import pairwise_prompt
from metajudge.report import iteration_metrics
from metajudge.roles import Sampling
from metajudge.stages import Stage, read_jsonl, write_json_atomic, write_jsonl_atomic

SMALL = EvalConfig(max_prompts=4, answer=Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=6),
                   prompts_per_shard=2, batch_size=8, n_boot=200)
RUN = {"method": "meta_reward", "model": "tiny", "seed": 0, "dtype": "float32", "heldout_fraction": 0.1,
       "evaluate": config_dict(SMALL)}
THIS = "tests.experiments.test_evaluate_cli"


# ------------------------------------------------------------------ external judges used below


def longer_answer_wins(batch):
    """P(A better) = 1 if A is longer, 0 if shorter, 0.5 for equal lengths."""
    return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for _, a, b in batch]


def always_a(batch):
    return ["A"] * len(batch)


def wrong_count(batch):
    return []


# ------------------------------------------------------------------------------------ fixtures


def _seed_model():
    from metajudge.trainer import resolve_mesh

    pool = ModelPool(resolve_mesh(None))
    return pool.get(RunInfo.of(RUN), "tiny", policy=True)


def _make_run(out, *, iterations=(1, 2)):
    import models
    from models.sources import tiny_config

    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "config.json"), RUN)
    train, heldout = split_prompts(load_seed_prompts(), heldout_fraction=0.1, seed=0)
    write_jsonl_atomic(os.path.join(out, "heldout_prompts.jsonl"), heldout)
    config, seed_model, tok = _seed_model()
    metrics = []
    for t in iterations:
        model = seed_model if t == 1 else models.create_model(tiny_config(tok, "float32"), seed=100 + t)
        dpo = os.path.join(out, f"iter_{t}", "dpo")
        models.save_hf(config, model, os.path.join(dpo, "model"))
        Stage(dpo, "dpo", fingerprint_of={"iteration": t}).finish({})
        metrics.append(iteration_metrics(t, [], [], None, {}, dpo))
        write_json_atomic(os.path.join(out, f"iter_{t}", "metrics.json"), metrics[-1])
    write_json_atomic(os.path.join(out, "metrics.json"), metrics)
    return train, heldout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "meta")
    train, heldout = _make_run(out)
    assert main(["--run", out, "--quiet"]) == 0
    rows = json.load(open(os.path.join(out, "evaluation.json")))["meta"]
    return out, rows, train, heldout


def _records(out, t, stage, tag=""):
    return Stage(os.path.join(out, f"iter_{t}", "evaluate" + tag, stage), stage).records()


# ---------------------------------------------------------------------------------------- tests


def test_every_finished_iteration_is_evaluated_and_reported(run):
    out, rows, _, heldout = run
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert r["n"] == 4 and r["judge"] == "tiny" and r["baseline"] == "tiny" and r["readout"] == "prob"
        assert 0.0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1.0 and 0.0 <= r["lc_win_rate"] <= 1.0
    for path in ("evaluate_baseline/manifest.json", "evaluate_baseline/config.json", "iter_2/evaluate/manifest.json",
                 "iter_2/evaluate/config.json", "iter_2/evaluate/answers/config.json", "iter_2/evaluate/judge/manifest.json"):
        assert os.path.isfile(os.path.join(out, path)), path
    table = open(os.path.join(out, "evaluation.md")).read()
    assert "| iter | length-only LC win rate (%) | win rate (%) | CI (%) | length (chars) |" in table
    assert os.path.getsize(os.path.join(out, "evaluation.png")) > 0
    # the run's own settings: the rows join the run's metrics and report
    report = open(os.path.join(out, "report.md")).read()
    assert "## Held-out evaluation" in report and os.path.getsize(os.path.join(out, "evaluation.png")) > 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert [m["evaluation"]["win_rate"] for m in metrics] == [r["win_rate"] for r in rows]
    assert json.load(open(os.path.join(out, "iter_2", "metrics.json")))["evaluation"] == rows[1]
    # average lengths are the mean characters of the stored answers
    answers = _records(out, 2, "answers")
    baseline = Stage(os.path.join(out, "evaluate_baseline"), "evaluate_baseline").records()
    assert rows[1]["avg_length"] == pytest.approx(np.mean([len(a["answer"]) for a in answers]))
    assert rows[1]["baseline_avg_length"] == pytest.approx(np.mean([len(b["answer"]) for b in baseline]))


def test_evaluation_prompts_are_held_out_and_recorded(run):
    out, _, train, heldout = run
    chosen = read_jsonl(os.path.join(out, "evaluate_baseline", "prompts.jsonl"))
    texts = {normalise_prompt(p["prompt"]) for p in chosen}
    assert len(chosen) == 4
    assert texts <= {normalise_prompt(p["prompt"]) for p in heldout}
    assert not texts & {normalise_prompt(p["prompt"]) for p in train}
    assert [a["id"] for a in _records(out, 1, "answers")] == [p["id"] for p in chosen]


def test_a_prompt_the_run_generated_on_is_never_an_evaluation_prompt(run, tmp_path):
    out, _, _, _ = run
    copy = str(shutil.copytree(out, tmp_path / "meta"))
    chosen = read_jsonl(os.path.join(copy, "evaluate_baseline", "prompts.jsonl"))
    # as if an iteration had trained on the first chosen prompt (its text, under another id)
    write_jsonl_atomic(os.path.join(copy, "iter_1", "generate", "shard_00000.jsonl"),
                       [{"id": "train-x", "prompt": chosen[0]["prompt"].lower(), "responses": ["..."]}])
    prompts = Evaluator(copy, SMALL, RunInfo.of(RUN)).prompts()
    assert len(prompts) == 4 and normalise_prompt(chosen[0]["prompt"]) not in {normalise_prompt(p["prompt"]) for p in prompts}


def test_a_copy_of_the_seed_wins_exactly_half_whatever_the_judge_position_bias(run):
    out, rows, _, _ = run
    # same weights, same random streams: the copy's answers are the baseline's, so the two orders
    # show the judge the same text and only its position preference could tell them apart
    baseline = Stage(os.path.join(out, "evaluate_baseline"), "evaluate_baseline").records()
    assert [a["answer"] for a in _records(out, 1, "answers")] == [b["answer"] for b in baseline]
    judged = _records(out, 1, "judge")
    assert all(j["p_a_model_first"] == j["p_a_baseline_first"] for j in judged)
    assert [j["preference"] for j in judged] == [0.5] * 4
    assert (rows[0]["win_rate"], rows[0]["ci_low"], rows[0]["ci_high"]) == (0.5, 0.5, 0.5)
    assert abs(rows[0]["first_position_rate"] - 0.5) > 0.05  # the random judge does favour one position


def test_judge_probability_matches_a_plain_forward_pass(run):
    out, _, _, _ = run
    _, judge, tok = _seed_model()
    prefix = tok.encode("Winner:")
    ids_ab = []
    for label in ("A", "B"):
        full = tok.encode("Winner: " + label)
        assert full[: len(prefix)] == prefix and len(full) == len(prefix) + 1
        ids_ab.append(full[-1])
    answers = {a["id"]: a for a in _records(out, 2, "answers")}
    baseline = {b["id"]: b for b in Stage(os.path.join(out, "evaluate_baseline"), "evaluate_baseline").records()}
    for j in _records(out, 2, "judge")[:1]:
        a = answers[j["id"]]
        for key, first, second in (("p_a_model_first", a["answer"], baseline[j["id"]]["answer"]),
                                   ("p_a_baseline_first", baseline[j["id"]]["answer"], a["answer"])):
            ids = tok.apply_chat_template([{"role": "user", "content": pairwise_prompt(a["prompt"], first, second)}]) + prefix
            logits = np.asarray(judge(jnp.asarray([ids]))[0, -1], np.float64)[ids_ab]
            p = np.exp(logits - logits.max())
            assert j[key] == pytest.approx(p[0] / p.sum(), abs=1e-4)
        assert j["preference"] == pytest.approx((j["p_a_model_first"] + 1 - j["p_a_baseline_first"]) / 2)


def test_a_second_call_reads_the_results_back(run, capsys):
    out, rows, _, _ = run
    shards = sorted(glob.glob(os.path.join(out, "**", "shard_*.jsonl"), recursive=True))
    before = {p: os.stat(p).st_mtime_ns for p in shards}
    assert main(["--run", out, "--quiet"]) == 0
    assert {p: os.stat(p).st_mtime_ns for p in shards} == before
    assert "iteration 2 already evaluated" in capsys.readouterr().err
    assert json.load(open(os.path.join(out, "evaluation.json")))["meta"] == rows


def test_an_interrupted_evaluation_resumes_to_the_same_records(run, tmp_path):
    out, rows, _, _ = run
    copy = str(tmp_path / "meta")
    shutil.copytree(out, copy)
    it = os.path.join(copy, "iter_2", "evaluate")
    for path in ("manifest.json", "judge/manifest.json", "judge/shard_00001.jsonl", "answers/manifest.json",
                 "answers/shard_00001.jsonl"):
        os.remove(os.path.join(it, path))
    assert main(["--run", copy, "--quiet"]) == 0
    assert _records(copy, 2, "answers") == _records(out, 2, "answers")
    assert _records(copy, 2, "judge") == _records(out, 2, "judge")
    assert json.load(open(os.path.join(copy, "evaluation.json")))["meta"] == rows


def test_external_judge_probabilities_and_verdicts(run, tmp_path):
    out, rows, _, _ = run
    out = str(shutil.copytree(out, tmp_path / "meta"))
    assert main(["--run", out, "--quiet", "--external-judge", f"{THIS}:longer_answer_wins", "--tag", "longer"]) == 0
    baseline = {b["id"]: len(b["answer"]) for b in Stage(os.path.join(out, "evaluate_baseline"), "evaluate_baseline").records()}
    for t in (1, 2):
        lengths = {a["id"]: len(a["answer"]) for a in _records(out, t, "answers")}
        for j in _records(out, t, "judge", "-longer"):
            m, b = lengths[j["id"]], baseline[j["id"]]
            assert j["preference"] == (1.0 if m > b else 0.0 if m < b else 0.5)
            assert j["kinds"] == ["prob", "prob"]
    tagged = json.load(open(os.path.join(out, "evaluation-longer.json")))["meta"]
    assert tagged[0]["judge"] == f"external:{THIS}:longer_answer_wins"
    # the answers were reused, and the run's own results were left alone
    assert glob.glob(os.path.join(out, "evaluate_baseline*")) == [os.path.join(out, "evaluate_baseline")]
    assert glob.glob(os.path.join(out, "iter_2", "evaluate", "answers*")) == [os.path.join(out, "iter_2", "evaluate", "answers")]
    assert [m["evaluation"] for m in json.load(open(os.path.join(out, "metrics.json")))] == rows

    assert main(["--run", out, "--quiet", "--external-judge", f"{THIS}:always_a"]) == 0
    derived = [p for p in glob.glob(os.path.join(out, "evaluation-*.json")) if not p.endswith("-longer.json")]
    assert len(derived) == 1  # a tag derived from the settings
    for r in json.load(open(derived[0]))["meta"]:
        assert (r["win_rate"], r["readout"], r["first_position_rate"]) == (0.5, "verdict", 1.0)


def test_prompt_file_entries_that_are_training_prompts_are_dropped(run, tmp_path):
    out, _, train, heldout = run
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"x{i}", "prompt": p["prompt"].upper()}) + "\n" for i, p in enumerate(train[:3]))
                    + "".join(json.dumps({"id": f"h{i}", "prompt": p["prompt"]}) + "\n" for i, p in enumerate(heldout[:2])))
    assert main(["--run", out, "--quiet", "--prompts", str(path), "--external-judge", f"{THIS}:longer_answer_wins"]) == 0
    (chosen,) = glob.glob(os.path.join(out, "evaluate_baseline-*", "prompts.jsonl"))
    assert sorted(p["id"] for p in read_jsonl(chosen)) == ["h0", "h1"]


def test_compare_puts_runs_side_by_side(run, tmp_path):
    out, rows, _, _ = run
    a, b = str(tmp_path / "self_reward"), str(tmp_path / "meta_reward")
    shutil.copytree(out, a)
    shutil.copytree(out, b)
    dest = str(tmp_path / "cmp")
    assert main(["--compare", a, b, "--out", dest, "--quiet"]) == 0
    data = json.load(open(os.path.join(dest, "comparison.json")))
    assert list(data) == ["self_reward", "meta_reward"] and data["self_reward"] == rows == data["meta_reward"]
    table = open(os.path.join(dest, "comparison.md")).read()
    assert "| run | iter | length-only LC win rate (%)" in table
    assert table.count("| self_reward | ") == 2 and table.count("| meta_reward | ") == 2
    assert os.path.getsize(os.path.join(dest, "comparison.png")) > 0


def test_the_loop_can_pass_the_model_it_holds(tmp_path):
    out = str(tmp_path / "fresh")  # no saved model and no held-out file: neither is needed
    _, model, tok = _seed_model()
    row = evaluate_iteration(out, 1, SMALL, run=RUN, model=model, tokenizer=tok, progress=False)
    assert (row["iteration"], row["win_rate"], row["n"]) == (1, 0.5, 4)
    assert os.path.isfile(os.path.join(out, "heldout_prompts.jsonl"))  # the split, recorded once
    assert evaluate_iteration(out, 1, SMALL, run=RUN, progress=False) == row  # read back, no model needed


@pytest.mark.parametrize("argv, message", [
    (["--run", "{tmp}/missing"], "no such run directory"),
    (["--run", "{tmp}"], "is not a run directory (no config.json)"),
    (["--run", "{run}", "--external-judge", "no_colon"], "expected MODULE:FUNCTION"),
    (["--run", "{run}", "--external-judge", "no_such_module_xyz:judge"], "cannot import 'no_such_module_xyz'"),
    (["--run", "{run}", "--external-judge", f"{THIS}:nothing_here"], "has no attribute 'nothing_here'"),
    (["--run", "{run}", "--external-judge", f"{THIS}:wrong_count"], "returned 0 outputs for 4 triples"),
    (["--run", "{run}", "--set", "max_prompts=-1"], "max_prompts must be >= 0"),
    (["--run", "{run}", "--prompts", "{tmp}/none.jsonl"], "no such file"),
    (["--run", "{run}", "--prompts", "{tmp}/train.jsonl"], "no held-out prompt left"),
    (["--run", "{tmp}/empty_run"], "no finished iteration"),
])
def test_user_errors_are_one_readable_line(run, tmp_path, capsys, argv, message):
    out, _, train, _ = run
    write_jsonl_atomic(str(tmp_path / "train.jsonl"), train[:3])
    os.makedirs(tmp_path / "empty_run")
    write_json_atomic(str(tmp_path / "empty_run" / "config.json"), RUN)
    argv = [a.format(tmp=tmp_path, run=out) for a in argv]
    with pytest.raises(SystemExit) as e:
        run_main(main, [*argv, "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and message in err


def test_eval_config_round_trips_through_the_run_config():
    cfg = dataclasses.replace(SMALL, judge="other", readout="verdict")
    assert RunInfo.of({**RUN, "evaluate": config_dict(cfg)}).evaluate == cfg
    assert RunInfo.of({"model": "tiny"}).evaluate == EvalConfig()


# --------------------------------------------------------------------------- AlpacaEval's files


def test_export_is_read_back_by_alpaca_eval_with_the_reports_numbers(run, tmp_path, capsys):
    out, rows, _, _ = run
    export, board = str(tmp_path / "alpaca"), str(tmp_path / "board")
    assert main(["--run", out, "--quiet", "--export", export]) == 0
    outputs = json.load(open(os.path.join(export, "meta_iter2", "model_outputs.json")))
    answers = {a["id"]: a["answer"] for a in _records(out, 2, "answers")}
    assert [o["output"] for o in outputs] == list(answers.values())
    assert {tuple(sorted(o)) for o in outputs} == {("dataset", "generator", "instruction", "output")}
    assert os.path.isfile(os.path.join(export, "meta_seed", "model_outputs.json"))  # the baseline's answers
    capsys.readouterr()
    assert main(["--alpaca-eval", export, "--out", board]) == 0
    printed = capsys.readouterr().out
    assert "| model | length-only LC (%) | win rate (%)" in printed
    import csv

    with open(os.path.join(board, "leaderboard.csv"), newline="") as f:
        got = {r["model"]: r for r in csv.DictReader(f)}
    assert list(next(iter(got.values())))[:5] == ["model", "win_rate", "standard_error", "length_only_lc_winrate", "avg_length"]
    for r in rows:  # the same numbers as the run's own report, from AlpacaEval's files
        g = got[f"meta_iter{r['iteration']}"]
        assert float(g["win_rate"]) == pytest.approx(100 * r["win_rate"], abs=1e-9)
        assert float(g["length_only_lc_winrate"]) == pytest.approx(100 * r["lc_win_rate"], abs=1e-6)
        assert int(g["avg_length"]) == int(r["avg_length"]) and int(g["n_total"]) == r["n"]


def test_prompts_take_alpaca_evals_json_list_and_max_prompts_0_uses_all(run, tmp_path):
    out, _, _, heldout = run
    out = str(shutil.copytree(out, tmp_path / "meta"))
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps([{"instruction": p["prompt"], "output": "-", "generator": "gpt4_1106_preview",
                                 "dataset": "helpful_base"} for p in heldout[:6]]))
    assert main(["--run", out, "--quiet", "--prompts", str(path), "--set", "max_prompts=0",
                 "--external-judge", f"{THIS}:longer_answer_wins", "--export", str(tmp_path / "x")]) == 0
    chosen = [read_jsonl(f) for f in glob.glob(os.path.join(out, "evaluate_baseline-*", "prompts.jsonl"))]
    assert sorted(p["prompt"] for p in heldout[:6]) in [sorted(p["prompt"] for p in c) for c in chosen]
    outputs = json.load(open(tmp_path / "x" / "meta_iter1" / "model_outputs.json"))
    assert len(outputs) == 6 and {o["dataset"] for o in outputs} == {"helpful_base"}


_FIXTURE = next((d for d in (os.environ.get("ALPACA_EVAL_FIXTURE", ""), "/work/shared/alpaca_eval",
                             os.path.join(os.path.dirname(__file__), "..", "..", "shared", "alpaca_eval"))
                 if d and os.path.isfile(os.path.join(d, "leaderboard.csv"))), None)


@pytest.mark.skipif(_FIXTURE is None, reason="AlpacaEval fixture not found (set ALPACA_EVAL_FIXTURE)")
def test_alpaca_eval_leaderboard_of_the_fixture_matches_the_published_win_rates(tmp_path, capsys):
    import csv

    gamma = str(tmp_path / "difficulty.csv")
    assert main(["--alpaca-eval", os.path.join(_FIXTURE, "annotations"), "--fit-difficulty", gamma,
                 "--out", str(tmp_path / "fit")]) == 0
    assert "| model | AlpacaEval LC (%) | win rate (%)" in capsys.readouterr().out
    with open(os.path.join(_FIXTURE, "leaderboard.csv"), newline="") as f:
        published = {r["model"]: r for r in csv.DictReader(f)}
    with open(tmp_path / "fit" / "leaderboard.csv", newline="") as f:
        ours = list(csv.DictReader(f))
    assert list(ours[0])[:5] == ["model", "win_rate", "standard_error", "length_controlled_winrate", "avg_length"]
    assert {r["model"] for r in ours} == set(published)
    for r in ours:
        assert float(r["win_rate"]) == pytest.approx(float(published[r["model"]]["win_rate"]), abs=0.01)
        assert int(r["avg_length"]) == int(float(published[r["model"]]["avg_length"]))
    with open(gamma) as f:
        assert f.readline().strip() == "index,instruction_difficulty" and len(f.readlines()) == 805
    # the frozen γ read back gives the same LC as the fit that wrote it
    assert main(["--alpaca-eval", os.path.join(_FIXTURE, "annotations"), "--difficulty", gamma,
                 "--out", str(tmp_path / "frozen")]) == 0
    with open(tmp_path / "frozen" / "leaderboard.csv", newline="") as f:
        frozen = {r["model"]: r["length_controlled_winrate"] for r in csv.DictReader(f)}
    assert frozen == {r["model"]: r["length_controlled_winrate"] for r in ours}


@pytest.mark.parametrize("case, message", [
    ("missing_field", "row 1: missing field(s) preference"),
    ("two_baselines", "baseline 'other'"),
    ("wrong_rows", "2 rows, but"),
    ("empty_dir", "no annotations.json"),
    ("both_gammas", "not both"),
])
def test_bad_annotation_files_are_one_readable_line(tmp_path, capsys, case, message):
    def rec(i, **kw):
        return {"instruction": f"q{i}", "output_1": "b" * (i + 1), "generator_1": "base", "output_2": "m" * (i + 2),
                "generator_2": "m1", "preference": 1.5, **kw}

    d = tmp_path / "ann"
    d.mkdir()
    good = [rec(i) for i in range(3)]
    other = [rec(i, generator_2="m2") for i in range(3)]
    if case == "missing_field":
        del other[1]["preference"]
    elif case == "two_baselines":
        other = [rec(i, generator_2="m2", generator_1="other") for i in range(3)]
    elif case == "wrong_rows":
        other = other[:2]
    if case != "empty_dir":
        (d / "m1.json").write_text(json.dumps(good))
        (d / "m2.json").write_text(json.dumps(other))
    extra = ["--difficulty", "x.csv", "--fit-difficulty", "y.csv"] if case == "both_gammas" else []
    with pytest.raises(SystemExit) as e:
        run_main(main, ["--alpaca-eval", str(d), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and err.startswith("error: ") and message in err
    assert not os.path.exists(tmp_path / "o" / "leaderboard.csv")
