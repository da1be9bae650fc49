"""Component attributions (heads, neurons, positions, SAE latents), latent alignment and unexpected
reliance, and the faithfulness of head rankings (deletion curves)."""

import numpy as np
import torch
import torch.nn.functional as F
from conftest import random_pixels

from clip_lens.lens import joint_space_directions
from clip_lens.sae import TopKSAE
from clip_lens.studies.analyses import component_attribution as attribution


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


# ---------------------------------------------------------------------------------------------
# component attributions against gradients taken by hand
# ---------------------------------------------------------------------------------------------
def activation_and_grad(tower, inputs, name, other, model):
    """The activation at `name` and dS/d(activation), by autograd on one plain forward pass."""
    kept = {}

    def keep(act, hook):
        act.retain_grad()
        kept["act"] = act
        return act

    emb = tower.run_with_hooks(inputs, fwd_hooks=[(name, keep)])
    score = model.logit_scale.exp() * F.cosine_similarity(emb, other, dim=-1)
    score.sum().backward()
    act, grad = kept["act"].detach(), kept["act"].grad.detach()
    tower.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    return act, grad


def test_latent_attributions_equal_code_times_decoder_gradient(vit_b32):
    _, model = vit_b32
    pixels = random_pixels(2, seed=63)
    tokens = model.to_tokens(["a photo of a cat", "There are no dogs in the park."])
    text = model.encode_text(tokens).detach()
    image = model.encode_image(pixels).detach()
    vision_sae = TopKSAE(768, 48, 6, seed=3).eval()
    text_sae = TopKSAE(512, 48, 6, seed=4).eval()

    got = attribution.latent_attributions(model, vision_sae, "vision.blocks.11.hook_resid_post", pixels, text)
    act, grad = activation_and_grad(model.vision, pixels, "blocks.11.hook_resid_post", text, model)
    with torch.no_grad():
        expected = vision_sae.encode(act[:, 0]) * (grad[:, 0] @ vision_sae.W_dec.T)   # class token
    assert got.shape == (2, 48) and (expected != 0).sum() >= 12
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    got = attribution.latent_attributions(model, text_sae, "blocks.8.hook_mlp_out", tokens, image)
    act, grad = activation_and_grad(model.text, tokens, "blocks.8.hook_mlp_out", image, model)
    eot = tokens.argmax(-1)
    rows = torch.arange(2)
    with torch.no_grad():
        expected = text_sae.encode(act[rows, eot]) * (grad[rows, eot] @ text_sae.W_dec.T)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_neuron_and_position_attributions_equal_activation_times_gradient(vit_b32):
    _, model = vit_b32
    tokens = model.to_tokens(["a photo of a cat", "There are no dogs in the park."])
    image = model.encode_image(random_pixels(2, seed=64)).detach()
    neurons = attribution.neuron_attributions(model, tokens, image, layers=[2, 9])
    positions = attribution.position_attributions(model, tokens, image)
    assert neurons.shape == (2, 2, 2048) and positions.shape == (2, 1, tokens.shape[1])
    lengths = tokens.argmax(-1) + 1
    valid = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).float()
    for li, layer in enumerate([2, 9]):
        act, grad = activation_and_grad(model.text, tokens, f"blocks.{layer}.mlp.hook_post", image, model)
        expected = (act * grad * valid[..., None]).sum(1)                  # every position up to EOT
        torch.testing.assert_close(neurons[:, li], expected, atol=1e-5, rtol=1e-4)
    act, grad = activation_and_grad(model.text, tokens, "blocks.0.hook_resid_pre", image, model)
    expected = (act * grad).sum(-1)
    expected[valid == 0] = float("nan")
    torch.testing.assert_close(positions[:, 0], expected, atol=1e-5, rtol=1e-4, equal_nan=True)
    top = attribution.components_frame(neurons, "neuron", top=5)
    assert len(top) == 5 and top["mean_attribution"].abs().is_monotonic_decreasing


def test_alignment_finds_a_latent_built_to_mean_a_concept(vit_b32):
    """A decoder row solved so that its joint-space image is the text embedding of "a photo of a
    cat." aligns with that concept with cosine 1, and more than with any other concept."""
    _, model = vit_b32
    concepts = ["cat", "dog", "car"]
    sae = TopKSAE(768, 8, 2, seed=5).eval()
    with torch.no_grad():
        target = model.encode_text(model.to_tokens(["a photo of a cat."]))[0]
        linear = joint_space_directions(model.vision, torch.eye(768))            # [768, d_embed]: row i = image of e_i
        row = torch.linalg.lstsq(linear.T, target[:, None]).solution[:, 0]
        sae.W_dec[3] = row
    alignment = attribution.latent_alignment(model, sae, "vision", concepts)
    assert alignment.shape == (8, 3)
    assert abs(float(alignment[3, 0]) - 1) < 1e-4
    assert float(alignment[3, 0]) > float(alignment[3, 1:].max())


def test_unexpected_reliance_flags_relied_on_latents_that_mean_another_class():
    """Hand-built: cats rely on latent 0 (a cat latent) and latent 2 (a car latent); dogs on latent 1
    (a dog latent). Only (cat, latent 2) is unexpected."""
    alignment = torch.tensor([[0.9, 0.1, 0.0],    # latent 0: cat
                              [0.1, 0.8, 0.0],    # latent 1: dog
                              [0.0, 0.1, 0.7],    # latent 2: car
                              [0.2, 0.2, 0.2]])   # latent 3: nothing in particular
    attributions = torch.tensor([[2.0, 0.0, 1.0, -1.0],
                                 [1.0, 0.0, 3.0, -1.0],
                                 [0.0, 2.0, 0.0, -1.0]])
    table = attribution.unexpected_reliance(attributions, ["cat", "cat", "dog"], alignment, ["cat", "dog", "car"], top=3)
    assert table[["class", "latent"]].values.tolist() == [["cat", 2], ["cat", 0], ["dog", 1]]  # positive reliance only
    flagged = table[table["unexpected"]]
    assert flagged[["class", "latent", "best_concept"]].values.tolist() == [["cat", 2, "car"]]
    assert table.set_index("latent").loc[0, "alignment_percentile"] == 0.75


def test_attribution_patching_differentiates_with_respect_to_activations_only(tiny_model):
    """No weight gets a gradient (none is computed), and frozen weights give the same estimates."""
    import copy

    import clip_lens

    model = copy.deepcopy(tiny_model)
    texts, sources = ["there is a red circle", "a blue square"], ["there is no red circle", "no blue square"]
    kwargs = dict(target=texts, source=sources, image=torch.zeros(1, 64) + 0.1, layers=[0, 2, 3], method="attribution",
                  progress=False)
    result = clip_lens.patch(model, **kwargs)
    assert all(param.grad is None for param in model.parameters())
    model.requires_grad_(False)
    frozen = clip_lens.patch(model, **kwargs)
    torch.testing.assert_close(frozen.effects, result.effects, equal_nan=True, atol=0, rtol=0)
    assert torch.isfinite(result.contributions[:, :, 1]).all()
