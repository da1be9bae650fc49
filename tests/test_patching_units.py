"""Single components inside one activation: MLP neurons (hook="mlp_post") and sparse-autoencoder
latents (sae=...). Exact patches equal a hand-written hook loop; attribution patching equals exact
patching where the metric is linear in the component."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_pixels

import clip_lens
from clip_lens.sae import TopKSAE

TEXTS = ["There is a cat on the mat.", "There are some giraffes."]
SOURCES = ["There is a dog on the mat.", "There are some zebras."]
TOL = 1e-5


@pytest.fixture(scope="module")
def setup(vit_b32, vit_b32_image):
    return vit_b32[1], vit_b32_image[1]


def score(model, emb, other):
    return (model.logit_scale.exp() * F.cosine_similarity(emb, other, dim=-1)).detach()


def run_edited(tower, inputs, name, edit):
    with torch.no_grad():
        return tower.run_with_hooks(inputs, fwd_hooks=[(name, lambda act, hook: edit(act.clone()))])


def test_neuron_patches_equal_hook_loop(setup):
    model, image_emb = setup
    tokens, sources = model.to_tokens(TEXTS), model.to_tokens(SOURCES)
    neurons, layers = [3, 1000, 2047], [0, 7, 11]
    for intervention in ("zero", "patch"):
        res = clip_lens.patch(model, target=tokens, source=sources if intervention == "patch" else None, image=image_emb,
                              hook="mlp_post", layers=layers, neurons=neurons, intervention=intervention, progress=False)
        assert res.dims == ("pair", "layer", "position", "neuron") and res.neurons == neurons
        _, src_cache = model.text.run_with_cache(sources)
        checked = 0
        for i in range(len(TEXTS)):
            length = int(tokens[i].argmax()) + 1
            for li, layer in enumerate(layers):
                name = f"blocks.{layer}.mlp.hook_post"
                for q in range(0, length, 3):
                    for ni, neuron in enumerate(neurons):
                        value = 0.0 if intervention == "zero" else src_cache[name][i, q, neuron]

                        def edit(act, q=q, neuron=neuron, value=value):
                            act[0, q, neuron] = value
                            return act

                        expected = score(model, run_edited(model.text, tokens[i:i + 1, :length], name, edit), image_emb)
                        assert abs(float(res.effects[i, li, q, ni]) - float(expected)) < TOL, (intervention, i, layer, q, neuron)
                        checked += 1
        assert checked > 40
    frame = res.to_frame()
    assert "neuron" in frame.columns and set(frame["neuron"]) == set(neurons)


@pytest.fixture(scope="module")
def text_sae():
    return TopKSAE(d_in=512, n_latents=64, k=8, seed=0).eval()


def test_sae_latent_patches_equal_hook_loop(setup, text_sae):
    """Zeroing latent j writes a - c_j W_dec[j] (reconstruction error kept); patching writes
    a + (c_source_j - c_j) W_dec[j]. Latents whose code is unchanged return the clean score."""
    model, image_emb = setup
    tokens, sources = model.to_tokens(TEXTS), model.to_tokens(SOURCES)
    sae = text_sae
    layer, name = 6, "blocks.6.hook_resid_pre"
    for intervention in ("zero", "patch"):
        res = clip_lens.patch(model, target=tokens, source=sources if intervention == "patch" else None, image=image_emb,
                              hook="resid", layers=[layer], positions="sequence", sae=sae, intervention=intervention,
                              progress=False)
        assert res.dims == ("pair", "layer", "latent") and res.effects.shape == (2, 1, 64)
        _, tgt_cache = model.text.run_with_cache(tokens)
        _, src_cache = model.text.run_with_cache(sources)
        for i in range(len(TEXTS)):
            length = int(tokens[i].argmax()) + 1
            codes = sae.encode(tgt_cache[name][i, :length]).detach()
            codes_rep = torch.zeros_like(codes) if intervention == "zero" else sae.encode(src_cache[name][i, :length]).detach()
            delta = codes_rep - codes                                        # [pos, latent]
            changed = (delta != 0).any(0).nonzero().flatten().tolist()
            assert len(changed) >= 8
            for j in changed[:6]:
                def edit(act, j=j):
                    act[0, :length] += delta[:, j, None] * sae.W_dec[j].detach()
                    return act

                expected = score(model, run_edited(model.text, tokens[i:i + 1, :length], name, edit), image_emb)
                assert abs(float(res.effects[i, 0, j]) - float(expected)) < TOL, (intervention, i, j)
            unchanged = [j for j in range(64) if j not in changed]
            assert torch.equal(res.effects[i, 0, unchanged], res.baseline[i].expand(len(unchanged)))


def test_attribution_equals_exact_for_neurons_and_latents_when_linear(setup, text_sae):
    """With ln_final's scale frozen and a metric linear in the embedding, the score is linear in the
    last block's neurons and in latents of the last residual, so the estimate is exact."""
    model, image_emb = setup
    tokens = model.to_tokens(TEXTS)
    direction = torch.randn(image_emb.shape[-1], generator=torch.Generator().manual_seed(0))

    def linear_metric(emb, other):
        return emb @ direction

    cases = [dict(hook="mlp_post", layers=[11], neurons=list(range(0, 2048, 97))),
             dict(hook="resid", layers=[12], sae=text_sae)]
    with model.text.hooks(fwd_hooks=[("ln_final.hook_scale", lambda s, hook: torch.full_like(s, 2.0))]):
        for case in cases:
            exact = clip_lens.patch(model, target=tokens, image=image_emb, intervention="zero", metric=linear_metric,
                                    progress=False, **case)
            approx = clip_lens.patch(model, target=tokens, image=image_emb, intervention="zero", metric=linear_metric,
                                     method="attribution", progress=False, **case)
            torch.testing.assert_close(approx.effects, exact.effects, atol=1e-4, rtol=0, equal_nan=True)
            assert (exact.effects - exact.baseline.view(-1, *[1] * (exact.effects.ndim - 1))).nan_to_num().abs().max() > 1e-3
    # with a non-linear metric (the score) the estimate is approximate but close for single neurons
    exact = clip_lens.patch(model, target=tokens, image=image_emb, intervention="zero", progress=False, **cases[0])
    approx = clip_lens.patch(model, target=tokens, image=image_emb, intervention="zero", method="attribution",
                             progress=False, **cases[0])
    gap = (approx.effects - exact.effects).nan_to_num().abs().max()
    assert 0 < gap < 0.05


