"""The loop end to end on the `tiny` preset, and kill-and-resume giving the same pairs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.experiments.crash import crash_command

ENV = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
# The held-out evaluation stage has its own tests (test_evaluate_cli); off here to keep the suite short.
NO_EVAL = ["--set", "evaluate.enabled=false"]
CMD = [sys.executable, "-m", "experiments.meta_reward", "--preset", "tiny", *NO_EVAL]


def _run(out, *extra, timeout=600):
    return subprocess.run([*CMD, "--out", str(out), *extra], env=ENV, capture_output=True, text=True, timeout=timeout)


def _pairs(out):
    with open(os.path.join(out, "iter_1", "pairs", "pairs.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    res = _run(out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_tiny_preset_runs_every_stage_and_writes_the_report(straight_run):
    out, res = straight_run
    for stage in ("generate", "judge", "meta_judge", "pairs", "dpo"):
        assert os.path.exists(os.path.join(out, "iter_1", stage, "manifest.json")), stage
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[0]["responses"] == 4 * 3
    assert metrics[0]["actor_pairs"] > 0
    # A random model's meta-judge is fully position-biased, so its battles may all cancel out
    # (judge pairs from real battles are checked in test_build_pairs); the stage must still run.
    assert 0.0 <= metrics[0]["first_position_win_rate"] <= 1.0
    assert (out / "metrics.png").stat().st_size > 0 and "| iter |" in (out / "report.md").read_text()
    assert os.path.exists(out / "iter_1" / "dpo" / "model" / "config.json")
    assert json.loads((out / "config.json").read_text())["method"] == "meta_reward"
    assert "report:" in res.stdout
    assert {p["kind"] for p in _pairs(out)} <= {"actor", "judge"}


def _kill_when(out, path, timeout=600, cmd=CMD):
    """Runs ``cmd`` until it has written ``out/path`` and SIGKILLs it right there (tests.experiments.crash)."""
    res = subprocess.run(crash_command([*cmd, "--out", str(out)], path), env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, timeout=timeout)
    assert res.returncode == -signal.SIGKILL, f"run ended before {path} appeared: {res.stderr[-2000:]}"
    assert os.path.exists(os.path.join(out, path))


def test_sigkill_inside_and_between_stages_resumes_to_the_same_pairs(straight_run, tmp_path):
    out = tmp_path / "killed"
    _kill_when(out, "iter_1/judge/shard_00000.jsonl")  # inside the judge stage (2 shards)
    assert not os.path.exists(out / "iter_1" / "judge" / "manifest.json")
    _kill_when(out, "iter_1/pairs/manifest.json")  # between stages, before DPO
    res = _run(out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _pairs(out) == _pairs(straight_run[0])
    assert json.loads((out / "metrics.json").read_text())[0]["actor_pairs"] == len(
        [p for p in _pairs(out) if p["kind"] == "actor"])


def test_bad_preset_is_one_line_without_traceback(tmp_path):
    res = _run(tmp_path, "--set", "actor.n=many", timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "actor.n=many: expected an integer" in res.stderr


def test_two_concurrent_runs_on_one_out_the_second_stops_the_first_is_unharmed(straight_run, tmp_path):
    """Two real processes on one --out: the second exits 2 naming the first, which finishes with the
    same pairs and metrics as a run that was alone."""
    out = tmp_path / "shared"
    first = subprocess.Popen([*CMD, "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 300
        while not (out / "iter_1" / "generate").exists():  # the first holds the lock and is working
            assert first.poll() is None and time.time() < deadline, "the first run ended or stalled before generating"
            time.sleep(0.2)
        second = _run(out, timeout=120)
        err = [line for line in second.stderr.strip().splitlines() if line.strip()]
        assert second.returncode == 2 and "Traceback" not in second.stderr and len(err) == 1, second.stderr[-3000:]
        assert err[0].startswith("error: ") and f"is in use by another run (pid {first.pid} on host" in err[0], err
        _, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert _pairs(out) == _pairs(straight_run[0])
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k and not k.endswith("_s")} for r in rows]
    assert strip(json.loads((out / "metrics.json").read_text())) == strip(
        json.loads((straight_run[0] / "metrics.json").read_text()))
    with open(out / "iter_1" / "dpo" / "metrics.jsonl") as a, open(straight_run[0] / "iter_1" / "dpo" / "metrics.jsonl") as b:
        assert [json.loads(x)["step"] for x in a] == [json.loads(x)["step"] for x in b]
