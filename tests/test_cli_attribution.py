"""`clip-lens attribution` end to end on a random-weight ViT-B-32: scikit-image's sample photos
(vision tower, SAE trained in the run), then generated images (text tower, a saved SAE loaded)."""

import re

import numpy as np
import pandas as pd
import pytest
from conftest import write_noise_images

from clip_lens.cli import main
from clip_lens.data.shapes import single_shape_set
from clip_lens.sae import load as load_sae
from clip_lens.sae import read_browser_data
from clip_lens.sae.evaluation import COLUMNS, evaluate_sae
from clip_lens.studies import attribution
from clip_lens.studies.options import OptionError


def test_attribution_demo_on_sample_photos(tmp_path, capsys):
    out = tmp_path / "attr"
    assert main(["attribution", "--out", str(out), "--limit", "6", "--ks", "0", "4", "16", "--sae-steps", "200",
                 "--sae-latents", "64", "--sae-k", "8", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "attribution patching" in printed and "logit lens" in printed
    instances = pd.read_csv(out / "instances.csv")
    assert len(instances) == 6 and instances["label"].tolist()[:2] == ["astronaut", "cat"]
    lens = pd.read_csv(out / "logit_lens.csv")
    last = lens[lens["layer"] == 12].set_index("instance")["score"]
    np.testing.assert_allclose(last.loc[[p.rsplit(".", 1)[0] for p in instances["image"]]].to_numpy(),
                               instances["score"].to_numpy(), atol=1e-4)           # Logit Lens at L is the score
    areas = pd.read_csv(out / "deletion_areas.csv").set_index("method")
    assert set(areas.index) == {"attribution patching", "logit lens", "random"}
    curves = pd.read_csv(out / "deletion_curves.csv")
    assert sorted(set(curves["k"])) == [0, 4, 16]
    heads = pd.read_csv(out / "head_attributions.csv")
    assert len(heads) == 6 * 12 * 12
    assert len(pd.read_csv(out / "top_neurons.csv")) == 20
    reliance = pd.read_csv(out / "reliance.csv")
    assert set(reliance["class"]) <= set(instances["label"]) and (reliance["mean_attribution"] > 0).all()
    assert (out / "sae.safetensors").is_file() and (out / "sae.json").is_file() and (out / "latents.html").is_file()
    report = (out / "report.html").read_text()
    for heading in ("Logit Lens", "Faithfulness: deletion curves", "Sparse-autoencoder latents"):
        assert heading in report
    assert report.count('class="plotly-graph-div"') == 5  # lens, heads, patch maps, deletion curves, reliance

    # text tower on a folder of generated images, with the SAE... of the wrong tower: a clear error
    write_noise_images(["a.png", "b.png"], tmp_path / "imgs" / "cat")
    write_noise_images(["c.png"], tmp_path / "imgs" / "dog")
    (tmp_path / "caps.txt").write_text("cat\ta photo of a cat\ndog\ta photo of a dog\n")
    folder = ["--images", str(tmp_path / "imgs"), "--captions", str(tmp_path / "caps.txt"), "--ks", "0", "2", "--quiet"]
    assert main(["attribution", *folder, "--tower", "text", "--sae", str(out / "sae"), "--out", str(tmp_path / "t")]) == 2
    assert "reads 768-dimensional activations" in capsys.readouterr().err
    assert main(["attribution", *folder, "--tower", "text", "--sae-steps", "50", "--sae-latents", "32", "--sae-k", "4",
                 "--out", str(tmp_path / "t")]) == 0
    tokens = pd.read_csv(tmp_path / "t" / "position_attributions.csv")
    assert tokens.groupby("instance").size().tolist() == [7, 7, 7]      # <sot> a photo of a cat|dog <eot>
    # and the text SAE saved there loads back into a second text run
    assert main(["attribution", *folder, "--tower", "text", "--sae", str(tmp_path / "t" / "sae"),
                 "--out", str(tmp_path / "t2")]) == 0
    assert not (tmp_path / "t2" / "sae.safetensors").exists()
    evaluation = pd.read_csv(tmp_path / "t2" / "sae_evaluation.csv").iloc[0]
    assert evaluation["hook"] == "text.blocks.11.hook_resid_post" and not evaluation["trained"]
    assert np.isfinite(evaluation["S_recovered"]) and evaluation["explained_variance"] <= 1


@pytest.mark.parametrize("bad, named", [(dict(tower="audio"), "tower='audio'"), (dict(ks=(0, 4, 2)), "ks="),
                                        (dict(ks=(0,)), "ks="), (dict(sae_latents=0), "sae_latents=0"),
                                        (dict(limit=-1), "limit=-1"), (dict(concept_template="a photo"), "concept_template")])
def test_attribution_options_refuse_bad_values_by_name(bad, named):
    with pytest.raises(OptionError, match=named):
        attribution.Options(**bad)
    defaults = attribution.Options()
    assert (defaults.sae_latents, defaults.sae_k, defaults.sae_steps) == (256, 16, 1500)


# --- on the tiny CLIP: the SAE evaluation table and the latent browser the report links to ----------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The output folder of `clip-lens attribution` on the tiny CLIP over one image of
    each colour x shape (12 classes), the SAE trained in the run."""
    root = tmp_path_factory.mktemp("tiny_attribution")
    images, captions = single_shape_set(root / "images", per_class=1)
    out = root / "out"
    assert main(["attribution", "--model", "clip_lens/tiny-shapes", "--images", str(images), "--captions", str(captions),
                 "--sae-latents", "32", "--sae-k", "4", "--sae-steps", "100", "--ks", "0", "2",
                 "--concept-template", "There is a {}.", "--map-images", "1", "--quiet", "--out", str(out)]) == 0
    return out


def test_sae_evaluation_is_evaluate_sae_on_the_runs_sae_and_images(tiny_run, tiny_model):
    out = tiny_run
    table = pd.read_csv(out / "sae_evaluation.csv")
    assert len(table) == 1 and not (out / "sae_statistics.csv").exists()
    row = table.iloc[0]
    assert row["explained_variance"] <= 1 and np.isfinite(row["S_recovered"]) and row["trained"]
    assert row["hook"] == "vision.blocks.2.hook_resid_post" and row["k"] == 4 and row["l0"] <= 4
    instances = pd.read_csv(out / "instances.csv")
    assert row["S_clean"] == pytest.approx(instances["score"].mean(), rel=1e-4)   # the captions are the prompts
    captions = list(dict.fromkeys(instances["caption"]))
    pixels = tiny_model.to_pixels([str(out.parent / "images" / name) for name in instances["image"]])
    direct = evaluate_sae(tiny_model, load_sae(out / "sae"), images=pixels, classes=captions, template="{}",
                          labels=[captions.index(c) for c in instances["caption"]]).iloc[0]
    numbers = [c for c in COLUMNS if c not in ("hook", "architecture")]
    np.testing.assert_allclose(row[numbers].astype(float), direct[numbers].astype(float), rtol=1e-5, atol=1e-6)


def test_report_shows_the_evaluation_and_links_each_flagged_latent_to_its_page(tiny_run):
    out = tiny_run
    report = (out / "report.html").read_text()
    assert "SAE evaluation on the study&#x27;s images" in report and "explained_variance" in report
    assert "How to read it" in report and "accuracy_recovered" in report
    reliance = pd.read_csv(out / "reliance.csv")
    assert (reliance["page"] == [f"latents.html#latent-{latent}" for latent in reliance["latent"]]).all()
    linked = {int(n) for n in re.findall(r'<a href="latents\.html#latent-(\d+)">\1</a>', report)}
    assert linked == set(reliance["latent"]) and set(reliance.loc[reliance["unexpected"], "latent"]) <= linked
    page = out / "latents.html"
    data = read_browser_data(page)
    assert data["hook"] == "vision.blocks.2.hook_resid_post" and data["n_inputs"] == 12
    html_page = page.read_text()
    for latent in linked:
        assert f'id="latent-{latent}"' in html_page
        relied = reliance[reliance["latent"] == latent]
        shown = {entry["class"] for entry in data["latents"][latent]["attributions"]}
        assert set(relied["class"]) <= shown                   # the classes it is relied on for, on its page