def test_vision_neurons_and_latents_sequence(setup):
    """Vision tower, every position at once (the class-token shortcut in the last block)."""
    model, _ = setup
    text_emb = model.encode_text(model.to_tokens(["a photo of a cat"])).detach()
    images = random_pixels(2, seed=11)
    sae = TopKSAE(d_in=768, n_latents=32, k=4, seed=1).eval()
    res = clip_lens.patch(model, target=images, text=text_emb, hook="mlp_post", layers=[11], neurons=[5, 9],
                          positions="sequence", intervention="zero", progress=False)
    lat = clip_lens.patch(model, target=images, text=text_emb, hook="mlp_out", layers=[10], sae=sae, latents=[0, 1, 2, 3],
                          positions="sequence", intervention="zero", progress=False)
    _, cache = model.vision.run_with_cache(images)
    for i in range(2):
        for ni, neuron in enumerate([5, 9]):
            def edit(act, neuron=neuron):
                act[:, :, neuron] = 0.0
                return act
            expected = score(model, run_edited(model.vision, images[i:i + 1], "blocks.11.mlp.hook_post", edit), text_emb)
            assert abs(float(res.effects[i, 0, ni]) - float(expected)) < TOL
        codes = sae.encode(cache["blocks.10.hook_mlp_out"][i]).detach()
        for j in range(4):
            def edit(act, j=j):
                act[0] -= codes[:, j, None] * sae.W_dec[j].detach()
                return act
            expected = score(model, run_edited(model.vision, images[i:i + 1], "blocks.10.hook_mlp_out", edit), text_emb)
            assert abs(float(lat.effects[i, 0, j]) - float(expected)) < TOL


