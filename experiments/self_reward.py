"""Self-Rewarding: `python -m experiments.self_reward --preset NAME --out DIR [--set key=value ...]`.

The same stages as Meta-Rewarding without the meta-judge: actor pairs only. Length control is
the `rho` setting (`--set rho=0.0` is plain best-versus-worst, `--set rho=0.1,0.2` a schedule).
"""

from __future__ import annotations

from typing import Optional, Sequence

from experiments.cli import run_main
from experiments.meta_reward import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli("self_reward", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
