"""The SAE evaluation table (docs/methods.md#evaluating-an-sae) on known answers: an SAE that
reconstructs exactly recovers everything, one that reconstructs nothing recovers nothing, and the
clean scores are the model's own."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_lens.data import shapes
from clip_lens.sae import StandardSAE
from clip_lens.sae.evaluation import COLUMNS, evaluate_sae

COLOURS = list(shapes.COLOURS)


@pytest.fixture(scope="module")
def labelled(tiny_model):
    """Circles and squares of each colour, labelled by colour."""
    images, labels = [], []
    for i, colour in enumerate(COLOURS * 3):
        scene = shapes.Scene((shapes.Shape(shapes.SHAPES[i % 2], colour, 20 + 3 * i, 30, 10 + i % 4),))
        images.append(shapes.render(scene, random.Random(i)))
        labels.append(COLOURS.index(colour))
    return tiny_model.to_pixels(images), labels


def exact_sae(d: int, hook: str) -> StandardSAE:
    """ReLU(x) - ReLU(-x) = x: latents [x, -x] decoded by [I; -I] reconstruct every vector exactly."""
    sae = StandardSAE(d, 2 * d, hook=hook)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


@pytest.mark.parametrize("hook", ["vision.blocks.1.hook_resid_post", "text.blocks.0.hook_mlp_out"])
def test_an_exact_sae_recovers_everything(tiny_model, labelled, hook):
    images, labels = labelled
    table = evaluate_sae(tiny_model, exact_sae(64, hook), images=images, labels=labels, classes=COLOURS,
                         template="a {} shape.")
    row = table.iloc[0]
    assert list(table.columns) == COLUMNS and row["hook"] == hook and row["architecture"] == "standard"
    assert row["explained_variance"] == pytest.approx(1, abs=1e-6)
    assert row["S_recovered"] == pytest.approx(1, abs=1e-5) and row["S_reconstruction"] == pytest.approx(row["S_clean"], abs=1e-4)
    assert row["accuracy_reconstruction"] == row["accuracy_clean"]
    assert row["dense_fraction"] > 0 and row["l0"] <= 64 and row["l0"] > 32
    with torch.no_grad():
        scores = tiny_model.logit_scale.exp() * F.normalize(tiny_model.encode_image(images), dim=-1) @ \
            F.normalize(tiny_model.encode_text(tiny_model.to_tokens([f"a {c} shape." for c in COLOURS])), dim=-1).T
    assert row["S_clean"] == pytest.approx(float(scores[np.arange(len(labels)), labels].mean()), abs=1e-4)
    assert row["accuracy_clean"] == pytest.approx(float((scores.argmax(-1).numpy() == np.array(labels)).mean()))
    assert "hook_sae_acts_post" not in " ".join(tiny_model.hook_dict)           # spliced only while evaluating


def test_an_sae_that_reconstructs_nothing_recovers_nothing(tiny_model, labelled):
    images, labels = labelled
    sae = StandardSAE(64, 32, hook="vision.blocks.1.hook_resid_post")
    with torch.no_grad():
        for param in sae.parameters():
            param.zero_()
    row = evaluate_sae(tiny_model, sae.eval(), images=images, labels=labels, classes=COLOURS).iloc[0]
    assert row["S_recovered"] == pytest.approx(0, abs=1e-6) and row["dead_fraction"] == 1 and row["l0"] == 0
    assert row["explained_variance"] < 0                                       # worse than the mean vector
    assert row["vectors"] == len(labels) * 65


def test_bad_evaluation_inputs_are_named(tiny_model, labelled):
    images, labels = labelled
    sae = exact_sae(64, "blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="does not name a tower's hook point"):
        evaluate_sae(tiny_model, sae, images=images, labels=labels, classes=COLOURS)
    sae.hook = "vision.blocks.1.hook_resid_post"
    with pytest.raises(ValueError, match="label 7 is not an index into the 4 classes"):
        evaluate_sae(tiny_model, sae, images=images, labels=[7] * len(labels), classes=COLOURS)
    with pytest.raises(ValueError, match="3 labels for 12 images"):
        evaluate_sae(tiny_model, sae, images=images, labels=labels[:3], classes=COLOURS)
