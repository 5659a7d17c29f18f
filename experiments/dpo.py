"""One DPO iteration: M_{t+1} = DPO(M_t, pairs_t), with M_t as the reference (METHODS.md).

    python -m experiments.dpo --preset smollm2 --data pairs.jsonl --out runs/dpo1 \\
        [--resume] [--set model=runs/sft/model --set train.learning_rate=1e-6 ...]

The iterative loop calls :func:`run_dpo` with the model it holds. Reference log-probs are taken
from the pairs when they carry ``ref_chosen_logp`` / ``ref_rejected_logp`` (the sampler's scorer);
otherwise they are computed once with the incoming model before any update and stored with the
pairs in ``<out>/pairs_ref.jsonl``, which a resumed run reads back (the model has changed by then,
so recomputing them would give a different reference).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence

from experiments.cli import UsageError, apply_overrides, run_main
from experiments.sft import (
    PRESET_NAMES, RunConfig, check_data_file, check_out_dir, load_preset, parse_args, resolve_mesh, train_loop,
)
from metajudge.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class DPORunConfig(RunConfig):
    """A DPO run: ``RunConfig`` plus prompt truncation and the reference-scoring batch size."""

    batch_size: int = 16  # pairs per optimizer step
    pack: bool = False  # DPO rows are never packed (one sequence log-prob per row)
    max_prompt_len: Optional[int] = None  # default max_len // 2 (see metajudge.data.tokenize_dpo)
    ref_batch_size: int = 8
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # lr 1e-6, beta 0.1


REF_FILE = "pairs_ref.jsonl"


def _mesh_of(model: Any) -> Any:
    shard = getattr(model, "shard", None)
    return shard.mesh if shard is not None else None


def _write_jsonl(path: str, records: Sequence[dict]) -> None:
    from models.distributed import is_primary

    if not is_primary():  # one writer on multi-process runs
        return
    with open(path + ".tmp", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def reference_pairs(model: Any, tokenizer: Any, pairs_jsonl: str, run: DPORunConfig, mesh: Any, resume: bool) -> list[dict]:
    """Tokenized DPO rows with reference log-probs (read back, taken from the pairs, or computed)."""
    from metajudge.data import DataError, build_dpo_examples, read_jsonl
    from metajudge.train import compute_reference_logps
    from models.distributed import broadcast_json, is_primary

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    build = lambda recs: build_dpo_examples(recs, tokenizer, max_len=run.max_len, max_prompt_len=run.max_prompt_len, pad_id=pad)
    ref_path = os.path.join(run.out, REF_FILE)
    # Process 0 decides, so that every process of a multi-process run takes the same branch.
    if resume and broadcast_json(os.path.exists(ref_path) if is_primary() else None):
        records, _ = read_jsonl(ref_path, kind="dpo", on_error="raise")
        return build(records)
    check_data_file(pairs_jsonl)
    records, _ = read_jsonl(pairs_jsonl, kind="dpo")
    if not records:
        raise DataError(f"{pairs_jsonl}: no valid DPO pairs")
    rows = build(records)
    if all("ref_chosen_logp" in r for r in records):
        return rows
    rows = compute_reference_logps(model, rows, run.ref_batch_size, mesh=mesh)
    for rec, row in zip(records, rows):
        rec["ref_chosen_logp"] = float(row["ref_chosen_logp"])
        rec["ref_rejected_logp"] = float(row["ref_rejected_logp"])
    os.makedirs(run.out, exist_ok=True)
    _write_jsonl(ref_path, records)
    return rows


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
) -> Any:
    """Trains ``model`` (also the reference) on the pairs; returns the new model (M_{t+1}).

    ``train_cfg`` is a ``TrainConfig`` (other settings at ``DPORunConfig`` defaults) or a full
    ``DPORunConfig``. The mesh is the model's own when it was created on one, else ``mesh`` or
    ``run.mesh``. With ``resume`` an interrupted run in ``out_dir`` continues where it stopped;
    a finished one just returns its model.
    """
    run = train_cfg if isinstance(train_cfg, DPORunConfig) else DPORunConfig(train=train_cfg)
    run = dataclasses.replace(run, data=pairs_jsonl, out=out_dir)
    if mesh is None:
        mesh = _mesh_of(model)
    if mesh is None:
        mesh = resolve_mesh(run.mesh)
    check_out_dir(out_dir, resume)  # before the reference pass rewrites <out>/pairs_ref.jsonl
    examples = reference_pairs(model, tokenizer, pairs_jsonl, run, mesh, resume)
    state = train_loop("dpo", config=config, model=model, examples=examples, run=run, resume=resume, mesh=mesh)
    return state.model


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args("python -m experiments.dpo", "One DPO iteration on preference pairs.", argv)
    run = apply_overrides(DPORunConfig(preset=args.preset, data=args.data, out=args.out), args.set)
    if run.preset not in PRESET_NAMES:
        raise UsageError(f"unknown preset {run.preset!r}; known: {', '.join(PRESET_NAMES)}")
    check_out_dir(run.out, args.resume)
    if not (args.resume and os.path.exists(os.path.join(run.out, REF_FILE))):
        from metajudge.data import DataError, read_jsonl

        check_data_file(run.data)  # fail on the data before spending time on the model
        if not read_jsonl(run.data, kind="dpo")[0]:
            raise DataError(f"{run.data}: no valid DPO pairs")
    mesh = resolve_mesh(run.mesh)
    config, model, tok = load_preset(run, mesh)
    run_dpo(model, config, tok, run.data, run.out, run, resume=args.resume, mesh=mesh)
    print(f"dpo: outputs in {run.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
