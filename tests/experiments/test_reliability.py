"""Issue 24: settings refused before any work, one locked run per directory, resumes checked
against the stored settings, a moved run directory resuming, file-system errors as one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest

from experiments.configs import tiny
from experiments.loop import fit_context
from models.files import DirLock, DirectoryLocked
from tests.experiments.test_meta_reward import ENV, _kill_when, _run


def _one_error_line(res, *, alone: bool = True) -> str:
    """The run's one ``error:`` line (exit 2, no traceback); ``alone``: nothing else on stderr
    (a resumed run may print notes before it)."""
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert "Traceback" not in res.stderr and len(errors) == 1 and lines[-1] == errors[0], res.stderr[-3000:]
    assert not alone or len(lines) == 1, res.stderr[-3000:]
    return lines[-1]


@pytest.mark.parametrize("setting,message", [
    ("dpo.batch_size=0", "dpo.batch_size=0: must be an integer >= 1"),
    ("rho=0.7", "rho=0.7: every value must lie in [0, 0.5]"),
    ("actor.n=0", "actor.n=0: must be an integer >= 1"),
    ("judge.n=0", "judge.n=0: must be an integer >= 1"),
    ("prompts_per_shard=0", "prompts_per_shard=0: must be an integer >= 1"),
    ("iterations=0", "iterations=0: must be an integer >= 1"),
    ("dpo.train.learning_rate=inf", "dpo.train.learning_rate=inf: must be a finite number > 0"),
    ("dpo.train.grad_accum_steps=3", "dpo.batch_size=4: must be a multiple of data*fsdp=1 times"),
    ("prompts=/no/such/prompts.jsonl", "prompt file not found: /no/such/prompts.jsonl"),
])
def test_a_bad_setting_fails_in_seconds_before_anything_is_written(tmp_path, setting, message):
    out = tmp_path / "run"
    t0 = time.time()
    res = _run(out, "--set", setting, timeout=120)
    line = _one_error_line(res)
    assert message in line, line
    assert time.time() - t0 < 60  # no model was loaded, nothing sampled
    assert not out.exists()  # not even config.json


def test_a_read_only_out_is_one_error_line(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # root ignores the mode bits: use a directory no one may write
            if not os.path.isdir("/sys"):
                pytest.skip("running as root and no read-only directory to try")
            out = "/sys/metajudge-test-run"
        else:
            out = str(parent / "run")
        res = _run(out, timeout=120)
        line = _one_error_line(res)
        assert "metajudge-test-run" in line or str(parent) in line, line
    finally:
        parent.chmod(0o755)


def test_a_second_run_on_a_locked_directory_exits_2_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("state of the first run")
    with DirLock(str(out)):  # this process plays the first run
        res = _run(out, timeout=120)
        line = _one_error_line(res)
        assert f"is in use by another run (pid {os.getpid()} on host" in line and "started" in line, line
        # The refused run touched nothing: no config.json, the first run's files as they were.
        assert sorted(os.listdir(out)) == [".lock", "keep.txt"]
        with pytest.raises(DirectoryLocked):
            DirLock(str(out)).acquire()
    DirLock(str(out)).acquire().release()  # released on exit


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    code = ("import os, signal, sys; from models.files import DirLock; DirLock(sys.argv[1]).acquire(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=ENV, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / ".lock").read_text().strip()  # the dead process's pid, host and start are still there
    lock = DirLock(str(tmp_path)).acquire()  # the dead holder's lock is free
    assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    lock.release()


def test_over_long_prompts_are_skipped_and_named_by_id(capsys):
    tok = types.SimpleNamespace(apply_chat_template=lambda msgs, **kw: list(range(len(msgs[0]["content"]) // 4)))
    config = types.SimpleNamespace(max_position_embeddings=4096)
    prompts = [{"id": "short", "prompt": "hi"}, {"id": "huge-1", "prompt": "x" * 40000}, {"id": "ok", "prompt": "a b"}]
    kept = fit_context(tiny(), prompts, tok, config, t=1)
    assert [p["id"] for p in kept] == ["short", "ok"]
    err = capsys.readouterr().err
    assert "skipped 1 of 3 prompt(s) too long" in err and "(ids: huge-1)" in err


def test_changed_setting_resume_is_refused_and_restarts_on_request_in_a_moved_run_dir(tmp_path):
    first = tmp_path / "first"
    _kill_when(first, "iter_1/dpo/pairs_ref.jsonl")  # killed inside the DPO stage
    moved = tmp_path / "moved"
    shutil.move(str(first), str(moved))  # fingerprints do not hold the run directory's path
    config_before = (moved / "config.json").read_text()
    shard = moved / "iter_1" / "generate" / "shard_00000.jsonl"
    mtime = shard.stat().st_mtime_ns

    res = _run(moved, "--set", "dpo.train.learning_rate=2e-3", timeout=300)
    line = _one_error_line(res, alone=False)
    assert "dpo.train.learning_rate: 0.001 (stored) vs 0.002 (now)" in line and "--restart-changed" in line, line
    assert (moved / "config.json").read_text() == config_before  # the refusing run left it alone
    assert (moved / "iter_1" / "dpo" / "pairs_ref.jsonl").exists()

    res = _run(moved, "--set", "dpo.train.learning_rate=2e-3", "--restart-changed", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "restarting stage 'dpo' from scratch (dpo.train.learning_rate: 0.001 (stored) vs 0.002 (now))" in res.stderr
    assert "restarting stage 'generate'" not in res.stderr and shard.stat().st_mtime_ns == mtime  # reused, not redone
    dpo = json.loads((moved / "iter_1" / "dpo" / "config.json").read_text())
    assert dpo["run"]["train"]["learning_rate"] == 2e-3
    assert json.loads((moved / "config.json").read_text())["dpo"]["train"]["learning_rate"] == 2e-3
    assert (moved / "iter_1" / "dpo" / "model" / "config.json").exists()
