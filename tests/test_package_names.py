"""The project's top-level packages must not shadow installed distributions.

transformers (>= 5.x) imports the PyPI package ``kernels``; a folder of that name at the project's
root (where ``python -m experiments...`` puts the working directory on ``sys.path``) would shadow it
and break every tokenizer load. The project's attention kernels live in ``attention_kernels/``.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _origin_from_repo_root(module: str) -> str:
    """Where ``module`` is found by a Python started in the project's root, as a user starts it."""
    code = f"import importlib.util as u; s = u.find_spec({module!r}); print(s.origin if s else '')"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def test_import_kernels_resolves_to_the_installed_distribution_not_a_project_folder():
    assert not (REPO / "kernels").exists() and not (REPO / "kernels.py").exists()
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the kernels distribution is not installed (transformers does not require it here)")
    origin = Path(_origin_from_repo_root("kernels")).resolve()
    assert REPO not in origin.parents or ".venv" in origin.parts, origin
    assert origin == Path(dist.locate_file("kernels/__init__.py")).resolve()


def test_project_packages_do_not_take_names_of_installed_distributions():
    ours = {p.name for p in REPO.iterdir() if p.is_dir() and any(p.glob("*.py")) and p.name != "tests"}
    assert ours == {"models", "attention_kernels", "metajudge", "experiments", "benchmarks"}
    installed = {d.metadata["Name"].lower().replace("-", "_") for d in importlib.metadata.distributions()}
    assert not ours & (installed - {"metajudge"}), sorted(ours & installed)
