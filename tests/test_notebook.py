"""The first-user notebook (experiments/notebooks/longheads.ipynb) runs top to bottom on the CPU
(a 2k-token prompt), executed by nbclient in a real Jupyter kernel."""
from __future__ import annotations

import os

import pytest

from conftest import default_model_path

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "experiments", "notebooks", "longheads.ipynb")

pytestmark = pytest.mark.slow


def test_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    default_model_path()  # the notebook loads the embedded model: skip (fail under CI) without it
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = ["".join(o.get("text", "") for o in c.get("outputs", [])) for c in nb.cells if c.cell_type == "code"]
    assert "llama 30 layers" in outputs[0]
    assert "LongHeads:" in outputs[2] and "sliding window:" in outputs[2]
    assert "pairs selected the needle's chunk" in outputs[4]
    figures = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert figures, "the selection picture was not drawn"
