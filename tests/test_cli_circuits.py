"""`clip-lens circuit` end to end: the tiny CLIP's text tower on held-out synthetic scenes, and
its vision tower on scikit-image's sample photos against their mean colours; bad options named."""

import re

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
    (["--steps", "0"], "steps=0: give an integer >= 1"),
    (["--random", "-1"], "n_random=-1: give an integer >= 0"),
    (["--limit", "0"], "--limit 0: give a number of instances >= 1"),
])
def test_bad_options_are_named(tmp_path, capsys, args, message):
    assert main(["circuit", "text", "--model", "clip_lens/tiny-shapes", "--out", str(tmp_path / "x"), *args]) != 0
    assert message in capsys.readouterr().err


def _pairs_file(folder, rows, name="pairs.csv"):
    from clip_lens.data import shapes

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, example in enumerate(shapes.examples(3, seed=5)):
        shapes.image_of(example).save(images / f"{i}.png")
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_text_circuit_on_a_users_pairs_file(tmp_path):
    rows = {"caption": ["There is no red circle.", "There are no squares.", "There is no blue triangle.",
                        "There is no big circle."],
            "foil": ["There is a red circle.", "There are some squares.", "There is a blue triangle.",
                     "There is a circle."],
            "image": ["images/0.png", "images/1.png", "images/2.png", "images/0.png"]}
    path = _pairs_file(tmp_path, rows)
    out = tmp_path / "out"
    assert main(["circuit", "text", "--model", "clip_lens/tiny-shapes", "--pairs", str(path), "--sizes", "5", "262",
                 "--random", "1", "--check", "5", "--steps", "1", "--out", str(out), "--quiet"]) == 0
    assert pd.read_csv(out / "pairs.csv")["clean"].tolist() == rows["caption"][:3]
    excluded = pd.read_csv(out / "excluded.csv")  # the fourth pair's texts differ in length: listed, not dropped
    assert excluded["id"].tolist() == [4] and excluded["reason"].tolist() == ["unequal token lengths"]


@pytest.mark.parametrize("change, message", [
    ({"drop": "foil"}, "has no column 'foil'"),
    ({"drop": "image"}, "has no image column: a circuit's metric is S against each pair's image"),
    ({"set": (1, "foil", "There are no squares.")}, "row 2: caption and foil are the same text"),
    ({"set": (2, "image", "images/absent.png")}, "row 3: image 'images/absent.png' not found"),
])
def test_a_bad_pairs_file_is_named(tmp_path, capsys, change, message):
    rows = {"caption": ["There is no red circle.", "There are no squares.", "There is no blue triangle."],
            "foil": ["There is a red circle.", "There are some squares.", "There is a blue triangle."],
            "image": ["images/0.png", "images/1.png", "images/2.png"]}
    if "drop" in change:
        rows.pop(change["drop"])
    else:
        row, column, value = change["set"]
        rows[column][row] = value
    path = _pairs_file(tmp_path, rows)
    assert main(["circuit", "text", "--model", "clip_lens/tiny-shapes", "--pairs", str(path),
                 "--out", str(tmp_path / "out")]) != 0
    assert message in capsys.readouterr().err


def test_vision_circuit_against_a_users_corrupted_images(tmp_path, capsys):
    from clip_lens.data import shapes

    clean, corrupt = tmp_path / "clean", tmp_path / "corrupt"
    for folder in (clean, corrupt):
        folder.mkdir()
    examples = list(shapes.examples(4, seed=6))
    for i, example in enumerate(examples):
        shapes.image_of(example).save(clean / f"{i}.png")
        shapes.image_of(examples[(i + 1) % 4]).save(corrupt / f"{i}.png")
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"{i}\t{e.caption}\n" for i, e in enumerate(examples)))
    pd.DataFrame({"image": [f"{i}.png" for i in range(4)], "label": [str(i) for i in range(4)]}).to_csv(
        clean / "labels.csv", index=False)
    out = tmp_path / "out"
    args = ["circuit", "vision", "--model", "clip_lens/tiny-shapes", "--images", str(clean), "--captions", str(captions),
            "--sizes", "5", "--random", "1", "--check", "3", "--steps", "1", "--quiet"]
    assert main([*args, "--corrupt", str(corrupt), "--out", str(out)]) == 0
    assert pd.read_csv(out / "pairs.csv")["corrupt"].str.endswith(".png").all()
    (corrupt / "3.png").unlink()
    assert main([*args, "--corrupt", str(corrupt), "--out", str(tmp_path / "out2")]) != 0
    assert "no corrupted image '3.png'" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (dict(check=0), "check=0: give an integer >= 1"),
    (dict(path="outputs"), "path='outputs': give one of 'inputs', 'activations'"),
    (dict(sizes=()), "sizes=[]: give a list of at least 1 values"),
    (dict(selection="best"), "selection='best': give one of 'paths', 'greedy', 'top'"),
])
def test_circuit_options_refuse_a_bad_value_by_name(bad, message):
    from clip_lens.studies import OptionError, circuit

    with pytest.raises(OptionError, match=re.escape(message)):
        circuit.Options(**bad)
    assert circuit.Options().check == 50 and circuit.Options().n_random == 5  # the CLI's defaults, one per option
