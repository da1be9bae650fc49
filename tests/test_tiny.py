"""The tiny CLIP that ships with clip_lens: it loads through the normal path, reaches the accuracy it
promises on held-out scenes, trains deterministically, and `clip-lens demo` shows its structure."""

import pandas as pd
import pytest
import torch

import clip_lens
from clip_lens import tiny
from clip_lens.cli import main


@pytest.fixture(scope="module")
def shipped():
    return clip_lens.HookedCLIP.from_pretrained(tiny.NAME)


def test_shipped_weights_are_small_and_load_by_name(shipped):
    assert tiny.WEIGHTS.stat().st_size < 10 * 2**20
    assert shipped.name == tiny.NAME and shipped.vision.cfg.image_size == (64, 64)
    # the same file through open_clip itself gives the same embeddings
    import open_clip

    oc = open_clip.create_model(tiny.register(), pretrained=str(tiny.WEIGHTS)).eval()
    tokens = shipped.to_tokens(["There is no red circle.", "There are some squares."])
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(shipped.encode_text(tokens), oc.encode_text(shipped.to_tokens(
            ["There is no red circle.", "There are some squares."], trim=False)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shipped.encode_image(pixels), oc.encode_image(pixels), atol=1e-5, rtol=1e-5)


def test_held_out_accuracy(shipped):
    accuracy = tiny.evaluate(shipped, n=1000)
    assert accuracy["accuracy"] >= 0.85
    assert accuracy["negation_in_caption"] >= 0.80 and accuracy["negation_in_foil"] >= 0.80


def test_training_is_deterministic(tmp_path):
    a, _ = tiny.train(steps=2, seed=3, batch_size=8, progress=False, out=tmp_path / "a.safetensors")
    b, _ = tiny.train(steps=2, seed=3, batch_size=8, progress=False)
    c, _ = tiny.train(steps=2, seed=4, batch_size=8, progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    reloaded = clip_lens.HookedCLIP.from_pretrained(tiny.register(), pretrained=tmp_path / "a.safetensors")
    assert reloaded.text.cfg.n_layers == a.transformer.layers


def test_demo_runs_offline_and_shows_structure(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--scenes", "200", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Held-out accuracy" in out
    report = (tmp_path / "report.html").read_text()
    assert "Held-out accuracy of clip_lens/tiny-shapes" in report and "Image ablation" in report
    loc = pd.read_csv(tmp_path / "causal_tracing_localisation.csv")
    n_layers = loc["layer"].max()
    middle = loc[(loc["segment"] == "correct") & loc["layer"].between(1, n_layers - 1)]
    assert (middle["localisation"] > 0.1).any()
    # attribution on one-shape scenes: the trained model's structure shows. Attribution patching's
    # top heads remove the score faster than random heads, and the SAE latent each class relies on
    # most means the class's colour (its best-aligned concept name shares the colour word).
    areas = pd.read_csv(tmp_path / "attribution" / "deletion_areas.csv").set_index("method")["area"]
    assert areas["attribution patching"] < areas["random"]
    reliance = pd.read_csv(tmp_path / "attribution" / "reliance.csv")
    top = reliance[reliance["rank"] == 1]
    assert len(top) == 12
    assert (top["class"].str.split().str[0] == top["best_concept"].str.split().str[0]).mean() >= 0.9
    # the report's latents link to their pages in the latent browser the demo writes beside it
    linked = set(reliance["latent"].astype(int))
    page = (tmp_path / "attribution" / "latents.html").read_text()
    assert all(f'id="latent-{latent}"' in page for latent in linked)
    assert 'href="latents.html#latent-' in (tmp_path / "attribution" / "report.html").read_text()
    # attention cancellation with the shipped captioner: the generated captions are mostly right at
    # baseline, and cancelling every block leaves every image one caption
    cancel = pd.read_csv(tmp_path / "attention_cancellation" / "predictions.csv")
    baseline = cancel[cancel["setting"] == "baseline"]
    assert (baseline["generated"] == "There is a " + baseline["label"] + ".").mean() >= 0.75
    assert cancel.loc[cancel["setting"] == "1-3", "generated"].nunique() == 1
    assert len(pd.read_csv(tmp_path / "attention_cancellation" / "captions_by_setting.csv")) == 5
    assert "generated captions' mean cosine" in out
    # the negation circuit of the text tower: a small circuit carries the difference, random ones do not
    circuit = pd.read_csv(tmp_path / "circuit" / "summary.csv").iloc[0]
    assert circuit["reached_threshold"] and circuit["circuit_edges"] <= 60
    assert circuit["circuit_faithfulness"] >= 0.8 and circuit["random_faithfulness"] < 0.3
    assert "negation circuit in the text tower" in out


@pytest.mark.slow
def test_retraining_with_the_documented_command_reproduces_the_shipped_weights(tmp_path, capsys):
    """About 10 minutes on 2 cores: `clip-lens train-tiny --seed 0 --steps 2400` as docs/tiny_shapes.md says."""
    from safetensors.torch import load_file

    out = tmp_path / "tiny.safetensors"
    assert main(["train-tiny", "--seed", "0", "--steps", "2400", "--out", str(out), "--quiet"]) == 0
    retrained, shipped = load_file(str(out)), load_file(str(tiny.WEIGHTS))
    assert retrained.keys() == shipped.keys() and all(torch.equal(retrained[k], shipped[k]) for k in shipped)
