"""Temporal Self-Rewarding and Meta-Rewarding + temporal end to end on the `tiny` preset,
including a kill inside the future-model stage."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.experiments.test_meta_reward import ENV, NO_EVAL, _kill_when, _pairs

TEMPORAL = [sys.executable, "-m", "experiments.temporal_self_reward", "--preset", "tiny", *NO_EVAL]
COMBINED = [sys.executable, "-m", "experiments.meta_reward", "--preset", "tiny", "--set", "temporal=true", *NO_EVAL]


def _run(cmd, out, *extra):
    res = subprocess.run([*cmd, "--out", str(out), *extra], env=ENV, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def temporal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("temporal")
    _run(TEMPORAL, out, "--set", "iterations=2")
    return out


def _records(path):
    rows = []
    for name in sorted(os.listdir(path)):
        if name.startswith("shard_"):
            with open(os.path.join(path, name)) as f:
                rows += [json.loads(line) for line in f]
    return rows


def test_temporal_self_reward_runs_the_initial_and_future_stages(temporal_run):
    out = temporal_run
    config = json.loads((out / "config.json").read_text())
    assert config["temporal"] is True and config["method"] == "self_reward"
    # Iteration 1: M_0 is the current model, so there is no initial stage; iteration 2 samples M_0.
    assert not (out / "iter_1" / "initial").exists()
    for stage in ("initial/generate", "initial/judge", "future/anchored", "future/generate", "future/judge", "pairs", "dpo"):
        assert (out / "iter_2" / stage / "manifest.json").exists(), stage
    # The future model only samples: its weights are deleted and never become an iteration.
    for t in (1, 2):
        assert not (out / f"iter_{t}" / "future" / "dpo" / "checkpoints").exists()
        assert not (out / f"iter_{t}" / "future" / "dpo" / "model").exists()
    assert not (out / "iter_1" / "meta_judge").exists()

    # D2 follows the rules from the stage records: every chosen response comes from M_t or M_f and
    # every rejected one from M_t or M_0, with the scores M_t gave them.
    it = out / "iter_2"
    responses = {name: {g["id"]: g["responses"] for g in _records(it / name)} for name in ("generate", "initial/generate", "future/generate")}
    scores = {}
    for name in ("judge", "initial/judge", "future/judge"):
        for r in _records(it / name):
            scores.setdefault(name, {}).setdefault(r["id"], {})[r["response_index"]] = r["mean"]
    pairs = [json.loads(line) for line in (it / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["kind"] == "actor" for p in pairs)
    for p in pairs:
        src_c = {"current": ("generate", "judge"), "future": ("future/generate", "future/judge")}[p["chosen_source"]]
        src_r = {"current": ("generate", "judge"), "initial": ("initial/generate", "initial/judge")}[p["rejected_source"]]
        k_c = responses[src_c[0]][p["id"]].index(p["chosen"])
        k_r = responses[src_r[0]][p["id"]].index(p["rejected"])
        assert math.isclose(scores[src_c[1]][p["id"]][k_c], p["chosen_score"])
        assert math.isclose(scores[src_r[1]][p["id"]][k_r], p["rejected_score"])
        assert p["chosen_score"] > p["rejected_score"]
        # the rejected is the lowest-scored response among M_t's and M_0's
        lowest = min(min(scores["judge"][p["id"]].values()), min(scores["initial/judge"][p["id"]].values()))
        assert math.isclose(p["rejected_score"], lowest)

    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["iteration"] for m in metrics] == [1, 2]
    for m in metrics:  # the collapse diagnostics are there for every iteration
        assert -1.0 <= m["hidden_cosine"] <= 1.0
        assert m["initial_grad_norm"] > 0
        assert m["score_gap"] > 0
        assert 0 <= m["future_chosen"] <= m["actor_pairs"] and 0 <= m["initial_rejected"] <= m["actor_pairs"]
    assert "chosen/rejected cos" in (out / "report.md").read_text()


def test_combined_mode_killed_inside_the_future_stage_resumes_to_the_same_actor_pairs(temporal_run, tmp_path):
    out = tmp_path / "combined"
    # Killed after the future model has trained and sampled its first shard: the restart restores
    # M_f from its checkpoint and samples the rest.
    _kill_when(out, "iter_1/future/generate/shard_00000.jsonl", cmd=COMBINED)
    assert not (out / "iter_1" / "future" / "generate" / "manifest.json").exists()
    _run(COMBINED, out)
    assert (out / "iter_1" / "meta_judge" / "manifest.json").exists()
    pairs = _pairs(out)
    # Actor pairs do not depend on the meta-judge: they equal Temporal Self-Rewarding's iteration 1.
    actor = [p for p in pairs if p["kind"] == "actor"]
    assert actor == [p for p in _pairs(temporal_run) if p["kind"] == "actor"]
    assert {p["kind"] for p in pairs} <= {"actor", "judge"}
    metrics = json.loads((out / "metrics.json").read_text())[0]
    assert "first_position_win_rate" in metrics and "future_chosen" in metrics
