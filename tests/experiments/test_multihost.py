"""The loop as 2 processes x 2 CPU devices through jax.distributed, against 1 process x 4 devices.

Both runs use the same global mesh shape (fsdp=4) and seed, so the pairs must be identical and the
trained parameters equal up to the order of floating-point reductions in the collectives.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.experiments.crash import crash_command

# The held-out evaluation stage has its own tests (test_evaluate_cli); off here to keep the suite short.
CMD = [sys.executable, "-m", "experiments.meta_reward", "--preset", "tiny", "--set", "evaluate.enabled=false"]
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("METAJUDGE_")}
BASE_ENV.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


_PORTS: set[int] = set()


def _free_port() -> int:
    """A free TCP port for a coordinator, never one handed out before in this session."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS:
            _PORTS.add(port)
            return port


def _start(out, processes: int, devices: int, crash_second_after: str = "") -> list[subprocess.Popen]:
    """``processes`` processes of the tiny loop with ``devices`` fake CPU devices each (logs beside ``out``);
    with ``crash_second_after``, process 1 SIGKILLs itself once it has passed the write of that file
    (tests.experiments.crash)."""
    env = dict(BASE_ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if processes > 1:
        env.update(METAJUDGE_COORDINATOR=f"127.0.0.1:{_free_port()}", METAJUDGE_NUM_PROCESSES=str(processes))
    procs = []
    for i in range(processes):
        penv = dict(env, METAJUDGE_PROCESS_ID=str(i)) if processes > 1 else env
        log = open(f"{out}.{i}.log", "a")
        cmd = [*CMD, "--out", str(out)]
        if i == 1 and crash_second_after:
            cmd = crash_command(cmd, crash_second_after)
        procs.append(subprocess.Popen(cmd, env=penv, stdout=log, stderr=subprocess.STDOUT, text=True))
    return procs


def _log(out, i: int) -> str:
    with open(f"{out}.{i}.log") as f:
        return f.read()[-3000:]


def _finish(out, procs: list[subprocess.Popen]) -> None:
    for i, p in enumerate(procs):
        assert p.wait(timeout=1200) == 0, _log(out, i)


JUDGE_SHARD_0 = os.path.join("iter_1", "judge", "shard_00000.jsonl")


def _second_killed_inside_judge(out, procs: list[subprocess.Popen]) -> dict:
    """Waits for process 1, started to die right after the judge stage's first shard (of 2), and
    for the survivor; returns the survivor's exit status and whether the stage was left unfinished
    with its first shard written."""
    assert procs[1].wait(timeout=600) == -signal.SIGKILL, _log(out, 1)
    try:  # the survivor fails at its next collective and exits by itself instead of hanging
        rc = procs[0].wait(timeout=600)
    finally:
        procs[0].kill()
    unfinished = (os.path.exists(os.path.join(out, JUDGE_SHARD_0))
                  and not os.path.exists(os.path.join(out, "iter_1", "judge", "manifest.json")))
    return {"survivor_rc": rc, "stage_unfinished": unfinished}


def _pairs(out) -> list[dict]:
    with open(os.path.join(out, "iter_1", "pairs", "pairs.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(out) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(out, "iter_1", "dpo", "model", "model.safetensors"))


def _assert_same_results(out, ref) -> None:
    assert _pairs(out) == _pairs(ref)
    a, b = _params(out), _params(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x 4 fake CPU devices and 2 processes x 2, side by side (they share the machine's
    cores); then, once the pair has left its programs in the persistent compile cache, 2 x 2 again
    with process 1 killed inside the judge stage, and the pair restarted with the same command."""
    root = tmp_path_factory.mktemp("multihost")
    out = {name: root / name for name in ("single", "pair", "killed")}
    procs = {"single": _start(out["single"], 1, 4), "pair": _start(out["pair"], 2, 2)}
    _finish(out["pair"], procs["pair"])
    kill = _second_killed_inside_judge(out["killed"], _start(out["killed"], 2, 2, crash_second_after=JUDGE_SHARD_0))
    procs["killed"] = _start(out["killed"], 2, 2)
    for name in ("single", "killed"):
        _finish(out[name], procs[name])
    return {**out, **kill}


def test_two_processes_give_the_pairs_and_parameters_of_one(runs):
    single, pair = runs["single"], runs["pair"]
    pairs = _pairs(single)
    assert pairs and {p["kind"] for p in pairs} <= {"actor", "judge"}
    with open(os.path.join(single, "iter_1", "dpo", "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    assert steps and steps[-1]["grad_norm"] > 0 and steps[-1]["lr"] > 0  # the parameters did move
    _assert_same_results(pair, single)
    for name in ("generate", "judge", "meta_judge"):  # every stage's records, not only the pairs
        with open(os.path.join(pair, "iter_1", name, "shard_00000.jsonl")) as f, \
                open(os.path.join(single, "iter_1", name, "shard_00000.jsonl")) as g:
            assert f.read() == g.read(), name
    # One writer: process 0's report; no temporary file of either process is left behind.
    assert "| iter |" in (pair / "report.md").read_text()
    assert not [f for _, _, files in os.walk(pair) for f in files if ".tmp" in f]


def test_a_killed_process_and_a_restarted_pair_end_with_the_same_results(runs):
    assert runs["stage_unfinished"] and runs["survivor_rc"] != 0
    _assert_same_results(runs["killed"], runs["single"])


def test_partial_multiprocess_settings_are_one_line_errors(tmp_path):
    env = dict(BASE_ENV, METAJUDGE_COORDINATOR="127.0.0.1:1234", XLA_FLAGS="")
    res = subprocess.run([*CMD, "--out", str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "METAJUDGE_NUM_PROCESSES, METAJUDGE_PROCESS_ID are not" in res.stderr
    assert not os.path.exists(tmp_path / "x")


def test_processes_started_with_different_settings_stop_with_one_line(tmp_path):
    out = tmp_path / "run"
    env = dict(BASE_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=1", METAJUDGE_NUM_PROCESSES="2",
               METAJUDGE_COORDINATOR=f"127.0.0.1:{_free_port()}")
    procs = [subprocess.Popen([*CMD, "--out", str(out), "--set", f"seed={i}"], env=dict(env, METAJUDGE_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and "Traceback" not in err, err[-2000:]
        assert "the loop settings and --out differ between processes" in err
    assert not os.path.exists(out / "config.json")
