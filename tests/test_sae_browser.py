"""The latent browser (clip_lens.sae.browser): on the tiny CLIP, a planted SAE whose latents separate
red, green and blue scenes shows each colour's scenes as its latent's top images (read back from
the page's data); a text-tower SAE highlights every token; the page is self-contained."""

from __future__ import annotations

import argparse
import random
import re

import pandas as pd
import pytest
import torch

from clip_lens.data.shapes import Scene, Shape, render
from clip_lens.sae import StandardSAE, cache_activations
from clip_lens.sae.alignment import latent_alignment
from clip_lens.sae.browser import browser_data, read_browser_data, write_browser

HOOK = "vision.blocks.2.hook_resid_post"
COLOURS = ("red", "green", "blue")
PER_COLOUR = 4


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Image paths of one-shape scenes, PER_COLOUR of each colour, named by colour."""
    folder = tmp_path_factory.mktemp("scenes")
    rng, paths = random.Random(0), []
    for colour in COLOURS:
        for i in range(PER_COLOUR):
            r = rng.randint(9, 14)
            shape = Shape(rng.choice(("circle", "square", "triangle")), colour, rng.randint(r + 1, 62 - r),
                          rng.randint(r + 1, 62 - r), r)
            render(Scene((shape,)), rng).save(folder / f"{colour}_{i}.png")
            paths.append(folder / f"{colour}_{i}.png")
    return paths


def planted_sae(model, paths) -> StandardSAE:
    """Latent c reads and writes the direction of colour c's mean pooled activation minus the mean."""
    acts = cache_activations(model, HOOK, model.to_pixels(paths), position=0)                # [n, d]
    mean = acts.mean(0)
    directions = torch.stack([acts[i * PER_COLOUR:(i + 1) * PER_COLOUR].mean(0) - mean for i in range(len(COLOURS))])
    directions = directions / directions.norm(dim=-1, keepdim=True)
    sae = StandardSAE(acts.shape[1], len(COLOURS), hook=HOOK)
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
        sae.b_dec.copy_(mean)
    return sae.eval()


@pytest.fixture(scope="module")
def page(tiny_model, scenes, tmp_path_factory):
    sae = planted_sae(tiny_model, scenes)
    attributions = pd.DataFrame({"instance": ["a", "b", "a", "b"], "label": ["red", "red", "red", "red"],
                                 "latent": [0, 0, 1, 1], "attribution": [0.4, 0.2, -0.3, 0.1]})
    data = browser_data(tiny_model, sae, scenes, top=PER_COLOUR, concepts=list(COLOURS), attributions=attributions,
                        progress=False)
    return sae, write_browser(data, tmp_path_factory.mktemp("page") / "latents.html")


def test_each_colour_latent_shows_scenes_of_its_colour(page):
    _, path = page
    data = read_browser_data(path)
    assert data["n_latents"] == 3 and data["hook"] == HOOK and data["tower"] == "vision"
    for colour, latent in zip(COLOURS, data["latents"]):
        names = [entry["name"] for entry in latent["top"]]
        assert len(names) == PER_COLOUR and all(name.startswith(colour + "_") for name in names), (colour, names)
        assert all(len(entry["map"]) == 8 and all(len(row) == 8 for row in entry["map"]) for entry in latent["top"])
        assert all(data["inputs"][str(entry["input"])]["image"].startswith("data:image/png;base64,")
                   for entry in latent["top"])
        fired = sum(latent["histogram"]["counts"])
        assert fired == round(latent["fire_rate"] * data["n_inputs"]) and fired >= PER_COLOUR


def test_concepts_are_the_shared_alignment_and_attributions_are_class_means(tiny_model, page):
    sae, path = page
    data = read_browser_data(path)
    cosines = latent_alignment(tiny_model, sae, "vision", list(COLOURS))
    for j, latent in enumerate(data["latents"]):
        best = latent["concepts"][0]
        assert best["cosine"] == pytest.approx(float(cosines[j].max()), abs=1e-4)
        assert best["concept"] == COLOURS[int(cosines[j].argmax())]
    # the mean over the class's two instances; latent 1's mean (-0.1) is not relied on
    assert data["latents"][0]["attributions"] == [{"class": "red", "attribution": pytest.approx(0.3)}]
    assert data["latents"][1]["attributions"] == []


