"""Temporal Self-Rewarding: `python -m experiments.temporal_self_reward --preset NAME --out DIR [--set ...]`.

Self-Rewarding whose actor pairs are anchored in time (METHODS.md): the rejected response is the
initial model M_0's worst when M_t scores it below its own worst, and the chosen response is the
best of a temporary future model M_f = DPO(M_t, anchored pairs) when M_t scores it higher than
its own best. M_f only samples and is then deleted. The same resumable stages as the loop, plus
`iter_<t>/initial/` and `iter_<t>/future/`. Meta-Rewarding with temporal anchoring is
`python -m experiments.meta_reward --set temporal=true`.
"""

from __future__ import annotations

from typing import Optional, Sequence

from experiments.cli import run_main
from experiments.meta_reward import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli("self_reward", argv, __doc__, name="temporal_self_reward", temporal=True)


if __name__ == "__main__":
    run_main(main)