@pytest.mark.parametrize("kwargs,message", [
    (dict(hook="mlp_post", neurons=[2048]), r"neuron 2048 is out of range \(0..2047\)"),
    (dict(hook="z", sae=TopKSAE(512, 8, 2)), "sae= splits a resid/attn_out/mlp_out activation"),
    (dict(sae=TopKSAE(768, 8, 2)), "the SAE reads 768-dimensional activations but resid has d_model=512"),
    (dict(sae=TopKSAE(512, 8, 2), intervention="mean"), "a mean latent code is not defined"),
    (dict(sae=TopKSAE(512, 8, 2), latents=[8]), r"latent 8 is out of range \(0..7\)"),
    (dict(hook=["mlp_post", "mlp_out"]), "several hook kinds at once"),
])
def test_bad_unit_requests(setup, kwargs, message):
    model, image_emb = setup
    args = dict(target=TEXTS[:1], image=image_emb, intervention="zero", progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        clip_lens.patch(model, **args)


class _Stop(Exception):
    pass


def _stop(emb, other):
    raise _Stop  # abort at the first metric call: the warning comes before any work


def test_a_large_exact_grid_suggests_attribution_patching(setup):
    """5 tokens x 12 layers x 2048 neurons = 122,880 exact interventions per pair: a warning."""
    model, image_emb = setup
    with pytest.warns(UserWarning, match="122,880 exact interventions per pair"), pytest.raises(_Stop):
        clip_lens.patch(model, target=["a b c"], image=image_emb, hook="mlp_post", layers="all", intervention="zero",
                        metric=_stop, progress=False)


@pytest.mark.parametrize("hook,layers,intervention", [
    ("attn_out", [10, 11], "patch"), ("mlp_out", [11], "mean"), ("resid", [11, 12], "patch"), ("z", [11], "zero"),
    ("mlp_post", [11], "patch"),
])
def test_vision_positions_in_the_last_block_equal_hook_loop(setup, hook, layers, intervention):
    """The last block of the vision tower is cached at the class token only: single positions there
    (class token or a patch) and the residual after it still equal a full forward pass with a hook."""
    model, _ = setup
    text_emb = model.encode_text(model.to_tokens(["a photo of a dog"])).detach()
    images, sources = random_pixels(2, seed=13), random_pixels(2, seed=14)
    kwargs = dict(heads=[2]) if hook == "z" else dict(neurons=[7]) if hook == "mlp_post" else {}
    res = clip_lens.patch(model, target=images, source=sources if intervention == "patch" else None, text=text_emb,
                          hook=hook, layers=layers, positions=[0, 3], intervention=intervention, progress=False, **kwargs)
    names = {"attn_out": "blocks.{}.hook_attn_out", "mlp_out": "blocks.{}.hook_mlp_out", "z": "blocks.{}.attn.hook_z",
             "mlp_post": "blocks.{}.mlp.hook_post"}
    _, src_cache = model.vision.run_with_cache(sources)
    _, own_cache = model.vision.run_with_cache(images)
    for li, layer in enumerate(layers):
        name = (f"blocks.{layer}.hook_resid_pre" if layer < 12 else "blocks.11.hook_resid_post") if hook == "resid" \
            else names[hook].format(layer)
        mean = own_cache[name].flatten(0, 1).mean(0) if intervention == "mean" else None
        for i in range(2):
            for pi, pos in enumerate([0, 3]):
                def edit(act, i=i, pos=pos):
                    index = (0, pos) + ((2,) if hook == "z" else ())
                    if hook == "mlp_post":
                        index = (0, pos, 7)
                    value = {"patch": src_cache[name][(i,) + index[1:]], "zero": 0.0, "mean": mean}[intervention]
                    act[index] = value
                    return act
                expected = score(model, run_edited(model.vision, images[i:i + 1], name, edit), text_emb)
                got = res.effects[(i, li, pi) + ((0,) if hook in ("z", "mlp_post") else ())]
                assert abs(float(got) - float(expected)) < TOL, (hook, layer, i, pos)
