"""Head attributions and the faithfulness of their rankings (deletion curves)."""

import numpy as np
import torch

from conftest import random_pixels
from experiments import attribution


def test_attribution_ranking_deletes_the_score_faster_than_random(vit_b32):
    _, model = vit_b32
    pixels = random_pixels(2, seed=61)
    text = model.encode_text(model.to_tokens(["a photo of a cat"])).detach().expand(2, -1)
    result = attribution.faithfulness(model, pixels, text, ks=(0, 4, 16))
    areas = result.areas.set_index("method")["area"]
    assert areas["attribution patching"] < areas["random"]
    curves = result.curves
    assert (curves[curves["k"] == 0]["score"].nunique()) == 1            # every method starts from the clean score
    assert result.scores["attribution patching"].shape == (2, 12, 12)
    assert len(result.figure().data) == 3


def test_logit_lens_head_scores_sum_of_direct_effects_is_consistent(vit_b32):
    """Removing a head's pooled output changes S by its logit-lens score; a head whose W_O is zero has none."""
    _, model = vit_b32
    pixels = random_pixels(1, seed=62)
    text = model.encode_text(model.to_tokens(["a dog"])).detach()
    scores = attribution.logit_lens_scores(model, pixels, text)
    assert scores.shape == (1, 12, 12) and torch.isfinite(scores).all()
    with torch.no_grad():
        saved = model.vision.blocks[3].attn.out_weight.clone()
        try:
            model.vision.blocks[3].attn.out_weight[:, 5 * 64:6 * 64] = 0.0   # head 5 of layer 3 writes nothing
            zeroed = attribution.logit_lens_scores(model, pixels, text)
        finally:
            model.vision.blocks[3].attn.out_weight.copy_(saved)
    assert abs(float(zeroed[0, 3, 5])) < 1e-5 and np.isfinite(float(scores[0, 3, 5]))
