"""Acceptance 2 and 5 of the hooked-CLIP issue: every hook point fires with its documented shape
and is cached under its `text.` / `vision.` name; editing hooks change the output, identity hooks do
not; hooks are gone after a run raises."""

import re

import pytest
import torch
from conftest import SENTENCES, random_pixels


def expected_shape(name: str, model, n_texts: int, n_pos: int, n_images: int):
    tower, local = name.split(".", 1)
    cfg = getattr(model, tower).cfg
    batch = n_texts if tower == "text" else n_images
    pos = n_pos if tower == "text" else cfg.n_ctx
    d, h, e = cfg.d_model, cfg.n_heads, cfg.d_head
    table = [
        (r"blocks\.\d+\.attn\.hook_(q|k|v|z)", (batch, pos, h, e)),
        (r"blocks\.\d+\.attn\.hook_(attn_scores|pattern)", (batch, h, pos, pos)),
        (r"blocks\.\d+\.attn\.hook_result", (batch, pos, h, d)),
        (r"blocks\.\d+\.mlp\.hook_(pre|post)", (batch, pos, cfg.d_mlp)),
        (r"(blocks\.\d+\.)?ln\w*\.hook_scale", (batch, pos, 1)),
        (r"hook_pooled", (batch, d)),
        (r"hook_embedding", (batch, cfg.d_embed)),
        (r"hook_patch_embed", (batch, pos - 1, d)),
        (r"hook_class_embed", (batch, 1, d)),
        (r".*", (batch, pos, d)),
    ]
    for pattern, shape in table:
        if re.fullmatch(pattern, local):
            return shape


def test_every_hook_fires_with_documented_shape(vit_b32):
    _, model = vit_b32
    tokens, pixels = model.to_tokens(SENTENCES[:2]), random_pixels(3)
    for tower in (model.text, model.vision):
        tower.set_use_attn_result(True)
        tower.set_use_hook_mlp_in(True)
    try:
        with torch.no_grad():
            logits, cache = model.run_with_cache(text=tokens, image=pixels)
    finally:
        for tower in (model.text, model.vision):
            tower.set_use_attn_result(False)
            tower.set_use_hook_mlp_in(False)
    assert logits.shape == (3, 2)
    # the per-head input hooks fire only with split inputs (tests/test_transformer_lens_habits.py)
    per_head_inputs = re.compile(r".*\.hook_(q_input|k_input|v_input|attn_in)")
    assert set(cache.keys()) == {name for name in model.hook_dict if not per_head_inputs.fullmatch(name)}
    assert all(name.startswith(("text.", "vision.")) for name in cache.keys())
    for name in cache.keys():
        assert tuple(cache[name].shape) == expected_shape(name, model, 2, tokens.shape[1], 3), name
    # the cache holds what the towers computed
    torch.testing.assert_close(cache["text.hook_embedding"], model.encode_text(tokens).detach())
    assert torch.equal(cache["text.blocks.0.hook_resid_pre"], cache["text.hook_embed"] + cache["text.hook_pos_embed"])
    # per-head results add up to the attention output
    attn_out = cache["vision.blocks.2.hook_attn_out"]
    summed = cache["vision.blocks.2.attn.hook_result"].sum(2) + model.vision.blocks[2].attn.b_O
    torch.testing.assert_close(summed, attn_out, atol=1e-5, rtol=0)
    # causal mask: the text pattern has no weight on later keys
    pattern = cache["text.blocks.1.attn.hook_pattern"]
    assert torch.all(pattern.triu(1) == 0)
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))


def test_tower_caches_use_unprefixed_names(vit_b32):
    _, model = vit_b32
    _, cache = model.text.run_with_cache(model.to_tokens(SENTENCES))
    assert "blocks.3.hook_resid_post" in cache.keys() and not any(k.startswith("text.") for k in cache.keys())


def test_identity_hook_keeps_and_editing_hook_changes_output(vit_b32):
    _, model = vit_b32
    tokens, pixels = model.to_tokens(SENTENCES), random_pixels(2)
    with torch.no_grad():
        clean = model(text=tokens, image=pixels)
        seen = []

        def identity(x, hook):
            seen.append(hook.name)
            return x

        same = model.run_with_hooks(text=tokens, image=pixels, fwd_hooks=[(lambda n: n.endswith("hook_resid_mid"), identity)])
        edited = model.run_with_hooks(
            text=tokens, image=pixels,
            fwd_hooks=[("vision.blocks.5.hook_mlp_out", lambda x, hook: torch.zeros_like(x)),
                       ("text.blocks.7.attn.hook_pattern", lambda x, hook: x.flip(-1))],
        )
    assert torch.equal(same, clean)
    assert len(seen) == 24 and "text.blocks.0.hook_resid_mid" in seen and "vision.blocks.11.hook_resid_mid" in seen
    assert (edited - clean).abs().max() > 1e-3


def test_hook_sees_prefixed_name_and_layer(vit_b32):
    _, model = vit_b32
    names = []

    def record(x, hook):
        names.append((hook.name, hook.layer()))

    with torch.no_grad():
        model.run_with_hooks(text=model.to_tokens(SENTENCES[:1]), fwd_hooks=[("text.blocks.6.attn.hook_z", record)])
    assert names == [("text.blocks.6.attn.hook_z", 6)]


