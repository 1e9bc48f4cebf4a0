"""The quickstart notebook runs top to bottom (small settings) and draws its plot."""

from __future__ import annotations

import os

import pytest

# installed by the test extra (CI); absent on the GPU machine, which only runs -m gpu
nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_executes(monkeypatch):
    monkeypatch.setenv("HSAE_NOTEBOOK_STEPS", "40")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot was drawn"
    text = "".join(o.get("text", "") for o in outputs)
    assert "TopK k=4" in text and "FVU@16" in text
