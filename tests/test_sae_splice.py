"""SAEs spliced into the model (clip_lens.splicing): with the error term every output is the
unspliced model's; without it the reconstruction flows on; latents are hook points, and editing one
through its hook point equals `patch(sae=...)` on that latent."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_pixels

import clip_lens
from clip_lens.sae import TopKSAE

HOOK = "vision.blocks.1.hook_resid_post"
TEXT_HOOK = "text.blocks.1.hook_resid_pre"
TEXTS = ["a red circle above a blue square", "there is no green triangle here"]


@pytest.fixture()
def model(tiny_model):
    return copy.deepcopy(tiny_model)  # splicing changes the model: each test has its own copy


def _sae(hook, seed=0, k=16):
    sae = TopKSAE(64, 48, k=k, seed=seed, hook=hook)
    with torch.no_grad():
        sae.b_dec.add_(0.1 * torch.randn(64, generator=torch.Generator().manual_seed(seed)))
    return sae.eval()


def test_with_the_error_term_every_output_equals_the_unspliced_model(model):
    pixels, tokens = random_pixels(3, size=64, seed=1), model.to_tokens(TEXTS)
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(text=tokens, image=pixels)
        model.add_sae(_sae(HOOK), use_error_term=True)
        model.add_sae(_sae(TEXT_HOOK, seed=1), use_error_term=True)
        logits, cache = model.run_with_cache(text=tokens, image=pixels)
    torch.testing.assert_close(logits, clean_logits, atol=1e-6, rtol=0)
    for name in ("vision.blocks.2.hook_resid_post", "text.blocks.2.hook_resid_post", HOOK):
        torch.testing.assert_close(cache[name], clean[name], atol=1e-6, rtol=0)
    latents = cache[f"{HOOK}.hook_sae_acts_post"]
    assert latents.shape == (3, 65, 48) and ((latents > 0).sum(-1) <= 16).all()
    assert f"{TEXT_HOOK}.hook_sae_acts_post" in cache.cache_dict


def test_without_the_error_term_the_reconstruction_flows_on(model):
    pixels = random_pixels(2, size=64, seed=2)
    sae = _sae(HOOK)
    with torch.no_grad():
        _, clean = model.run_with_cache(image=pixels)
        expected = model.vision.run_with_hooks(pixels, fwd_hooks=[("blocks.1.hook_resid_post",
                                                                   lambda act, hook: sae(act)[0])])
        model.add_sae(sae)
        _, cache = model.run_with_cache(image=pixels)
    torch.testing.assert_close(cache[HOOK], sae(clean[HOOK])[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache["vision.hook_embedding"], expected, atol=1e-6, rtol=0)
    assert not torch.allclose(cache["vision.hook_embedding"], clean["vision.hook_embedding"], atol=1e-3)


def test_editing_a_latent_through_its_hook_point_equals_patch_with_the_sae(tiny_model, model):
    """Zeroing latent j at one position through hook_sae_acts_post (error term kept) is patch's
    intervention="zero" on latent j there: a - c_j W_dec[j]."""
    pixels = random_pixels(2, size=64, seed=3)
    text = tiny_model.encode_text(tiny_model.to_tokens(["a red circle"])).detach()
    sae = _sae(HOOK, k=48)                      # every latent active somewhere
    position = 0                                # the class token: what the embedding reads
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(image=pixels, names_filter=HOOK)
        codes = sae.encode(cache[HOOK][:, position]).sum(0)
    latents = codes.topk(3).indices.tolist()    # the latents with the largest codes there
    result = clip_lens.patch(tiny_model, target=pixels, text=text, hook="resid", layers=[2], positions=[position],
                             sae=sae, latents=latents, intervention="zero", progress=False)
    model.add_sae(sae, use_error_term=True)
    for li, latent in enumerate(latents):
        def zero(acts, hook, latent=latent):
            acts = acts.clone()
            acts[:, position, latent] = 0.0
            return acts

        with torch.no_grad():
            emb = model.vision.run_with_hooks(pixels, fwd_hooks=[("blocks.1.hook_resid_post.hook_sae_acts_post", zero)])
        score = model.logit_scale.exp() * F.cosine_similarity(emb, text, dim=-1)
        torch.testing.assert_close(result.effects[:, 0, 0, li], score.detach(), atol=1e-5, rtol=0)
    assert not torch.allclose(result.effects[:, 0, 0, :], result.baseline[:, None], atol=1e-4)


def test_removal_restores_the_hook_points_and_bad_splices_are_refused(model):
    pixels = random_pixels(1, size=64, seed=4)
    with torch.no_grad():
        before = model.encode_image(pixels)
        model.add_sae(_sae(HOOK))
        with pytest.raises(ValueError, match="already has an SAE spliced in"):
            model.add_sae(_sae(HOOK))
        with pytest.raises(ValueError, match="has an SAE spliced in at blocks.1.hook_resid_post"):
            clip_lens.patch(model, target=pixels, text=torch.zeros(1, 64), progress=False)
        model.remove_saes()
        torch.testing.assert_close(model.encode_image(pixels), before, atol=0, rtol=0)
    assert f"{HOOK}.hook_sae_acts_post" not in model.hook_dict and HOOK in model.hook_dict
    with pytest.raises(ValueError, match="no SAE is spliced at"):
        model.remove_saes(HOOK)
    with pytest.raises(ValueError, match="give the tower prefix"):
        model.add_sae(_sae("blocks.1.hook_resid_post"))
    with pytest.raises(ValueError, match="reads 64-dimensional activations; vision.blocks.1.mlp.hook_post is 256 wide"):
        model.add_sae(_sae(HOOK), hook="vision.blocks.1.mlp.hook_post")
    with pytest.raises(ValueError, match="one vector per head"):
        model.add_sae(_sae(HOOK), hook="vision.blocks.1.attn.hook_z")
