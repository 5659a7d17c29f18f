"""The Colab quick start notebook, executed headless on CPU with the `tiny` preset."""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_quickstart.ipynb")


def test_quickstart_runs_one_iteration_and_shows_the_table_and_plots(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    out = tmp_path / "quickstart"
    params[0].source = f'PRESET = "tiny"\nOUT = {str(out)!r}\nREPO_URL = ""'
    # A CPU runtime sees one device (the test session's 8 fake ones are for the sharding tests).
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute(env=env)

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "backend: cpu" in text and "preset: tiny" in text and "preference pairs" in text
    shown = [o.data for o in outputs if o.output_type == "display_data"]
    assert any("| iter |" in d.get("text/markdown", "") for d in shown)  # the report's table
    assert any("image/png" in d for d in shown)  # the plots
    assert (out / "iter_1" / "dpo" / "model" / "config.json").exists()
