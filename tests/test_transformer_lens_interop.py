"""Acceptance 3 of the hooked-CLIP issue: TransformerLens's own patching runs on `model.text`
and agrees with a hand-written hook loop."""

import torch
import torch.nn.functional as F
from conftest import random_pixels
from transformer_lens import patching


def test_get_act_patch_resid_pre_on_text_tower(vit_b32):
    _, model = vit_b32
    clean = model.to_tokens(["There are no giraffes."])
    corrupted = model.to_tokens(["There are some giraffes."])
    assert clean.shape == corrupted.shape
    with torch.no_grad():
        image = model.encode_image(random_pixels(1))

    def metric(text_embedding):
        return F.cosine_similarity(text_embedding, image).sum()

    with torch.no_grad():
        _, clean_cache = model.text.run_with_cache(clean)
        tl_result = patching.get_act_patch_resid_pre(model.text, corrupted, clean_cache, metric)

    n_layers, n_pos = model.text.cfg.n_layers, clean.shape[1]
    assert tl_result.shape == (n_layers, n_pos)
    by_hand = torch.zeros(n_layers, n_pos)
    for layer in range(n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        for pos in range(n_pos):
            def patch(resid, hook, pos=pos, name=name):
                resid = resid.clone()
                resid[:, pos] = clean_cache[name][:, pos]
                return resid

            with torch.no_grad():
                by_hand[layer, pos] = metric(model.text.run_with_hooks(corrupted, fwd_hooks=[(name, patch)]))
    torch.testing.assert_close(tl_result.cpu(), by_hand, atol=1e-6, rtol=0)
    # patching is not a no-op: the negator position moves the metric in early layers
    with torch.no_grad():
        base = metric(model.text(corrupted))
    assert (by_hand - base).abs().max() > 1e-4
