"""Training runs (SFT and DPO) over lists of examples: their settings, their checks, the loop.

:func:`train_loop` trains a model on tokenized rows (``metajudge.data``) with the jitted steps of
``metajudge.train`` and writes ``<out>/config.json`` (the resolved settings),
``<out>/metrics.jsonl`` (one line per step), ``<out>/checkpoints/<step>/`` (orbax, with the data
iterator's state) and, at the end, ``<out>/model/`` (Hugging Face format). With ``resume`` it
continues from the latest checkpoint with the same parameters, optimizer state, RNG and data order
as an uninterrupted run. The commands ``experiments.sft`` and ``experiments.dpo`` and the loop's
DPO stage all train through it.

:func:`run_dpo` is one iteration of iterative DPO (METHODS.md): M_{t+1} = DPO(M_t, pairs_t) with
M_t as the reference. Reference log-probs are taken from the pairs when they carry
``ref_chosen_logp`` / ``ref_rejected_logp`` (the sampler's scorer); otherwise they are computed
once with the incoming model before any update and stored with the pairs in
``<out>/pairs_ref.jsonl``, which a resumed run reads back (the model has changed by then, so
recomputing them would give a different reference).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from typing import Any, Optional, Sequence

import numpy as np
from tqdm import tqdm

from metajudge.checkpoint import CheckpointManager
from metajudge.data import DataError, build_dpo_examples, make_dataset, read_jsonl
from metajudge.metric_log import MetricLog
from metajudge.stages import describe_differences, write_json_atomic, write_jsonl_atomic, write_text_atomic
from metajudge.train import TrainingDiverged, TrainStep, batch_rows, compute_reference_logps, first_loss_position
from metajudge.train_state import TrainConfig, abstract_train_state, init_train_state
from models.distributed import broadcast_json, is_primary, process_count, process_gather
from models.loading import save_hf
from models.sharding import data_parallel_size, make_mesh


class UsageError(Exception):
    """A bad command line or configuration; the message says what to change."""


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


@dataclasses.dataclass(frozen=True)
class DPORunConfig(RunConfig):
    """A DPO run: ``RunConfig`` plus prompt truncation and the reference-scoring batch size."""

    batch_size: int = 16  # pairs per optimizer step
    pack: bool = False  # DPO rows are never packed (one sequence log-prob per row)
    max_prompt_len: Optional[int] = None  # default max_len // 2 (see metajudge.data.tokenize_dpo)
    ref_batch_size: int = 8
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # lr 1e-6, beta 0.1


REF_FILE = "pairs_ref.jsonl"


# ------------------------------------------------------------------------------------- checks


def resolve_mesh(spec: Optional[str]) -> Any:
    """The device mesh of a ``mesh`` setting (``models.make_mesh``); a bad spec is a usage error."""
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
        raise UsageError(f"{out} already holds checkpoints (last: step {steps[-1]}); pass --resume to continue it, --restart to start over, or a new --out")


# What a training run writes into its ``--out`` (train_loop, reference_pairs): all of it goes on --restart.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "config.json", "model", REF_FILE,
               REF_FILE + ".settings.json")


def clear_run_outputs(out: str) -> list[str]:
    """Deletes what an earlier training run wrote into ``out`` (``RUN_OUTPUTS``; other files stay)
    so that the next run starts from scratch (the commands' ``--restart``); returns the names
    deleted. Process 0 deletes; the other processes wait for it."""
    gone = []
    if is_primary():
        for name in RUN_OUTPUTS:
            path = os.path.join(out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
            else:
                continue
            gone.append(name)
    return broadcast_json(gone if is_primary() else None)


def check_data_file(path: str) -> None:
    if not path:
        raise UsageError("no data file: pass --data FILE.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "no such data file", path)


def total_steps(run: RunConfig, n_examples: int) -> int:
    if run.train.total_steps > 0:
        return run.train.total_steps
    per_epoch = n_examples // run.batch_size
    if per_epoch == 0:
        raise UsageError(f"{run.data}: {n_examples} examples are fewer than one batch (batch_size={run.batch_size})")
    return per_epoch * run.num_epochs


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
    n_tok, crc = _batch_tokens(kind, batch), _batch_crc(kind, batch)
    if process_count() == 1:
        return n_tok, crc
    rows = len(next(iter(batch.values())))
    per_process = process_gather(np.asarray([n_tok, crc, rows], np.int64))
    copies = int(per_process[:, 2].sum()) // batch_size  # processes holding the same rows count once
    return int(per_process[:, 0].sum()) // max(copies, 1), zlib.crc32(per_process[:, 1].tobytes())


# Settings that may change between a run and its resumption: where things are, how often and how
# many checkpoints are kept, where it stops, the reference pass's batch, the mesh (checkpoints load
# onto any mesh).
RESUME_FREE_KEYS = ("out", "data", "stop_after", "export", "keep", "save_every", "ref_batch_size", "mesh")


def check_resumed_settings(out: str, stored: Optional[dict], now: dict, key_prefix: str = "") -> None:
    """Refuses to continue a checkpoint written with other training settings (it would train a
    hybrid): a :class:`UsageError` naming each differing key as ``<key_prefix><key>``."""
    if not stored:
        return
    drop = lambda d: {k: v for k, v in d.items() if k not in RESUME_FREE_KEYS}
    a = json.loads(json.dumps(drop(stored), default=str))
    b = json.loads(json.dumps(drop(now), default=str))
    if a == b:
        return
    diff = describe_differences({key_prefix.rstrip("."): a} if key_prefix else a,
                                {key_prefix.rstrip("."): b} if key_prefix else b)
    raise UsageError(f"{out}: its checkpoints were written with other settings ({diff}); resume with the same "
                     "settings, start over with --restart (the loop: --restart-changed), or use a new --out")


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drops lines logged after ``last_step`` (steps re-run after a resume are logged again);
    on process 0 only."""
    if not is_primary() or not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    write_text_atomic(path, "".join(keep))


def train_loop(
    kind: str, *, config: Any, model: Any, examples: Sequence[dict], run: RunConfig, resume: bool, mesh: Any,
    wandb_run: Any = None, log_prefix: Optional[str] = None, key_prefix: str = "", allow_changed_settings: bool = False,
) -> Any:
    """Trains ``model`` on ``examples`` (``"sft"`` or ``"dpo"`` rows); returns the final ``TrainState``.

    Each step's metrics go to ``<out>/metrics.jsonl`` and to TensorBoard (``<out>/tensorboard``),
    and to ``wandb_run`` under ``log_prefix`` (default ``kind``) when one is given
    (``metajudge.metric_log``)."""
    check_out_dir(run.out, resume)
    steps = total_steps(run, len(examples))
    train = run.train.replace(total_steps=steps)
    run = dataclasses.replace(run, train=train)
    dp = data_parallel_size(mesh)
    if run.batch_size % (dp * train.grad_accum_steps):
        raise UsageError(
            f"batch_size={run.batch_size} must be a multiple of data*fsdp={dp} times "
            f"train.grad_accum_steps={train.grad_accum_steps}"
        )
    os.makedirs(run.out, exist_ok=True)
    ckpt = CheckpointManager(os.path.join(run.out, "checkpoints"), keep=run.keep)
    latest = ckpt.latest_step()

    # Every process reads the same global batches and keeps the rows its devices hold.
    it = make_dataset(
        list(examples), batch_size=run.batch_size, seed=train.seed, shuffle=run.shuffle,
        num_epochs=None if run.train.total_steps > 0 else run.num_epochs, rows=batch_rows(mesh, run.batch_size),
    )
    metrics_path = os.path.join(run.out, "metrics.jsonl")
    start = 0
    if resume and latest is not None:
        restored = ckpt.restore_latest_good(abstract_train_state(model, train, mesh))
        if not allow_changed_settings:  # else (sft --resume-changed) the user asked for a continuation
            check_resumed_settings(run.out, restored.extra.get("run"), dataclasses.asdict(run), key_prefix)
        state, start = restored.state, restored.step
        it.set_state(restored.data_state)
        _truncate_metrics(metrics_path, start)
        print(f"resumed from {ckpt.directory}/{start}", file=sys.stderr)
    else:
        state = init_train_state(model, train, mesh)
        _truncate_metrics(metrics_path, 0)
    # Written once the stored settings are known to match: it describes the checkpoints.
    write_json_atomic(os.path.join(run.out, "config.json"), {"kind": kind, "run": dataclasses.asdict(run), "model": dataclasses.asdict(config)})
    # Every example is known up front, so one compiled step skips the loss-free prompt prefix of all.
    step_fn = TrainStep(kind, train, state, mesh, batch_size=run.batch_size, loss_from=first_loss_position(examples, kind))
    extra = {"kind": kind, "run": dataclasses.asdict(run), "model": dataclasses.asdict(config)}

    bar = tqdm(total=steps, initial=start, desc=kind, unit="step", dynamic_ncols=True, file=sys.stderr, disable=not is_primary())
    # A resumed run hides the events its interrupted attempt wrote after the restored step.
    mlog = MetricLog(os.path.join(run.out, "tensorboard"), prefix=log_prefix or kind,
                     purge_step=start + 1 if start else None, wandb_run=wandb_run)
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
                    msg = str(e).replace("--set train.", f"--set {key_prefix}train.")
                    raise TrainingDiverged(f"{msg} Last good checkpoint: {where}.", step=e.step, metrics=e.metrics, state=e.state) from None
                dt = time.perf_counter() - t0
                n_tok, crc = _global_batch_stats(kind, batch, run.batch_size)
                rec = {"step": done, **m, "tokens": n_tok, "tokens_per_s": n_tok / dt, "step_time_s": dt, "batch_crc": crc}
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                mlog.log(rec, step=done)
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
        mlog.close()
        ckpt.close()
    if run.export and int(state.step) == steps:
        save_hf(config, state.model, os.path.join(run.out, "model"))
    return state


# ------------------------------------------------------------------------------------------ DPO


def _mesh_of(model: Any) -> Any:
    shard = getattr(model, "shard", None)
    return shard.mesh if shard is not None else None


def reference_pairs(model: Any, tokenizer: Any, pairs_jsonl: str, run: DPORunConfig, mesh: Any, resume: bool,
                    key_prefix: str = "") -> list[dict]:
    """Tokenized DPO rows with reference log-probs (read back, taken from the pairs, or computed)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    build = lambda recs: build_dpo_examples(recs, tokenizer, max_len=run.max_len, max_prompt_len=run.max_prompt_len, pad_id=pad)
    ref_path = os.path.join(run.out, REF_FILE)
    check_data_file(pairs_jsonl)
    ref_settings = {"data_sha256": _sha256(pairs_jsonl), "max_len": run.max_len, "max_prompt_len": run.max_prompt_len,
                    "dtype": run.dtype}
    # Process 0 decides, so that every process of a multi-process run takes the same branch.
    if resume and broadcast_json(os.path.exists(ref_path) if is_primary() else None):
        meta_path = ref_path + ".settings.json"
        stored = broadcast_json(_read_json(meta_path) if is_primary() else None)
        if stored is not None and stored != ref_settings:
            diff = describe_differences({key_prefix.rstrip(".") or "run": stored},
                                        {key_prefix.rstrip(".") or "run": ref_settings})
            raise UsageError(f"{ref_path}: the reference log-probs were computed for other pairs or settings ({diff}); "
                             "start over with --restart (the loop: --restart-changed), or use a new --out")
        records, _ = read_jsonl(ref_path, kind="dpo", on_error="raise")
        return build(records)
    records, _ = read_jsonl(pairs_jsonl, kind="dpo")
    if not records:
        raise DataError(f"{pairs_jsonl}: no valid DPO pairs")
    rows = build(records)
    if all("ref_chosen_logp" in r for r in records):
        return rows
    rows = compute_reference_logps(model, rows, run.ref_batch_size, mesh=mesh, logits_chunk=run.train.logits_chunk)
    for rec, row in zip(records, rows):
        rec["ref_chosen_logp"] = float(row["ref_chosen_logp"])
        rec["ref_rejected_logp"] = float(row["ref_rejected_logp"])
    os.makedirs(run.out, exist_ok=True)
    write_json_atomic(ref_path + ".settings.json", ref_settings)  # what a resumed run checks (process 0 only)
    write_jsonl_atomic(ref_path, records)  # on process 0 only
    return rows


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_dpo(
    model: Any,
    config: Any,
    tokenizer: Any,
    pairs_jsonl: str,
    out_dir: str,
    train_cfg: TrainConfig | DPORunConfig,
    resume: bool = True,
    *,
    mesh: Any = None,
    wandb_run: Any = None,
    log_prefix: str = "dpo",
    key_prefix: str = "",
) -> Any:
    """Trains ``model`` (also the reference) on the pairs; returns the new model (M_{t+1}).

    ``train_cfg`` is a ``TrainConfig`` (other settings at ``DPORunConfig`` defaults) or a full
    ``DPORunConfig``. The mesh is the model's own when it was created on one, else ``mesh`` or
    ``run.mesh``. With ``resume`` an interrupted run in ``out_dir`` continues where it stopped;
    a finished one just returns its model. ``wandb_run`` / ``log_prefix``: see :func:`train_loop`.
    ``key_prefix`` (the loop's ``"dpo."``) prefixes the setting names in messages (a changed
    setting on resume, the divergence advice) so they are the keys the user sets.
    """
    run = train_cfg if isinstance(train_cfg, DPORunConfig) else DPORunConfig(train=train_cfg)
    run = dataclasses.replace(run, data=pairs_jsonl, out=out_dir)
    if mesh is None:
        mesh = _mesh_of(model)
    if mesh is None:
        mesh = resolve_mesh(run.mesh)
    check_out_dir(out_dir, resume)  # before the reference pass rewrites <out>/pairs_ref.jsonl
    examples = reference_pairs(model, tokenizer, pairs_jsonl, run, mesh, resume, key_prefix)
    state = train_loop("dpo", config=config, model=model, examples=examples, run=run, resume=resume, mesh=mesh,
                       wandb_run=wandb_run, log_prefix=log_prefix, key_prefix=key_prefix)
    return state.model
