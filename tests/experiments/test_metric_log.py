"""Metrics in TensorBoard and W&B (metajudge.metric_log), read back with TensorBoard's own reader."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from metajudge.metric_log import MetricLog, flatten_scalars

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard shows them (purged events left out)."""
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_flatten_keeps_real_numbers_under_slash_joined_tags():
    metrics = {"loss": 0.5, "n": 3, "ok": True, "kind": "dpo", "evaluation": {"win_rate": 0.25, "judge": "tiny"},
               "lengths": [1, 2], "none": None, "np": np.float32(2.0)}
    assert dict(flatten_scalars(metrics)) == {"loss": 0.5, "n": 3.0, "ok": 1.0, "evaluation/win_rate": 0.25, "np": 2.0}


def test_a_resumed_log_hides_what_the_interrupted_attempt_wrote_after_the_restart(tmp_path):
    logdir = str(tmp_path / "tb")
    with MetricLog(logdir, prefix="dpo") as log:
        for step in range(1, 6):  # the interrupted attempt got to step 5; its checkpoint is at 2
            log.log({"loss": 10.0 + step}, step=step)
    with MetricLog(logdir, prefix="dpo", purge_step=3) as log:
        for step in range(3, 5):
            log.log({"loss": 20.0 + step}, step=step)
    assert read_scalars(logdir)["loss"] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]


def test_nan_is_kept_without_a_warning_per_value(tmp_path, caplog):
    """A metric with no value this step (NaN) reaches TensorBoard as NaN, quietly."""
    logdir = str(tmp_path / "tb")
    with caplog.at_level("WARNING"), MetricLog(logdir, prefix="loop") as log:
        log.log({"judge_pair_precision": float("nan"), "actor_pairs": 12}, step=1)
    scalars = read_scalars(logdir)
    assert np.isnan(scalars["judge_pair_precision"][0][1]) and scalars["actor_pairs"] == [(1, 12.0)]
    assert not [r for r in caplog.records if "NaN" in r.getMessage()]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A tiny loop run with W&B in offline mode (no network), no evaluation."""
    out = tmp_path_factory.mktemp("logged")
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "XLA_FLAGS": "", "WANDB_CONFIG_DIR": str(home), "WANDB_CACHE_DIR": str(home),
           "WANDB_DATA_DIR": str(home), "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "experiments.meta_reward", "--preset", "tiny", "--out", str(out),
           "--set", "evaluate.enabled=false", "--set", "log.wandb=true", "--set", "log.wandb_mode=offline"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_every_dpo_step_is_in_tensorboard_with_the_metrics_jsonl_values(logged_run):
    steps = [json.loads(line) for line in open(logged_run / "iter_1" / "dpo" / "metrics.jsonl")]
    scalars = read_scalars(str(logged_run / "iter_1" / "dpo" / "tensorboard"))
    for key in ("loss", "rewards/accuracy", "rewards/margin", "tokens_per_s"):
        assert [s for s, _ in scalars[key]] == [r["step"] for r in steps]
        np.testing.assert_allclose([v for _, v in scalars[key]], [r[key] for r in steps], rtol=1e-6)  # float32 events


def test_every_iteration_is_in_tensorboard_with_the_metrics_json_values(logged_run):
    metrics = json.loads((logged_run / "metrics.json").read_text())
    scalars = read_scalars(str(logged_run / "tensorboard"))
    for key in ("actor_pairs", "judge_pairs", "responses"):
        assert scalars[key] == [(m["iteration"], pytest.approx(float(m[key]))) for m in metrics]


def wandb_history(path: str) -> list[dict]:
    """The ``history`` rows of an offline W&B run file, with W&B's own protobuf classes. The file is
    W&B's 7-byte header, then a LevelDB-style log: 32 KiB blocks of chunks (crc32 4 bytes, length
    2, type 1: full, first, middle, last), each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, block, records, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(part)
            part = b""
    rows = []
    for raw in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_run_holds_the_same_scalars(logged_run):
    (run_file,) = glob.glob(str(logged_run / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_history(run_file)
    steps = [json.loads(line) for line in open(logged_run / "iter_1" / "dpo" / "metrics.jsonl")]
    dpo = [h for h in history if "iter_1/dpo/step" in h]
    assert [h["iter_1/dpo/step"] for h in dpo] == [r["step"] for r in steps]
    assert [h["iter_1/dpo/loss"] for h in dpo] == [r["loss"] for r in steps]
    metrics = json.loads((logged_run / "metrics.json").read_text())
    loop = [h for h in history if "loop/step" in h]
    assert [(h["loop/step"], h["loop/actor_pairs"]) for h in loop] == [(m["iteration"], m["actor_pairs"]) for m in metrics]


def test_wandb_without_the_package_is_one_readable_line(tmp_path):
    code = ("import sys; sys.modules['wandb'] = None; import importlib.util as u; "
            "u.find_spec = (lambda f: (lambda n, *a: None if n == 'wandb' else f(n, *a)))(u.find_spec); "
            "from experiments.cli import run_main; from experiments.meta_reward import main; "
            f"run_main(main, ['--preset', 'tiny', '--out', {str(tmp_path / 'o')!r}, '--set', 'log.wandb=true'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "XLA_FLAGS": ""})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.startswith("error: ") and 'pip install -e ".[wandb]"' in res.stderr
    assert not os.path.exists(tmp_path / "o" / "iter_1")
