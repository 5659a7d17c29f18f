"""Meta-Rewarding: `python -m experiments.meta_reward --preset NAME --out DIR [--set key=value ...]`.

The actor's pairs come from the judge's scores (with length control); in the iterations listed in
`judge_pair_iterations` the meta-judge's battles between judgments give the judge's pairs too.
`--set temporal=true` adds temporal anchoring to the actor pairs (Meta-Rewarding + Temporal).
A restarted command with the same --out resumes where the last one stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

from experiments.cli import apply_overrides, run_main
from experiments.loop import run_loop
from experiments.configs import get_preset


def parse_args(prog: str, doc: str, default_preset: str, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    ap.add_argument("--preset", default=default_preset, help="tiny, smollm2_cpu or llama3_8b_paper")
    ap.add_argument("--out", default=None, help="run directory (default: runs/<method>-<preset>)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting by dotted name, e.g. actor.n=7 or dpo.train.learning_rate=1e-6")
    ap.add_argument("--restart-changed", action="store_true",
                    help="redo from scratch every stage whose stored settings differ from the current ones (and the "
                         "stages after it) instead of stopping with an error that names the differing keys")
    return ap.parse_args(argv)


def cli(method: str, argv: Optional[Sequence[str]], doc: str, *, name: Optional[str] = None, temporal: bool = False) -> int:
    """The shared command line of the loop's entry points; ``name`` is the module (default: method)."""
    name = name or method
    args = parse_args(f"python -m experiments.{name}", doc, "smollm2_cpu", argv)
    cfg = apply_overrides(dataclasses.replace(get_preset(args.preset, method), temporal=temporal), args.set)
    out = args.out or os.path.join("runs", f"{name}-{args.preset}")
    result = run_loop(cfg, out, restart_changed=args.restart_changed)
    last = result["iterations"][-1] if result["iterations"] else {}
    print(f"\n{name}: {len(result['iterations'])} iteration(s) done; "
          f"last: {last.get('actor_pairs', 0)} actor pairs, {last.get('judge_pairs', 0)} judge pairs", file=sys.stderr)
    print(f"report: {os.path.join(out, 'report.md')} (plots: {os.path.join(out, 'metrics.png')})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli("meta_reward", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
