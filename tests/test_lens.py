"""Logit Lens: at the last layer it is the model's own score; elsewhere, the final norm and
projection applied by hand to the cached residual."""

import torch
import torch.nn.functional as F
from conftest import random_pixels

from clip_lens.lens import logit_lens


def test_last_layer_is_the_models_score_and_earlier_layers_match_by_hand(vit_b32):
    _, model = vit_b32
    tokens = model.to_tokens(["There is no dog.", "a photo of a cat on a sofa"])
    pixels = random_pixels(2, seed=51)
    with torch.no_grad():
        image_emb, text_emb = model.encode_image(pixels), model.encode_text(tokens)
        own = model.logit_scale.exp() * F.cosine_similarity(text_emb, image_emb)
        text_lens = logit_lens(model, tokens, image_emb)
        vision_lens = logit_lens(model, pixels, text_emb)
        assert text_lens.shape == (2, 13) and vision_lens.shape == (2, 13)
        torch.testing.assert_close(text_lens[:, -1], own, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(vision_lens[:, -1], own, atol=1e-4, rtol=1e-5)
        _, cache = model.text.run_with_cache(tokens)
        resid = cache["blocks.5.hook_resid_pre"][torch.arange(2), tokens.argmax(-1)]
        by_hand = model.text.proj(model.text.ln_final(resid))
        expected = model.logit_scale.exp() * F.cosine_similarity(by_hand, image_emb)
        torch.testing.assert_close(logit_lens(model, tokens, image_emb, layers=[5])[:, 0], expected, atol=1e-4, rtol=1e-5)
