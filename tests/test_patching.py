"""Acceptance of the patching-engine issue: every intervention kind equals a one-at-a-time hook
loop, results do not depend on batch size, the causal-tracing invariants hold, attribution equals
exact patching where the metric is linear, and bad requests name the offending item."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_pixels

import clip_lens

NEG = ["There are no giraffes.", "There is no cat on the mat.", "There are no people in the picture."]
POS = ["There are some giraffes.", "There is a cat on the mat.", "There are some people in the picture."]
TOL = 1e-5


@pytest.fixture(scope="module")
def setup(vit_b32, vit_b32_image):
    return (vit_b32[1], *vit_b32_image)


def score(model, emb, other):
    return model.logit_scale.exp() * F.cosine_similarity(emb, other, dim=-1)


def hook_name(kind, layer, n_layers=12):
    if kind == "resid":
        return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"
    return {"attn_out": f"blocks.{layer}.hook_attn_out", "mlp_out": f"blocks.{layer}.hook_mlp_out",
            "z": f"blocks.{layer}.attn.hook_z"}[kind]


def reference(tower, inputs, other, kind, layer, pos, head, replacement, model):
    """One full forward pass of `tower` on `inputs` [1, ...] with one activation replaced."""
    def edit(act, hook):
        act = act.clone()
        index = (0, slice(None) if pos is None else pos)
        if head is not None:
            index = index + (head,)
        act[index] = replacement
        return act

    with torch.no_grad():
        emb = tower.run_with_hooks(inputs, fwd_hooks=[(hook_name(kind, layer), edit)])
    return float(score(model, emb, other).detach())


@pytest.mark.parametrize("kind,intervention", [
    ("resid", "patch"), ("attn_out", "patch"), ("mlp_out", "zero"), ("z", "patch"), ("resid", "mean"), ("attn_out", "zero"),
])
def test_text_interventions_equal_hook_loop(setup, kind, intervention):
    model, image, image_emb = setup
    tower = model.text
    targets = model.to_tokens(POS)
    sources = model.to_tokens(NEG)
    layers = [0, 4, 12] if kind == "resid" else [0, 5, 11]
    mean = torch.randn(len(layers), 512) * 0.1 if intervention == "mean" else None
    result = clip_lens.patch(model, target=POS, source=NEG if intervention in ("patch", "mean") else None, image=image,
                             hook=kind, layers=layers, intervention=intervention, mean=mean, progress=False,
                             **(dict(heads=[1, 6]) if kind == "z" else {}))
    with torch.no_grad():
        _, src_cache = tower.run_with_cache(sources)
        _, tgt_cache = tower.run_with_cache(targets)
    checked = 0
    for i in range(len(POS)):
        length = int(targets[i].argmax()) + 1
        for li, layer in enumerate(layers):
            for q in range(length):
                for hi, head in enumerate([1, 6] if kind == "z" else [None]):
                    act = src_cache[hook_name(kind, layer)][i, q]
                    if head is not None:
                        act = act[head]
                    rep = {"patch": act, "zero": torch.zeros_like(act),
                           "mean": mean[li] if mean is not None else None}[intervention]
                    expected = reference(tower, targets[i : i + 1, :length], image_emb, kind, layer, q, head, rep, model)
                    got = result.effects[(i, li, q) + ((hi,) if head is not None else ())]
                    assert abs(float(got) - expected) < TOL, (i, layer, q, head)
                    checked += 1
            assert torch.isnan(result.effects[i, li, length:]).all()
    assert checked > 50
    frame = result.to_frame()
    assert len(frame) == checked and {"pair", "layer", "position", "metric", "baseline"} <= set(frame.columns)


def test_vision_sequence_patch_equals_hook_loop(setup):
    """Image ablation's shape: attn_out / mlp_out at all positions from a constant-colour image."""
    model, _, _ = setup
    text_emb = model.encode_text(model.to_tokens(["There is a cat."])).detach()
    images = random_pixels(2, seed=9)
    flat = images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
    for kind in ("attn_out", "mlp_out"):
        result = clip_lens.patch(model, target=images, source=flat, text=text_emb, hook=kind, layers=[0, 6, 11],
                                 positions="sequence", progress=False)
        assert result.effects.shape == (2, 3) and result.dims == ("pair", "layer")
        _, src_cache = model.vision.run_with_cache(flat)
        for i in range(2):
            for li, layer in enumerate([0, 6, 11]):
                expected = reference(model.vision, images[i : i + 1], text_emb, kind, layer, None, None,
                                     src_cache[hook_name(kind, layer)][i], model)
                assert abs(float(result.effects[i, li]) - expected) < TOL
    # resample: each image takes the activation of another image of the set (seeded)
    result = clip_lens.patch(model, target=images, text=text_emb, hook="mlp_out", layers=[3], positions="sequence",
                             intervention="resample", seed=1, progress=False)
    perm = result.extra["resample_pairs"]
    _, own_cache = model.vision.run_with_cache(images)
    for i in range(2):
        expected = reference(model.vision, images[i : i + 1], text_emb, "mlp_out", 3, None, None,
                             own_cache["blocks.3.hook_mlp_out"][int(perm[i])], model)
        assert abs(float(result.effects[i, 0]) - expected) < TOL


