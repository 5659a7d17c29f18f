"""Checkpoints: round trips across meshes, atomic saves, HF export, exact resumption, divergence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import models
from metajudge.checkpoint import CheckpointManager
from metajudge.train import make_sft_step
from metajudge.train_state import TrainConfig, abstract_train_state, init_train_state
from tests.metajudge.test_train import CFG, STD, sft_batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def trained_state(mesh=None, steps=1):
    cfg = STD
    model = models.create_model(CFG, seed=0, mesh=mesh)
    state = init_train_state(model, cfg, mesh)
    step = make_sft_step(cfg, state, mesh)
    for i in range(steps):
        state, _ = step(state, sft_batch(i))
    return model, cfg, state


# ------------------------------------------------------------------------------------ in process


@needs8
def test_restore_onto_a_mesh_with_fewer_devices_and_onto_one_device(tmp_path):
    mesh8 = models.make_mesh("data=2,fsdp=2,tensor=2")
    model, cfg, state = trained_state(mesh8)
    want = leaves(state)
    with CheckpointManager(str(tmp_path), keep=2) as ckpt:
        ckpt.save(1, state, {"next_index": 8}, {"note": "hello"})
        mesh2 = models.make_mesh("fsdp=2", devices=jax.devices()[:2])
        for mesh in (mesh2, None):
            r = ckpt.restore(None, abstract_train_state(model, cfg, mesh))
            assert (r.step, r.data_state, r.extra) == (1, {"next_index": 8}, {"note": "hello"})
            for a, b in zip(want, leaves(r.state)):
                np.testing.assert_array_equal(a, b)
            emb = r.state.params["embedding_vd"].value
            assert len(emb.sharding.device_set) == (2 if mesh is not None else 1)
        # The restored state trains on: the step accepts it as its own.
        r = ckpt.restore(1, abstract_train_state(model, cfg, mesh2))
        s2, m = make_sft_step(cfg, r.state, mesh2)(r.state, sft_batch(1))
        assert int(s2.step) == 2 and np.isfinite(m["loss"])


def test_saves_are_atomic_and_half_written_checkpoints_are_ignored(tmp_path):
    model, cfg, state = trained_state(steps=0)
    ckpt = CheckpointManager(str(tmp_path), keep=2)
    for s in (1, 2, 3):
        ckpt.save(s, state, {"next_index": s})
    assert ckpt.all_steps() == [2, 3]  # keep=2
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]  # committed by rename: no temporary left behind
    # A crash mid-save leaves only a temporary directory: it is never listed nor restored.
    crashed = tmp_path / "4.orbax-checkpoint-tmp-1234567"
    (crashed / "params").mkdir(parents=True)
    (crashed / "params" / "junk").write_text("half written")
    assert ckpt.latest_step() == 3
    r = ckpt.restore(None, abstract_train_state(model, cfg))
    assert r.step == 3 and r.data_state == {"next_index": 3}
    ckpt.close()
    # A restarted process's manager removes the leftover (at the latest when it first saves).
    with CheckpointManager(str(tmp_path), keep=2) as again:
        again.save(4, state)
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]


def test_export_hf_writes_a_checkpoint_that_load_model_reads_back(tmp_path):
    _, _, state = trained_state(steps=0)
    with CheckpointManager(str(tmp_path / "ckpt")) as ckpt:
        ckpt.save(1, state)
        ckpt.export_hf(None, CFG, str(tmp_path / "hf"))
    config, loaded = models.load_model(str(tmp_path / "hf"))
    assert config.num_layers == CFG.num_layers
    np.testing.assert_array_equal(np.asarray(loaded.layers[1].mlp.up_proj_df.value),
                                  np.asarray(state.params["layers"][1]["mlp"]["up_proj_df"].value))


@pytest.mark.parametrize("argv,msg", [
    (["--preset", "nope", "--data", "x.jsonl", "--out", "o"], "error: unknown preset 'nope'; known: smollm2, tiny"),
    (["--preset", "tiny", "--data", "/no/such.jsonl", "--out", "o"], "error: /no/such.jsonl: no such data file"),
    (["--preset", "tiny", "--data", "x", "--out", "o", "--set", "train.lr=1"], "error: --set train.lr: TrainConfig has no field 'lr'"),
])
def test_cli_user_errors_print_one_line_and_exit_2(argv, msg, capsys):
    from experiments.cli import run_main
    from experiments.sft import main

    with pytest.raises(SystemExit) as info:
        run_main(main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(msg), err


def test_cli_reports_a_bad_data_file_without_traceback(tmp_path, capsys):
    from experiments.cli import run_main
    from experiments.dpo import main

    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a"}\nnot json\n')
    with pytest.raises(SystemExit) as info:
        run_main(main, ["--preset", "tiny", "--data", str(bad), "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {bad}: no valid DPO pairs")


# ----------------------------------------------------------------------- the CLI, in subprocesses


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer saved as tokenizer.json: the children load it in 0.2 s instead of 7 s."""
    from transformers import AutoTokenizer

    from models.loading import embedded_gguf_path

    path = embedded_gguf_path()
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    out = str(tmp_path_factory.mktemp("tok"))
    hf.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sft_jsonl(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the judge scores each answer for accuracy and clarity then explains why briefly".split()
    say = lambda lo, hi: " ".join(rng.choice(words, size=int(rng.integers(lo, hi))))
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    with open(path, "w") as f:
        for _ in range(12):
            f.write(json.dumps({"messages": [{"role": "user", "content": say(2, 8)},
                                             {"role": "assistant", "content": say(2, 20)}]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sft_cli(tmp_path_factory, sft_jsonl, tokenizer_dir):
    """Runs ``python -m experiments.sft`` on one CPU device; returns ``(exit status, stderr)``."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))  # later children skip compiling
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def run(out, *extra) -> tuple[int, str]:
        args = [sys.executable, "-m", "experiments.sft", "--preset", "tiny", "--data", sft_jsonl, "--out", str(out),
                "--set", f"tokenizer={tokenizer_dir}", "--set", "train.total_steps=4", "--set", "batch_size=2",
                "--set", "max_len=48", "--set", "train.learning_rate=1e-3", "--set", "train.warmup_steps=2", *extra]
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stderr

    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_cli):
    """4 steps straight; and 2 steps, process exit, a new process with --resume, 2 more steps."""
    base = tmp_path_factory.mktemp("runs")
    straight, split = base / "straight", base / "split"
    for out, extra in ((straight, ()), (split, ("--set", "stop_after=2"))):
        rc, err = sft_cli(out, *extra)
        assert rc == 0, err
    assert CheckpointManager(str(split / "checkpoints")).all_steps() == [2]
    rc, err = sft_cli(split, "--resume")
    assert rc == 0, err
    assert "resumed from" in err
    return straight, split


def read_metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def restore_final(run_dir):
    config = models.LlamaConfig(**{k: tuple(v) if k == "eos_token_ids" else v
                                   for k, v in json.load(open(run_dir / "config.json"))["model"].items()})
    from flax import nnx

    abstract = nnx.eval_shape(lambda: models.Llama(config, rngs=nnx.Rngs(0)))
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=2, total_steps=4)
    with CheckpointManager(str(run_dir / "checkpoints")) as ckpt:
        return ckpt.restore(None, abstract_train_state(abstract, cfg))


def test_resume_2_plus_2_steps_equals_4_steps_straight(runs):
    straight, split = runs
    a, b = read_metrics(straight), read_metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert [m["batch_crc"] for m in a] == [m["batch_crc"] for m in b]  # same data order
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-6)
    ra, rb = restore_final(straight), restore_final(split)
    assert ra.step == rb.step == 4 and ra.data_state == rb.data_state
    for x, y in zip(leaves(ra.state), leaves(rb.state)):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)
    assert os.path.exists(split / "model" / "model.safetensors")
    assert json.load(open(split / "config.json"))["run"]["train"]["total_steps"] == 4


def test_nan_loss_stops_the_run_with_a_clear_message_and_keeps_the_last_good_checkpoint(runs, sft_cli):
    straight, _ = runs
    run = straight.parent / "diverged"
    shutil.copytree(straight, run)
    rc, err = sft_cli(run, "--resume-changed", "--set", "train.total_steps=6", "--set", "train.learning_rate=inf")
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at step 5: loss=") and "Lower the learning rate" in last
    assert "Last good checkpoint: step 4" in last and "Traceback" not in err
    assert CheckpointManager(str(run / "checkpoints")).all_steps() == [4]
    good, kept = restore_final(straight), restore_final(run)
    for x, y in zip(leaves(good.state), leaves(kept.state)):
        assert np.isfinite(y).all()
        np.testing.assert_array_equal(y, x)
    assert read_metrics(run)[-1]["diverged"] is True


# ------------------------------------------------------------- reliability (issue 24): corrupt checkpoints


def _corrupt(step_dir, how):
    """Breaks a committed orbax step the way a lost disk block or a killed copy would."""
    params = step_dir / "params"
    if how == "deleted data file":
        data = sorted(p for p in params.rglob("*") if p.is_file() and p.parent.name == "d")
        assert data, list(params.rglob("*"))
        for p in data:
            p.unlink()
    else:  # truncated manifest
        manifests = list(params.rglob("manifest.ocdbt"))
        assert manifests
        for m in manifests:
            m.write_bytes(m.read_bytes()[:7])


@pytest.mark.parametrize("how", ["deleted data file", "truncated manifest.ocdbt"])
def test_restore_falls_back_to_the_newest_checkpoint_that_reads_back(tmp_path, how, capsys):
    model, cfg, s1 = trained_state(steps=1)
    _, _, s2 = trained_state(steps=2)
    want = leaves(s1)
    with CheckpointManager(str(tmp_path), keep=3) as ckpt:
        ckpt.save(1, s1, {"next_index": 1})
        ckpt.save(2, s2, {"next_index": 2})
    _corrupt(tmp_path / "2", how)
    with CheckpointManager(str(tmp_path), keep=3) as ckpt:
        with pytest.raises(Exception):  # the plain restore of the newest step fails ...
            ckpt.restore(2, abstract_train_state(model, cfg))
        r = ckpt.restore_latest_good(abstract_train_state(model, cfg))  # ... the fallback does not
        assert r.step == 1 and r.data_state == {"next_index": 1}
        for a, b in zip(want, leaves(r.state)):
            np.testing.assert_array_equal(a, b)
        assert ckpt.all_steps() == [1]  # the unreadable step is gone: it will be trained again
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path}/2 does not read back" in err and "skipping it" in err


def test_a_step_another_process_cannot_read_is_skipped_by_every_process(tmp_path, capsys, monkeypatch):
    """Multi-process runs: each process reads its own shards, so all must agree on the step. Here
    this process reads step 2 fine while (simulated) process 1 fails on it: all resume from step 1."""
    from models import distributed

    model, cfg, s1 = trained_state(steps=1)
    _, _, s2 = trained_state(steps=2)
    with CheckpointManager(str(tmp_path), keep=3) as ckpt:
        ckpt.save(1, s1, {"next_index": 1})
        ckpt.save(2, s2, {"next_index": 2})
    answers = iter([np.array([0, 1]), np.array([0, 0])])  # step 2: process 1 failed; step 1: both read it
    monkeypatch.setattr(distributed, "process_gather", lambda flag: next(answers))
    with CheckpointManager(str(tmp_path), keep=3) as ckpt:
        r = ckpt.restore_latest_good(abstract_train_state(model, cfg))
        assert r.step == 1 and r.data_state == {"next_index": 1}
        for a, b in zip(leaves(s1), leaves(r.state)):
            np.testing.assert_array_equal(a, b)
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path}/2 does not read back (process(es) 1 could not read their part); skipping it" in err


def test_resume_past_a_corrupt_newest_checkpoint_equals_the_straight_run(runs, sft_cli):
    straight, split = runs  # split holds checkpoints 2 and 4
    run = straight.parent / "corrupt"
    shutil.copytree(split, run)
    _corrupt(run / "checkpoints" / "4", "deleted data file")
    shutil.rmtree(run / "model")
    rc, err = sft_cli(run, "--resume")
    assert rc == 0, err
    assert "checkpoints/4 does not read back" in err and "resumed from" in err
    a, b = read_metrics(straight), read_metrics(run)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-6)
    ra, rb = restore_final(straight), restore_final(run)
    for x, y in zip(leaves(ra.state), leaves(rb.state)):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)


def test_resume_with_a_changed_setting_is_refused_naming_the_key(runs, sft_cli):
    _, split = runs
    run = split.parent / "changed"
    shutil.copytree(split, run)
    shutil.rmtree(run / "checkpoints" / "4")  # as if killed after step 2
    before = (run / "config.json").read_text()
    rc, err = sft_cli(run, "--resume", "--set", "train.learning_rate=2e-3")
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "train.learning_rate: 0.001 (stored) vs 0.002 (now)" in last, last
    assert (run / "config.json").read_text() == before  # the refusing run changed nothing
    assert CheckpointManager(str(run / "checkpoints")).all_steps() == [2]


def test_restart_deletes_the_earlier_run_and_trains_from_scratch(runs, sft_cli):
    straight, split = runs
    run = split.parent / "restarted"
    shutil.copytree(split, run)
    shutil.rmtree(run / "checkpoints" / "4")  # as if killed after step 2
    (run / "notes.txt").write_text("the user's own file")
    rc, err = sft_cli(run, "--restart", "--set", "train.learning_rate=2e-3")
    assert rc == 0, err
    assert f"{run}: --restart deleted checkpoints, metrics.jsonl, tensorboard, config.json, model" in err
    assert "resumed from" not in err and (run / "notes.txt").read_text() == "the user's own file"
    assert json.loads((run / "config.json").read_text())["run"]["train"]["learning_rate"] == 2e-3
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
    assert CheckpointManager(str(run / "checkpoints")).all_steps() == [4]  # the old step 2 is gone
    # From scratch: step 1 sees the initial weights, as in the straight run (same seed and data order).
    np.testing.assert_allclose(read_metrics(run)[0]["loss"], read_metrics(straight)[0]["loss"], rtol=1e-6)


def test_restart_and_resume_together_are_refused(tmp_path, sft_cli):
    rc, err = sft_cli(tmp_path / "o", "--restart", "--resume")
    assert rc == 2 and "--restart starts over; it cannot be combined with --resume" in err
    assert not (tmp_path / "o").exists()


def test_a_second_command_on_a_locked_out_exits_2_and_touches_nothing(tmp_path, sft_cli):
    from models.files import DirLock

    out = tmp_path / "busy"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # the first run's state
    with DirLock(str(out)):  # this process plays the first run
        rc, err = sft_cli(out, "--restart")  # even --restart must not delete a live run's files
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"is in use by another run (pid {os.getpid()} on host" in last, last
    assert sorted(os.listdir(out)) == [".lock", "metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_clear_run_outputs_deletes_exactly_what_a_run_writes(tmp_path):
    from metajudge.trainer import REF_FILE, RUN_OUTPUTS, clear_run_outputs

    for name in ("checkpoints/2", "tensorboard", "model"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("metrics.jsonl", "config.json", REF_FILE, REF_FILE + ".settings.json", "pairs.jsonl", ".lock"):
        (tmp_path / name).write_text("x")
    assert clear_run_outputs(str(tmp_path)) == list(RUN_OUTPUTS)
    assert sorted(os.listdir(tmp_path)) == [".lock", "pairs.jsonl"]  # the input pairs and the lock stay
    assert clear_run_outputs(str(tmp_path)) == []


@pytest.fixture(scope="module")
def dpo_cli(tmp_path_factory, tokenizer_dir):
    """Runs ``python -m experiments.dpo`` (tiny preset, 2 steps) on one CPU device."""
    rng = np.random.default_rng(1)
    words = "a clear answer names the facts and a poor one rambles on about nothing".split()
    say = lambda: " ".join(rng.choice(words, size=int(rng.integers(3, 10))))
    pairs = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": say(), "chosen": say(), "rejected": say()}) + "\n" for _ in range(8)))
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def run(out, *extra) -> tuple[int, str]:
        args = [sys.executable, "-m", "experiments.dpo", "--preset", "tiny", "--data", str(pairs), "--out", str(out),
                "--set", f"tokenizer={tokenizer_dir}", "--set", "train.total_steps=2", "--set", "batch_size=2",
                "--set", "max_len=48", "--set", "train.learning_rate=1e-3", "--set", "train.warmup_steps=1", *extra]
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stderr

    return run


def test_dpo_resume_with_changed_settings_is_refused_and_restart_redoes_it(tmp_path, dpo_cli):
    out = tmp_path / "dpo"
    rc, err = dpo_cli(out, "--set", "stop_after=1")
    assert rc == 0, err
    ref = (out / "pairs_ref.jsonl").read_text()
    rc, err = dpo_cli(out, "--resume", "--set", "max_len=40")  # other reference log-probs
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "reference log-probs were computed for other pairs or settings (run.max_len: 48 (stored) vs 40 (now))" in last
    assert "--restart" in last and (out / "pairs_ref.jsonl").read_text() == ref  # refused, untouched
    rc, err = dpo_cli(out, "--resume", "--set", "train.learning_rate=2e-3")  # other training settings
    assert rc == 2 and "train.learning_rate: 0.001 (stored) vs 0.002 (now)" in err.strip().splitlines()[-1], err
    assert CheckpointManager(str(out / "checkpoints")).all_steps() == [1]
    rc, err = dpo_cli(out, "--restart", "--set", "train.learning_rate=2e-3")
    assert rc == 0, err
    assert "--restart deleted checkpoints" in err and "pairs_ref.jsonl" in err
    assert json.loads((out / "config.json").read_text())["run"]["train"]["learning_rate"] == 2e-3
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert (out / "model" / "config.json").exists()