def test_concepts_are_read_through_the_given_template(tiny_model, scenes, page):
    sae, _ = page
    template = "There is a {} circle."  # the tiny CLIP's own captions, not "a photo of a ..."
    data = browser_data(tiny_model, sae, scenes[:3], top=1, concepts=list(COLOURS), concept_template=template,
                        progress=False)
    cosines = latent_alignment(tiny_model, sae, "vision", list(COLOURS), template=template)
    default = latent_alignment(tiny_model, sae, "vision", list(COLOURS))
    assert not torch.allclose(cosines, default, atol=1e-3)
    for j, latent in enumerate(data["latents"]):
        assert latent["concepts"][0]["cosine"] == pytest.approx(float(cosines[j].max()), abs=1e-4)


def test_the_page_is_self_contained_searchable_and_anchored(page):
    _, path = page
    html = path.read_text()
    assert not [url for url in re.findall(r'(?:src|href)="([^"]*)"', html) if "http" in url or "//" in url]
    assert '<input id="search"' in html
    assert all(f'id="latent-{j}"' in html and f'href="#latent-{j}"' in html for j in range(3))
    assert not list(path.parent.glob("*.tmp"))


def test_text_tower_tokens_are_highlighted_each_with_its_activation(tiny_model, tmp_path):
    texts = ["There is a red circle.", "There is no blue square.", "a green triangle"]
    sae = StandardSAE(tiny_model.text.cfg.d_model, 6, seed=1, hook="text.blocks.1.hook_resid_post")
    data = read_browser_data(write_browser(browser_data(tiny_model, sae, texts, top=3, progress=False),
                                           tmp_path / "texts.html"))
    lengths = {text: len(tokens) for text, tokens in zip(texts, tiny_model.to_str_tokens(texts))}
    shown = [entry for latent in data["latents"] for entry in latent["top"]]
    assert shown, "no latent fires on any text"
    for entry in shown:
        tokens = data["inputs"][str(entry["input"])]["tokens"]
        assert len(entry["token_activations"]) == len(tokens) == lengths[entry["name"]]
        assert entry["token_activations"][-1] == pytest.approx(entry["activation"], abs=1e-4)  # EOT is pooled


def test_bad_arguments_are_refused_by_name(tiny_model, scenes, tmp_path):
    sae = StandardSAE(tiny_model.text.cfg.d_model, 4, hook="text.blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="text tower, but the inputs are vision"):
        browser_data(tiny_model, sae, scenes[:2], progress=False)
    with pytest.raises(ValueError, match="sae.hook is None"):
        browser_data(tiny_model, StandardSAE(4, 2), ["a"], progress=False)
    with pytest.raises(ValueError, match="lacks column"):
        browser_data(tiny_model, sae, ["a red circle"], attributions=pd.DataFrame({"latent": [0]}), progress=False)
    (tmp_path / "x.html").write_text("<html></html>")
    with pytest.raises(ValueError, match="no latent data"):
        read_browser_data(tmp_path / "x.html")


def test_browse_sae_command_writes_the_page_and_names_bad_paths(tiny_model, page, scenes, tmp_path, capsys):
    from clip_lens.cli import sae_browse

    parser = argparse.ArgumentParser()
    sae_browse.register(parser.add_subparsers(dest="command"))
    sae, _ = page
    sae.save(tmp_path / "sae")
    (tmp_path / "concepts.txt").write_text("red\ngreen\n\nblue\n")
    args = ["browse-sae", "--model", "clip_lens/tiny-shapes", "--sae", str(tmp_path / "sae"), "--images",
            str(scenes[0].parent), "--concepts", str(tmp_path / "concepts.txt"), "--top", "4", "--quiet"]
    out = tmp_path / "page.html"
    assert parser.parse_args(args + ["--out", str(out)]).func(parser.parse_args(args + ["--out", str(out)])) == 0
    data = read_browser_data(out)
    assert [c["concept"] for c in data["latents"][0]["concepts"]][:3] and data["n_inputs"] == len(scenes)
    assert all(e["name"].startswith("green_") for e in data["latents"][1]["top"])
    bad = parser.parse_args(["browse-sae", "--sae", str(tmp_path / "missing"), "--texts", str(tmp_path / "t.txt"),
                             "--out", str(out), "--model", "clip_lens/tiny-shapes"])
    with pytest.raises(FileNotFoundError, match="missing"):
        bad.func(bad)
