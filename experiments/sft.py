"""Supervised fine-tuning (the seed model M0 of METHODS.md: IFT + EFT data), plus the shared loop.

    python -m experiments.sft --preset smollm2 --data train.jsonl --out runs/sft \\
        [--resume] [--set train.learning_rate=2e-5 --set batch_size=16 ...]

Writes ``<out>/config.json`` (the resolved config), ``<out>/metrics.jsonl`` (one line per step),
``<out>/checkpoints/<step>/`` (orbax) and, at the end, ``<out>/model/`` (Hugging Face format,
loadable with ``models.load_model``). ``--resume`` continues from the latest checkpoint with the
same parameters, optimizer state, RNG and data order as an uninterrupted run.

Presets (``--preset``):
  ``smollm2``  the embedded SmolLM2-135M-Instruct and its tokenizer (the default);
  ``tiny``     a random 2-layer, width-64 Llama with SmolLM2's tokenizer and vocabulary (tests,
               smoke runs: it learns nothing useful).
``--set model=SOURCE`` replaces the preset's weights by any ``models.load_model`` source (an
exported ``<out>/model``, a checkpoint directory, a hub id); ``--set tokenizer=SOURCE`` its tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import zlib
from typing import Any, Optional, Sequence

import numpy as np

from experiments.cli import UsageError, apply_overrides, config_dict, run_main
from metajudge.train import TrainConfig, TrainingDiverged

PRESET_NAMES = ("smollm2", "tiny")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run: model, data, batching, mesh, checkpoints; ``train`` holds the optimization."""

    preset: str = "smollm2"
    model: Optional[str] = None  # a models.load_model source replacing the preset's weights
    tokenizer: Optional[str] = None  # a models.load_tokenizer source replacing the preset's tokenizer
    data: str = ""
    out: str = ""
    max_len: int = 512
    batch_size: int = 8  # rows per optimizer step (all micro-batches together)
    pack: bool = True  # SFT only: several conversations per row (see the packing note in the report)
    num_epochs: int = 1  # run length when train.total_steps == 0
    shuffle: bool = True
    mesh: Optional[str] = None  # e.g. "data=2,fsdp=-1"; default: every device on fsdp
    dtype: str = "float32"
    save_every: int = 100
    keep: int = 3
    stop_after: int = 0  # > 0: stop after this step as if preempted (--resume continues)
    export: bool = True  # write <out>/model at the end
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(learning_rate=1e-5))


# -------------------------------------------------------------------------------------- presets


def tiny_config(tok: Any, dtype: str) -> Any:
    """The `tiny` test model sized for a real tokenizer (SmolLM2's vocabulary and special ids)."""
    import models

    return models.get_config(
        "tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_ids=tok.eos_token_ids,
        pad_token_id=tok.pad_token_id, max_position_embeddings=4096, dtype=dtype, param_dtype=dtype,
    )


def load_preset(run: RunConfig, mesh: Any) -> tuple[Any, Any, Any]:
    """``(LlamaConfig, model, tokenizer)`` for ``run.preset`` (and its model/tokenizer overrides)."""
    import models

    if run.preset not in PRESET_NAMES:
        raise UsageError(f"unknown preset {run.preset!r}; known: {', '.join(PRESET_NAMES)}")
    tok = models.load_tokenizer(run.tokenizer or models.EMBEDDED_NAME)
    if run.model:
        config, model = models.load_model(run.model, dtype=run.dtype, mesh=mesh)
    elif run.preset == "smollm2":
        config, model = models.load_model(models.EMBEDDED_NAME, dtype=run.dtype, mesh=mesh)
    else:
        config = tiny_config(tok, run.dtype)
        model = models.create_model(config, seed=run.train.seed, mesh=mesh)
    if tok.vocab_size > config.vocab_size:
        raise UsageError(f"tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}")
    return config, model, tok


def resolve_mesh(spec: Optional[str]) -> Any:
    from models.sharding import make_mesh

    try:
        return make_mesh(spec)
    except ValueError as e:
        raise UsageError(f"--set mesh={spec}: {e}") from None


