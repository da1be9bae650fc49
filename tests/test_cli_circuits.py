"""`clip-lens circuit` end to end: the tiny CLIP's text tower on held-out synthetic scenes, and
its vision tower on scikit-image's sample photos against their mean colours; bad options named."""

import numpy as np
import pandas as pd
import pytest

from clip_lens.cli import main


def test_text_circuit_on_synthetic_scenes(tmp_path, capsys):
    out = tmp_path / "circuit"
    assert main(["circuit", "text", "--model", "clip_lens/tiny-shapes", "--scenes", "12", "--sizes", "5", "50", "262",
                 "--random", "2", "--check", "10", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "against exact edge patching" in printed and "faithfulness" in printed
    edges = pd.read_csv(out / "edges.csv")
    assert len(edges) == 262 and {"eap", "eap-ig", "rank_eap", "rank_eap-ig"} <= set(edges.columns)
    assert sorted(edges["rank_eap"]) == list(range(1, 263))
    check = pd.read_csv(out / "exact_check.csv")
    assert 10 <= len(check) <= 20 and check["exact"].abs().max() > 0
    curve = pd.read_csv(out / "faithfulness.csv")
    assert set(curve["kind"]) == {"circuit", "random"} and len(curve) == 3 * (2 + 2)  # EAP, EAP-IG, 2 random
    assert set(curve["method"]) == {"eap", "eap-ig", "random"}
    full = curve[(curve["kind"] == "circuit") & (curve["size"] == 262)]["faithfulness"]
    np.testing.assert_allclose(full, 1.0, atol=1e-4)  # every edge kept: the clean model
    summary = pd.read_csv(out / "summary.csv").iloc[0]
    circuit = pd.read_csv(out / "circuit.csv")
    assert len(circuit) == summary["circuit_edges"] <= summary["circuit_size"]
    assert len(pd.read_csv(out / "pairs.csv")) == 12
    report = (out / "report.html").read_text()
    assert report.count('class="plotly-graph-div"') == 3  # circuit, faithfulness, estimates against exact
    for heading in ("The circuit", "Faithfulness", "EAP and EAP-IG against exact edge patching"):
        assert heading in report
    agreement = pd.read_csv(out / "agreement.csv")
    assert set(agreement["method"]) == {"eap", "eap-ig"} and np.isfinite(agreement["spearman"]).all()


def test_vision_circuit_on_sample_photos(tmp_path):
    out = tmp_path / "vision"
    assert main(["circuit", "vision", "--model", "clip_lens/tiny-shapes", "--limit", "3", "--sizes", "10", "262",
                 "--random", "1", "--check", "5", "--steps", "1", "--path", "activations", "--out", str(out),
                 "--quiet"]) == 0
    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) == 3 and (pairs["corrupt"] == "mean colour").all()
    assert pd.read_csv(out / "summary.csv").iloc[0]["tower"] == "vision"


@pytest.mark.parametrize("args, message", [
    (["--valse", "existence.json"], "--valse needs --images"),
    (["--steps", "0"], "--steps 0: EAP-IG needs m >= 1"),
])
def test_bad_options_are_named(tmp_path, capsys, args, message):
    assert main(["circuit", "text", "--model", "clip_lens/tiny-shapes", "--out", str(tmp_path / "x"), *args]) != 0
    assert message in capsys.readouterr().err
