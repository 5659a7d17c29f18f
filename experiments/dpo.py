"""One DPO iteration: M_{t+1} = DPO(M_t, pairs_t), with M_t as the reference (METHODS.md): the command.

    python -m experiments.dpo --preset smollm2 --data pairs.jsonl --out runs/dpo1 \\
        [--resume | --restart] [--set model=runs/sft/model --set train.learning_rate=1e-6 ...]

The training is ``metajudge.trainer.run_dpo``, which the iterative loop also calls with the model it
holds; its reference log-probs are computed once, before any update, unless the pairs carry them,
and kept in ``<out>/pairs_ref.jsonl`` for a resumed run. ``--resume`` refuses checkpoints or reference
log-probs made with other settings or pairs, naming the keys; ``--restart`` deletes them and starts
over. The run holds the lock of ``--out`` until it ends.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from experiments.cli import UsageError, apply_overrides, run_main
from experiments.sft import PRESET_NAMES, load_preset, parse_args, run_directory
from metajudge.data import DataError, read_jsonl
from metajudge.trainer import REF_FILE, DPORunConfig, check_data_file, check_out_dir, resolve_mesh, run_dpo


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args("python -m experiments.dpo", "One DPO iteration on preference pairs.", argv)
    run = apply_overrides(DPORunConfig(preset=args.preset, data=args.data, out=args.out), args.set)
    if run.preset not in PRESET_NAMES:
        raise UsageError(f"unknown preset {run.preset!r}; known: {', '.join(PRESET_NAMES)}")
    if args.resume_changed:
        raise UsageError("--resume-changed is for SFT; a DPO run resumes with its own settings (--resume) or "
                         "starts over (--restart)")
    resumable = args.resume and os.path.exists(os.path.join(run.out, REF_FILE))
    if not resumable:
        check_data_file(run.data)  # fail on the data before spending time on the model
        if not read_jsonl(run.data, kind="dpo")[0]:
            raise DataError(f"{run.data}: no valid DPO pairs")
    with run_directory(run.out, args.restart):
        check_out_dir(run.out, args.resume)
        mesh = resolve_mesh(run.mesh)
        config, model, tok = load_preset(run, mesh)
        run_dpo(model, config, tok, run.data, run.out, run, resume=args.resume, mesh=mesh)
    print(f"dpo: outputs in {run.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