def check_out_dir(out: str, resume: bool) -> None:
    """Refuses to start a fresh run over an existing one (before any time is spent on the model)."""
    if not out:
        raise UsageError("no output directory: pass --out DIR")
    ckpts = os.path.join(out, "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else []
    if steps and not resume:
        raise UsageError(f"{out} already holds checkpoints (last: step {steps[-1]}); pass --resume or choose a new --out")


def check_data_file(path: str) -> None:
    if not path:
        raise UsageError("no data file: pass --data FILE.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "no such data file", path)


# ----------------------------------------------------------------------------------- the loop


def _batch_tokens(kind: str, batch: dict) -> int:
    if kind == "sft":
        return int(np.count_nonzero(batch["segment_ids"]))
    return int(np.count_nonzero(batch["chosen_segment_ids"]) + np.count_nonzero(batch["rejected_segment_ids"]))


def _batch_crc(kind: str, batch: dict) -> int:
    key = "inputs" if kind == "sft" else "chosen_inputs"
    return zlib.crc32(np.ascontiguousarray(batch[key]).tobytes())


def _global_batch_stats(kind: str, batch: dict, batch_size: int) -> tuple[int, int]:
    """Tokens and CRC of the whole global batch when each process holds only some of its rows:
    tokens summed over the processes' row blocks, the CRC of the processes' CRCs (in process order)."""
    from models.distributed import process_count, process_gather

    n_tok, crc = _batch_tokens(kind, batch), _batch_crc(kind, batch)
    if process_count() == 1:
        return n_tok, crc
    rows = len(next(iter(batch.values())))
    per_process = process_gather(np.asarray([n_tok, crc, rows], np.int64))
    copies = int(per_process[:, 2].sum()) // batch_size  # processes holding the same rows count once
    return int(per_process[:, 0].sum()) // max(copies, 1), zlib.crc32(per_process[:, 1].tobytes())


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drops lines logged after ``last_step`` (steps re-run after a resume are logged again);
    on process 0 only."""
    from models.distributed import is_primary

    if not is_primary() or not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _write_json(path: str, obj: Any) -> None:
    from models.distributed import is_primary

    if not is_primary():
        return
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def total_steps(run: RunConfig, n_examples: int) -> int:
    if run.train.total_steps > 0:
        return run.train.total_steps
    per_epoch = n_examples // run.batch_size
    if per_epoch == 0:
        raise UsageError(f"{run.data}: {n_examples} examples are fewer than one batch (batch_size={run.batch_size})")
    return per_epoch * run.num_epochs


def train_loop(kind: str, *, config: Any, model: Any, examples: Sequence[dict], run: RunConfig, resume: bool, mesh: Any) -> Any:
    """Trains ``model`` on ``examples`` (``"sft"`` or ``"dpo"`` rows); returns the final ``TrainState``."""
    from tqdm import tqdm

    from metajudge.checkpoint import CheckpointManager
    from metajudge.data import make_dataset
    from metajudge.train import TrainStep, abstract_train_state, batch_rows, first_loss_position, init_train_state
    from models.distributed import is_primary
    from models.loading import save_hf

    check_out_dir(run.out, resume)
    steps = total_steps(run, len(examples))
    train = run.train.replace(total_steps=steps)
    run = dataclasses.replace(run, train=train)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if run.batch_size % (dp * train.grad_accum_steps):
        raise UsageError(
            f"batch_size={run.batch_size} must be a multiple of data*fsdp={dp} times "
            f"train.grad_accum_steps={train.grad_accum_steps}"
        )
    os.makedirs(run.out, exist_ok=True)
    ckpt = CheckpointManager(os.path.join(run.out, "checkpoints"), keep=run.keep)
    latest = ckpt.latest_step()
    _write_json(os.path.join(run.out, "config.json"), {"kind": kind, "run": config_dict(run), "model": dataclasses.asdict(config)})

    # Every process reads the same global batches and keeps the rows its devices hold.
    it = make_dataset(
        list(examples), batch_size=run.batch_size, seed=train.seed, shuffle=run.shuffle,
        num_epochs=None if run.train.total_steps > 0 else run.num_epochs, rows=batch_rows(mesh, run.batch_size),
    )
    metrics_path = os.path.join(run.out, "metrics.jsonl")
    start = 0
    if resume and latest is not None:
        restored = ckpt.restore(latest, abstract_train_state(model, train, mesh))
        state, start = restored.state, restored.step
        it.set_state(restored.data_state)
        _truncate_metrics(metrics_path, start)
        print(f"resumed from {ckpt.directory}/{start}", file=sys.stderr)
    else:
        state = init_train_state(model, train, mesh)
        _truncate_metrics(metrics_path, 0)
    # Every example is known up front, so one compiled step skips the loss-free prompt prefix of all.
    step_fn = TrainStep(kind, train, state, mesh, batch_size=run.batch_size, loss_from=first_loss_position(examples, kind))
    extra = {"kind": kind, "run": config_dict(run), "model": dataclasses.asdict(config)}

    bar = tqdm(total=steps, initial=start, desc=kind, unit="step", dynamic_ncols=True, file=sys.stderr, disable=not is_primary())
    try:
        with open(metrics_path if is_primary() else os.devnull, "a") as mf:  # one writer on multi-process runs
            for done in range(start + 1, steps + 1):
                batch = next(it)
                t0 = time.perf_counter()
                try:
                    state, m = step_fn(state, batch)
                except TrainingDiverged as e:
                    mf.write(json.dumps({"step": done, "diverged": True, **e.metrics}) + "\n")
                    last = ckpt.latest_step()
                    where = f"step {last} in {ckpt.directory}" if last is not None else "none yet"
                    raise TrainingDiverged(f"{e} Last good checkpoint: {where}.", step=e.step, metrics=e.metrics, state=e.state) from None
                dt = time.perf_counter() - t0
                n_tok, crc = _global_batch_stats(kind, batch, run.batch_size)
                rec = {"step": done, **m, "tokens": n_tok, "tokens_per_s": n_tok / dt, "step_time_s": dt, "batch_crc": crc}
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{n_tok / dt:,.0f}")
                bar.update(1)
                stopping = run.stop_after > 0 and done >= run.stop_after
                if done % run.save_every == 0 or done == steps or stopping:
                    ckpt.save(done, state, it.get_state(), dict(extra, metrics=m))
                if stopping:
                    print(f"stopped after step {done} (stop_after); continue with --resume", file=sys.stderr)
                    break
    finally:
        bar.close()
        ckpt.close()
    if run.export and int(state.step) == steps:
        save_hf(config, state.model, os.path.join(run.out, "model"))
    return state


# ------------------------------------------------------------------------------------------ SFT


def train_sft(run: RunConfig, resume: bool = False) -> Any:
    """Reads ``run.data``, loads the preset, trains; returns the final ``TrainState``."""
    from metajudge.data import DataError, build_sft_examples, read_jsonl

    if run.preset not in PRESET_NAMES:
        raise UsageError(f"unknown preset {run.preset!r}; known: {', '.join(PRESET_NAMES)}")
    check_data_file(run.data)
    check_out_dir(run.out, resume)
    records, _ = read_jsonl(run.data, kind="sft")
    if not records:
        raise DataError(f"{run.data}: no valid SFT records")
    mesh = resolve_mesh(run.mesh)
    config, model, tok = load_preset(run, mesh)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    examples = build_sft_examples(records, tok, max_len=run.max_len, pack=run.pack, pad_id=pad)
    if not examples:
        raise DataError(f"{run.data}: no example keeps a response token within max_len={run.max_len}")
    return train_loop("sft", config=config, model=model, examples=examples, run=run, resume=resume, mesh=mesh)


def parse_args(prog: str, description: str, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--preset", default="smollm2", help=f"model preset: {', '.join(PRESET_NAMES)} (default smollm2)")
    ap.add_argument("--data", required=True, help="training data, JSONL")
    ap.add_argument("--out", required=True, help="output directory (checkpoints, metrics, config, model)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field by dotted name, e.g. train.learning_rate=2e-5 (repeatable)")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args("python -m experiments.sft", "Supervised fine-tuning (the seed model).", argv)
    run = apply_overrides(RunConfig(preset=args.preset, data=args.data, out=args.out), args.set)
    state = train_sft(run, resume=args.resume)
    print(f"sft: {int(state.step)} steps; outputs in {run.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