def test_value_only_attention_hook_intervention(setup):
    model, _, _ = setup
    text_emb = model.encode_text(model.to_tokens(["a photo"])).detach()
    images = random_pixels(2, seed=3)
    result = clip_lens.patch(model, target=images, text=text_emb, hook="pattern", layers=[2, (4, 5, 6)],
                             intervention="value_only", progress=False)
    for li, group in enumerate([(2,), (4, 5, 6)]):
        hooks = [(f"blocks.{l}.attn.hook_pattern", clip_lens.value_only_attention) for l in group]
        with torch.no_grad():
            expected = score(model, model.vision.run_with_hooks(images, fwd_hooks=hooks), text_emb)
        torch.testing.assert_close(result.effects[:, li], expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("batch_size", [7, 64])
def test_results_do_not_depend_on_batch_size(setup, batch_size):
    model, image, _ = setup
    one = clip_lens.patch(model, target=POS, source=NEG, image=image, batch_size=1, progress=False)
    other = clip_lens.patch(model, target=POS, source=NEG, image=image, batch_size=batch_size, pair_chunk=2, progress=False)
    torch.testing.assert_close(one.effects, other.effects, atol=TOL, rtol=0, equal_nan=True)


def test_causal_tracing_invariants(setup):
    model, image, _ = setup
    result = clip_lens.patch(model, target=POS, source=NEG, image=image, progress=False)
    d = result.source_baseline - result.baseline          # S(n, i) - S(p, i)
    cte = (result.effects - result.baseline[:, None, None]) / d[:, None, None]
    negator = 3                                           # <sot> there is/are <no|some|a>
    tokens = model.to_tokens(POS)
    for i in range(len(POS)):
        eot = int(tokens[i].argmax())
        assert torch.all(cte[i, :, :negator] == 0)         # causal mask: nothing before the negator
        assert abs(float(cte[i, 0, negator]) - 1) < 1e-4   # layer 0 at the negator restores all
        assert abs(float(cte[i, 12, eot]) - 1) < 1e-4      # EOT in the last layer restores all
        assert cte[i, 6, negator:eot + 1].abs().max() > 1e-3  # and something happens in between


def test_attribution_equals_exact_when_metric_is_linear(setup):
    """With ln_final's scale frozen to a constant, the embedding is affine in the last residual, so
    a metric linear in the embedding makes attribution patching exact."""
    model, image, image_emb = setup
    direction = torch.randn(image_emb.shape[-1])

    def linear_metric(emb, other):
        return emb @ direction

    with model.text.hooks(fwd_hooks=[("ln_final.hook_scale", lambda s, hook: torch.full_like(s, 2.0))]):
        exact = clip_lens.patch(model, target=POS, source=NEG, image=image, layers=[12], metric=linear_metric, progress=False)
        approx = clip_lens.patch(model, target=POS, source=NEG, image=image, layers=[12], metric=linear_metric,
                                 method="attribution", progress=False)
    torch.testing.assert_close(approx.effects, exact.effects, atol=1e-4, rtol=0, equal_nan=True)
    assert (exact.effects - exact.baseline[:, None, None]).nan_to_num().abs().max() > 1e-2
    # without the frozen scale (a non-linear metric) the estimate is only approximate
    exact = clip_lens.patch(model, target=POS, source=NEG, image=image, layers=[4], progress=False)
    approx = clip_lens.patch(model, target=POS, source=NEG, image=image, layers=[4], method="attribution", progress=False)
    assert approx.effects.shape == exact.effects.shape
    assert (approx.effects - exact.effects).nan_to_num().abs().max() > 1e-6


@pytest.mark.parametrize("kwargs,message", [
    (dict(hook="resid_pro"), "Unknown hook kind 'resid_pro'"),
    (dict(hook="attn_out", layers=[12]), r"layer 12 is out of range \(0..11\)"),
    (dict(layers=[13]), r"layer 13 is out of range \(0..12\)"),
    (dict(positions=[40]), "position 40 is out of range"),
    (dict(hook="z", heads=[8]), r"head 8 is out of range \(0..7\)"),
    (dict(source=["There are no giraffes at all."]), "pair 0: source has 10 tokens and target 8"),
    (dict(intervention="smear"), "Unknown intervention 'smear'"),
])
def test_bad_requests_name_the_item(setup, kwargs, message):
    model, image, _ = setup
    args = dict(target=["There are some giraffes."], source=["There are no giraffes."], image=image, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        clip_lens.patch(model, **args)


def test_embedding_metric_keeps_the_intervened_embeddings(vit_b32):
    _, model = vit_b32
    pixels = random_pixels(2, seed=11)
    texts = model.to_tokens(["a cat", "a dog", "a red car"])
    groups = [(1,), (2, 3)]
    emb = clip_lens.patch(model, target=pixels, hook="pattern", intervention="value_only", layers=groups,
                          metric="embedding", progress=False)
    assert emb.effects.shape == (2, 2, model.vision.cfg.d_embed) and emb.dims == ("pair", "layer", "embed")
    for li, group in enumerate(groups):
        with torch.no_grad():
            expected = model.vision.run_with_hooks(
                pixels, fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", clip_lens.value_only_attention) for l in group])
        torch.testing.assert_close(emb.effects[:, li], expected, atol=1e-5, rtol=1e-5)
    # scored afterwards, the embeddings give the "score" metric's values
    text_emb = model.encode_text(texts).detach()
    scored = clip_lens.patch(model, target=pixels, text=text_emb[:1], hook="pattern", intervention="value_only",
                             layers=groups, progress=False)
    rescored = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(emb.effects, text_emb[0], dim=-1)
    torch.testing.assert_close(scored.effects, rescored.detach(), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="scalar metric"):
        clip_lens.patch(model, target=pixels, source=pixels, hook="resid", metric="embedding", method="attribution")


def test_embedding_metric_on_the_exact_path(vit_b32):
    _, model = vit_b32
    src, tgt = model.to_tokens(["There are no giraffes."]), model.to_tokens(["There are some giraffes."])
    eot = int(src.argmax())
    res = clip_lens.patch(model, target=tgt, source=src, hook="resid", layers=[0, 12], positions=[1, eot],
                          metric="embedding", progress=False)
    assert res.effects.shape == (1, 2, 2, model.text.cfg.d_embed)
    with torch.no_grad():
        e_src, e_tgt = model.encode_text(src), model.encode_text(tgt)
    torch.testing.assert_close(res.effects[0, 1, 1], e_src[0], atol=1e-5, rtol=1e-5)  # EOT, last layer: the source
    torch.testing.assert_close(res.effects[0, 0, 0], e_tgt[0], atol=1e-5, rtol=1e-5)  # identical token: no change
    torch.testing.assert_close(res.baseline[0], e_tgt[0], atol=1e-5, rtol=1e-5)


def test_several_hook_kinds_in_one_call_equal_separate_calls(vit_b32):
    _, model = vit_b32
    target, source = random_pixels(3, seed=41), random_pixels(3, seed=42)
    text = model.to_tokens(["a photo of a cat"])
    both = clip_lens.patch(model, target=target, source=source, text=text, hook=["attn_out", "mlp_out"],
                           layers=[0, 5, 11], positions="sequence", progress=False)
    assert both.dims == ("pair", "hook", "layer") and both.effects.shape == (3, 2, 3)
    for h, kind in enumerate(("attn_out", "mlp_out")):
        one = clip_lens.patch(model, target=target, source=source, text=text, hook=kind, layers=[0, 5, 11],
                              positions="sequence", progress=False)
        torch.testing.assert_close(both.effects[:, h], one.effects, atol=1e-5, rtol=1e-5)
    frame = both.to_frame()
    assert set(frame["hook"]) == {"attn_out", "mlp_out"} and len(frame) == 18
    with pytest.raises(ValueError, match="different layer ranges"):
        clip_lens.patch(model, target=target, source=source, text=text, hook=["resid", "mlp_out"])
    with pytest.raises(ValueError, match="several hook kinds"):
        clip_lens.patch(model, target=target, source=source, text=text, hook=["attn_out", "mlp_out"], method="attribution")
