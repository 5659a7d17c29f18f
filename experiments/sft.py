"""Supervised fine-tuning (the seed model M0 of METHODS.md: IFT + EFT data): the command.

    python -m experiments.sft --preset smollm2 --data train.jsonl --out runs/sft \\
        [--resume] [--set train.learning_rate=2e-5 --set batch_size=16 ...]

Writes ``<out>/config.json`` (the resolved config), ``<out>/metrics.jsonl`` (one line per step),
``<out>/checkpoints/<step>/`` (orbax) and, at the end, ``<out>/model/`` (Hugging Face format,
loadable with ``models.load_model``); the training itself is ``metajudge.trainer.train_loop``.
``--resume`` continues from the latest checkpoint with the same parameters, optimizer state, RNG and
data order as an uninterrupted run (a changed training setting is refused, naming it);
``--restart`` deletes what an earlier run left in ``--out`` and starts over. A run holds the lock of
``--out`` until it ends: a second run on the same directory stops at once, naming the first.

Presets (``--preset``):
  ``smollm2``  the embedded SmolLM2-135M-Instruct and its tokenizer (the default);
  ``tiny``     a random 2-layer, width-64 Llama with SmolLM2's tokenizer and vocabulary (tests,
               smoke runs: it learns nothing useful).
``--set model=SOURCE`` replaces the preset's weights by any ``models.load_model`` source (an
exported ``<out>/model``, a checkpoint directory, a hub id); ``--set tokenizer=SOURCE`` its tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Iterator, Optional, Sequence

import models
from experiments.cli import UsageError, apply_overrides, run_main
from metajudge.data import DataError, build_sft_examples, read_jsonl
from metajudge.trainer import RunConfig, check_data_file, check_out_dir, clear_run_outputs, resolve_mesh, train_loop
from models.distributed import is_primary
from models.files import DirLock
from models.sources import TINY_MODEL, load_model_and_tokenizer

PRESET_NAMES = ("smollm2", "tiny")


def load_preset(run: RunConfig, mesh: Any) -> tuple[Any, Any, Any]:
    """``(LlamaConfig, model, tokenizer)`` for ``run.preset`` (and its model/tokenizer overrides)."""
    if run.preset not in PRESET_NAMES:
        raise UsageError(f"unknown preset {run.preset!r}; known: {', '.join(PRESET_NAMES)}")
    source = run.model or (models.EMBEDDED_NAME if run.preset == "smollm2" else TINY_MODEL)
    config, model, tok = load_model_and_tokenizer(source, run.tokenizer or models.EMBEDDED_NAME, dtype=run.dtype,
                                                  mesh=mesh, seed=run.train.seed)
    if tok.vocab_size > config.vocab_size:
        raise UsageError(f"tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}")
    return config, model, tok


def train_sft(run: RunConfig, resume: bool = False, allow_changed_settings: bool = False) -> Any:
    """Reads ``run.data``, loads the preset, trains; returns the final ``TrainState``."""
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
    return train_loop("sft", config=config, model=model, examples=examples, run=run, resume=resume, mesh=mesh,
                      allow_changed_settings=allow_changed_settings)


def parse_args(prog: str, description: str, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--preset", default="smollm2", help=f"model preset: {', '.join(PRESET_NAMES)} (default smollm2)")
    ap.add_argument("--data", required=True, help="training data, JSONL")
    ap.add_argument("--out", required=True, help="output directory (checkpoints, metrics, config, model)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (with the "
                    "settings it was written with: a changed setting is an error naming it)")
    ap.add_argument("--resume-changed", action="store_true",
                    help="SFT: like --resume, but continue even when training settings changed (e.g. more steps)")
    ap.add_argument("--restart", action="store_true",
                    help="start over in --out: delete the checkpoints, metrics, reference log-probs and model an earlier "
                    "run left there (e.g. one that --resume refuses because its settings changed)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field by dotted name, e.g. train.learning_rate=2e-5 (repeatable)")
    args = ap.parse_args(argv)
    if args.restart and (args.resume or args.resume_changed):
        ap.error("--restart starts over; it cannot be combined with --resume or --resume-changed")
    return args


@contextlib.contextmanager
def run_directory(out: str, restart: bool) -> Iterator[None]:
    """Holds the lock of ``out`` (``models.files.DirLock``, process 0) for a command's whole run,
    so that a second run on the same directory stops at once naming the holder; with ``restart``,
    first deletes what an earlier run wrote there (``metajudge.trainer.clear_run_outputs``)."""
    if not out:
        raise UsageError("no output directory: pass --out DIR")
    lock = DirLock(out)
    if is_primary():
        os.makedirs(out, exist_ok=True)
        lock.acquire()
    try:
        if restart:
            gone = clear_run_outputs(out)
            if gone:
                print(f"{out}: --restart deleted {', '.join(gone)}", file=sys.stderr)
        yield
    finally:
        lock.release()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args("python -m experiments.sft", "Supervised fine-tuning (the seed model).", argv)
    run = apply_overrides(RunConfig(preset=args.preset, data=args.data, out=args.out), args.set)
    if run.preset not in PRESET_NAMES:
        raise UsageError(f"unknown preset {run.preset!r}; known: {', '.join(PRESET_NAMES)}")
    check_data_file(run.data)  # before --out is created or touched
    with run_directory(run.out, args.restart):
        state = train_sft(run, resume=args.resume or args.resume_changed, allow_changed_settings=args.resume_changed)
    print(f"sft: {int(state.step)} steps; outputs in {run.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