def test_backward_hooks_and_grad_cache(vit_b32):
    _, model = vit_b32
    tokens, pixels = model.to_tokens([SENTENCES[0], SENTENCES[2]]), random_pixels(1)
    grads = {}

    def save(grad, hook):
        grads[hook.name] = grad.detach()

    with model.hooks(bwd_hooks=[("text.blocks.11.hook_resid_post", save), ("vision.hook_embedding", save)]):
        model(text=tokens, image=pixels)[0, 0].backward()
    model.zero_grad(set_to_none=True)
    assert grads["text.blocks.11.hook_resid_post"].shape == (2, tokens.shape[1], 512)
    # only text 0 feeds logit [0, 0], and after the last block only through its EOT position
    g = grads["text.blocks.11.hook_resid_post"]
    eot0 = int(tokens[0].argmax())
    assert eot0 < tokens.shape[1] - 1
    assert g[1].abs().max() == 0 and g[0, eot0].abs().max() > 0
    assert g[0, :eot0].abs().max() == 0 and g[0, eot0 + 1 :].abs().max() == 0
    assert grads["vision.hook_embedding"].shape == (1, 512) and grads["vision.hook_embedding"].abs().max() > 0
    assert not any(hp.bwd_hooks for hp in model.hook_dict.values())


def test_names_filter_forms(vit_b32):
    _, model = vit_b32
    tokens = model.to_tokens(SENTENCES[:1])
    with torch.no_grad():
        _, by_str = model.run_with_cache(text=tokens, names_filter="text.hook_embedding")
        _, by_list = model.run_with_cache(text=tokens, names_filter=["text.hook_pooled", "text.ln_final.hook_scale"])
        _, by_fn = model.run_with_cache(text=tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    assert list(by_str.keys()) == ["text.hook_embedding"]
    assert set(by_list.keys()) == {"text.hook_pooled", "text.ln_final.hook_scale"}
    assert len(by_fn.keys()) == 12  # text only: no image was given


def test_unknown_hook_names_raise_with_the_name(vit_b32):
    _, model = vit_b32
    tokens = model.to_tokens(SENTENCES[:1])
    with pytest.raises(ValueError, match=r"text\.blocks\.3\.hook_resid_pro.*Did you mean 'text\.blocks\.3\.hook_resid_pre'"):
        model.run_with_hooks(text=tokens, fwd_hooks=[("text.blocks.3.hook_resid_pro", lambda x, hook: x)])
    with pytest.raises(ValueError, match="blocks.99.hook_resid_pre"):
        model.run_with_cache(text=tokens, names_filter=["text.blocks.99.hook_resid_pre"])
    with pytest.raises(ValueError, match="blocks.3.hook_nothing"):
        model.text.run_with_hooks(tokens, fwd_hooks=[("blocks.3.hook_nothing", lambda x, hook: x)])


def _no_hooks_left(model):
    return not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())


def test_hooks_are_removed_when_a_run_raises(vit_b32):
    _, model = vit_b32
    tokens, pixels = model.to_tokens(SENTENCES[:1]), random_pixels(1)

    def boom(x, hook):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        model.run_with_hooks(text=tokens, image=pixels,
                             fwd_hooks=[("text.blocks.2.hook_resid_pre", lambda x, hook: x), ("vision.blocks.4.hook_mlp_out", boom)])
    assert _no_hooks_left(model)
    with pytest.raises(RuntimeError, match="hook failed"):
        model.text.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_attn_out", boom)])
    assert _no_hooks_left(model)
    with pytest.raises(ValueError):  # wrong input shape, raised inside a caching run
        model.run_with_cache(image=torch.zeros(1, 3, 10, 10))
    assert _no_hooks_left(model)


def test_nested_contexts_on_model_and_tower_keep_each_others_hooks(vit_b32):
    _, model = vit_b32
    tokens = model.to_tokens(SENTENCES[:1])
    calls = []
    with model.hooks(fwd_hooks=[("text.blocks.0.hook_resid_pre", lambda x, hook: calls.append("outer"))]):
        with model.text.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: calls.append("inner"))]):
            with torch.no_grad():
                model.encode_text(tokens)
        with torch.no_grad():
            model.encode_text(tokens)
    assert calls == ["outer", "inner", "outer"]
    assert _no_hooks_left(model)


def test_fused_paths_give_the_hooked_values_and_never_overwrite_a_cached_activation(vit_b32):
    """Without hooks on their intermediates, layer norms, attention and the MLP's GELU take fused or
    in-place kernels. Caching hook_pre must still see the true pre-activations (not the GELU written
    over them), and the embeddings agree with a run where every intermediate is hooked."""
    import torch.nn.functional as F
    from conftest import random_pixels

    _, model = vit_b32
    pixels = random_pixels(2, seed=71)
    tower = model.vision
    with torch.no_grad():
        fused = tower(pixels)
        _, cache = tower.run_with_cache(pixels, names_filter=["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post"])
        _, everything = tower.run_with_cache(pixels)
    pre, post = cache["blocks.0.mlp.hook_pre"], cache["blocks.0.mlp.hook_post"]
    assert (pre < 0).any() and torch.equal(post, F.gelu(pre))
    torch.testing.assert_close(fused, tower.pool(everything["blocks.11.hook_resid_post"]), atol=1e-5, rtol=0)
