"""Runs an entry point that SIGKILLs itself right after a given file is written: a crash at an exact
point, for the kill-and-resume tests (polling the run directory from outside races with stages
that finish in milliseconds).

    python -m tests.experiments.crash SUFFIX MODULE [ARGS ...]

The process kills itself as soon as a path ending in ``SUFFIX`` is put in place (``os.replace``,
what every atomic write of the project ends with) or, on a process that does not write (process
1 of a multi-process run), as soon as the stage-shard write that it skips has that path. Nothing
after that point runs: no manifest, no later shard, no clean-up.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def crash_command(cmd: list[str], suffix: str) -> list[str]:
    """``cmd`` (``[python, "-m", MODULE, ARGS...]``) run under this module, dying after ``suffix``."""
    assert cmd[1] == "-m", cmd
    return [cmd[0], "-m", "tests.experiments.crash", suffix, *cmd[2:]]


def _die_if(path: object, suffix: str) -> None:
    if os.fspath(path).endswith(suffix):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    suffix, module, *args = sys.argv[1:]
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        _die_if(dst, suffix)

    os.replace = replace

    from metajudge import stages

    def wrap(write):
        def patched(path, *a, **kw):
            write(path, *a, **kw)
            _die_if(path, suffix)

        return patched

    stages.write_json_atomic = wrap(stages.write_json_atomic)
    stages.write_jsonl_atomic = wrap(stages.write_jsonl_atomic)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
