"""A TransformerLens user's calls on both towers (issue 26, acceptance 1 and 4), each compared with
the direct computation, on a random ViT-B-32 and on the shipped tiny CLIP; and the silent results
of the token helpers refused or made right."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SENTENCES, random_pixels

MODELS = ["vit_b32", "tiny"]
TEXTS = ["a red circle", "there is no blue square in this picture"]


@pytest.fixture(params=MODELS)
def clip(request):
    if request.param == "tiny":
        return request.getfixturevalue("tiny_model")
    return request.getfixturevalue("vit_b32")[1]


def pixels_for(model, n: int = 2, seed: int = 0) -> torch.Tensor:
    return random_pixels(n, size=model.vision.cfg.image_size[0], seed=seed)


@pytest.fixture
def joint_run(clip):
    """(model, logits [n_images, n_texts], joint cache) of TEXTS (unequal lengths) with two images."""
    with torch.no_grad():
        logits, cache = clip.run_with_cache(text=TEXTS, image=pixels_for(clip))
    return clip, logits, cache


# cfg -------------------------------------------------------------------------------------------
def test_each_tower_has_transformer_lens_config_fields(clip):
    for tower in (clip.text, clip.vision):
        cfg = tower.cfg
        assert cfg.n_layers == len(tower.blocks)
        assert (cfg.n_ctx, cfg.d_model) == tuple(tower.W_pos.shape)
        assert cfg.n_heads * cfg.d_head == cfg.d_model == tower.blocks[0].attn.W_Q.shape[1]
        assert cfg.d_head == tower.blocks[0].attn.W_Q.shape[2]
        assert cfg.d_mlp == tower.blocks[0].mlp.W_in.shape[1]
        assert (cfg.normalization_type, cfg.positional_embedding_type) == ("LN", "standard")
        assert cfg.act_fn in ("gelu", "gelu_tanh", "quick_gelu")
        assert (cfg.device, cfg.dtype) == (str(tower.W_pos.device), tower.W_pos.dtype)
    assert clip.text.cfg.d_vocab == clip.text.W_E.shape[0] and clip.vision.cfg.d_vocab == -1
    assert clip.cfg.text is clip.text.cfg and clip.cfg.vision is clip.vision.cfg
    assert clip.cfg.d_embed == clip.text.proj.W.shape[1]
    with pytest.raises(AttributeError, match=r"cfg\.text\.n_layers or model\.cfg\.vision\.n_layers"):
        _ = clip.cfg.n_layers


def test_cfg_follows_the_weights_dtype(tiny_model):
    import copy

    half = copy.deepcopy(tiny_model).to(torch.bfloat16)
    assert half.text.cfg.dtype == half.vision.cfg.dtype == half.cfg.dtype == torch.bfloat16


# weights ----------------------------------------------------------------------------------------
def tower_and_inputs(clip, modality):
    """(tower, its inputs): the text tower with TEXTS' tokens, or the vision tower with two images."""
    if modality == "text":
        return clip.text, clip.to_tokens(TEXTS)
    return clip.vision, pixels_for(clip)


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_stacked_weights_give_the_cached_activations(clip, modality):
    text, tokens = tower_and_inputs(clip, modality)
    with torch.no_grad():
        _, cache = text.run_with_cache(tokens)
    layer = text.cfg.n_layers - 1
    normed = cache[f"blocks.{layer}.ln1.hook_normalized"]
    for name, hook in (("Q", "q"), ("K", "k"), ("V", "v")):
        weight, bias = getattr(text, f"W_{name}")[layer], getattr(text, f"b_{name}")[layer]
        direct = torch.einsum("bpm,hmd->bphd", normed, weight) + bias
        torch.testing.assert_close(direct, cache[hook, layer], atol=1e-4, rtol=1e-4)
    mlp_in = cache[f"blocks.{layer}.ln2.hook_normalized"]
    torch.testing.assert_close(mlp_in @ text.W_in[layer] + text.b_in[layer], cache["pre", layer], atol=1e-4, rtol=1e-4)
    out = cache["post", layer] @ text.W_out[layer] + text.b_out[layer]
    torch.testing.assert_close(out, cache["mlp_out", layer], atol=1e-4, rtol=1e-4)
    z_out = torch.einsum("bphd,hdm->bpm", cache["z", layer], text.W_O[layer]) + text.b_O[layer]
    torch.testing.assert_close(z_out, cache["attn_out", layer], atol=1e-4, rtol=1e-4)
    if modality == "text":
        torch.testing.assert_close(text.W_E[tokens], cache["hook_embed"])
    # OV and QK as TransformerLens's factored matrices: W_V @ W_O and W_Q @ W_K^T per layer and head
    ov, qk = text.OV, text.QK
    assert tuple(ov.shape) == (text.cfg.n_layers, text.cfg.n_heads, text.cfg.d_model, text.cfg.d_model)
    torch.testing.assert_close(ov.AB[layer, 1], text.W_V[layer, 1] @ text.W_O[layer, 1])
    torch.testing.assert_close(qk.AB[layer, 0], text.W_Q[layer, 0] @ text.W_K[layer, 0].T)
    torch.testing.assert_close(text.blocks[layer].attn.OV.AB, ov.AB[layer])


def test_vision_w_e_embeds_flattened_patches(clip):
    vision = clip.vision
    pixels = pixels_for(clip, 1)
    with torch.no_grad():
        _, cache = vision.run_with_cache(pixels, names_filter="hook_patch_embed")
    ph, pw = vision.cfg.patch_size
    patches = pixels.unfold(2, ph, ph).unfold(3, pw, pw)  # [1, 3, gh, gw, ph, pw]
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(1, -1, 3 * ph * pw)
    torch.testing.assert_close(flat @ vision.W_E, cache["hook_patch_embed"], atol=1e-4, rtol=1e-4)


def test_a_tower_has_no_unembedding(clip):
    with pytest.raises(AttributeError, match="tokens_to_residual_directions"):
        _ = clip.text.W_U


# optional hook points ---------------------------------------------------------------------------
@pytest.mark.parametrize("setter", ["set_use_split_qkv_input", "set_use_attn_in", "set_use_hook_mlp_in",
                                    "set_use_attn_result"])
@pytest.mark.parametrize("modality", ["text", "vision"])
def test_optional_hook_points_fire_and_change_nothing(clip, setter, modality):
    tower, tokens = tower_and_inputs(clip, modality)
    with torch.no_grad():
        plain = tower(tokens)
        getattr(tower, setter)(True)
        try:
            flag = setter.removeprefix("set_")
            assert getattr(tower.cfg, flag) is True
            out, cache = tower.run_with_cache(tokens)
        finally:
            getattr(tower, setter)(False)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    resid_pre, resid_mid = cache["resid_pre", 1], cache["resid_mid", 1]
    (batch, pos, d), heads = resid_pre.shape, tower.cfg.n_heads
    expected = {
        "set_use_split_qkv_input": {"blocks.1.hook_q_input": resid_pre, "blocks.1.hook_v_input": resid_pre},
        "set_use_attn_in": {"blocks.1.hook_attn_in": resid_pre},
        "set_use_hook_mlp_in": {"blocks.1.hook_mlp_in": resid_mid},
        "set_use_attn_result": {},
    }[setter]
    for name, resid in expected.items():
        value = cache[name]
        per_head = resid[:, :, None].expand(batch, pos, heads, d) if value.ndim == 4 else resid
        assert torch.equal(value, per_head), name
    off = {"blocks.1.hook_q_input", "blocks.1.hook_attn_in", "blocks.1.hook_mlp_in", "blocks.1.attn.hook_result"}
    assert not off & (set(cache.keys()) - set(expected) - {"blocks.1.attn.hook_result"})


def test_a_split_input_patch_reaches_one_head_only(tiny_model):
    """Zeroing head 0's own value input changes head 0's z and no other head's."""
    tower = tiny_model.text
    tokens = tiny_model.to_tokens(TEXTS)

    def zero_head_0(value, hook):
        value[:, :, 0] = 0
        return value

    tower.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            _, clean = tower.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
            with tower.hooks(fwd_hooks=[("blocks.0.hook_v_input", zero_head_0)]):
                _, patched = tower.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    finally:
        tower.set_use_split_qkv_input(False)
    z0, z1 = clean["z", 0], patched["z", 0]
    assert not torch.allclose(z0[:, :, 0], z1[:, :, 0])
    torch.testing.assert_close(z0[:, :, 1:], z1[:, :, 1:])


# tokens -----------------------------------------------------------------------------------------
def test_token_helpers_follow_transformer_lens(clip):
    tokens = clip.to_tokens(TEXTS)
    each = [clip.to_str_tokens(text) for text in TEXTS]
    assert clip.to_str_tokens(TEXTS) == each
    assert clip.to_str_tokens(tokens) == each          # one list per row, each up to its own EOT
    assert clip.to_str_tokens(tokens[1]) == each[1]    # [pos] and [1, pos] give one list
    assert clip.to_str_tokens(tokens[1:2]) == each[1]
    assert len(each[0]) == int(tokens[0].argmax()) + 1 and each[0][0] == "<start_of_text>"
    assert clip.to_string(tokens[0]) == clip.tokenizer.decode(tokens[0, : len(each[0])])
    assert clip.to_string(tokens) == [clip.to_string(row) for row in tokens]
    assert "red circle" in clip.to_string(tokens[0])
    red = clip.to_single_token("red")
    assert clip.tokenizer.decode_token(red).strip() == "red"
    assert clip.get_token_position("red", TEXTS[0]) == each[0].index(clip.tokenizer.decode_token(red))
    assert clip.get_token_position(red, tokens[:1]) == 2
    with pytest.raises(ValueError, match="not one"):
        clip.to_single_token("red circle")
    with pytest.raises(ValueError, match="not in the input"):
        clip.get_token_position("red", TEXTS[1])
    with pytest.raises(ValueError, match="one text"):
        clip.get_token_position("red", tokens)


def test_forward_takes_texts_wherever_it_takes_tokens(clip):
    pixels = pixels_for(clip)
    with torch.no_grad():
        by_tokens = clip(text=clip.to_tokens(TEXTS), image=pixels)
        assert torch.equal(clip(text=TEXTS, image=pixels), by_tokens)
        assert torch.equal(clip.text(TEXTS), clip.text(clip.to_tokens(TEXTS)))
        assert torch.equal(clip.text(TEXTS[0]), clip.text(clip.to_tokens(TEXTS[0])))
        _, cache = clip.text.run_with_cache(TEXTS)
    assert torch.equal(cache.inputs, clip.to_tokens(TEXTS))
    with pytest.raises(ValueError, match="text= takes texts or tokens"):
        clip(text=pixels)


def test_tokens_without_end_of_text_are_refused(clip):
    tokens = clip.to_tokens(TEXTS, trim=False)
    eot = int(tokens[1].argmax())
    cut = tokens.clone()
    cut[1, eot] = 0  # the second text loses its EOT: argmax pooling would read the start token
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] hold no end-of-text token"):
        clip.text(cut)
    with pytest.raises(ValueError, match="end-of-text"):
        clip(text=cut[1:])


# the joint cache and its per-tower views -------------------------------------------------------
def test_joint_cache_points_to_the_tower_views(joint_run):
    clip, _, cache = joint_run
    assert torch.equal(cache.text["pattern", 0], cache["text.blocks.0.attn.hook_pattern"])
    assert torch.equal(cache.vision["resid_post", 1], cache["vision.blocks.1.hook_resid_post"])
    with pytest.raises(KeyError, match=r"cache\.text\[\('pattern', 0\)\]"):
        cache["pattern", 0]
    with pytest.raises(TypeError, match=r"cache\.text\.accumulated_resid"):
        cache.accumulated_resid()
    # TransformerLens's residual tools on each view equal the direct computation
    for view, tower in ((cache.text, clip.text), (cache.vision, clip.vision)):
        stack = view.accumulated_resid(layer=-1)
        assert stack.shape[0] == tower.cfg.n_layers + 1
        torch.testing.assert_close(stack[-1], view["resid_post", tower.cfg.n_layers - 1])


def test_pooled_slice_reads_each_texts_own_eot(joint_run):
    clip, _, cache = joint_run
    text = cache.text
    eot = clip.to_tokens(TEXTS).argmax(-1)
    assert eot[0] != eot[1]
    final = text["resid_post", clip.text.cfg.n_layers - 1]
    pooled = text.accumulated_resid(layer=-1, pos_slice=text.pooled_slice)  # [layer, batch, d_model]
    torch.testing.assert_close(pooled[-1], final[torch.arange(2), eot])
    with pytest.raises(ValueError, match=r"padding for text\(s\) \[0\].*pos_slice=cache.pooled_slice"):
        text.accumulated_resid(pos_slice=-1)
    with pytest.raises(ValueError, match="padding"):
        text.decompose_resid(pos_slice=[0, int(eot[1])])
    text.accumulated_resid(pos_slice=int(eot[0]))  # a position every text has is read as before


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_logit_attrs_sum_to_the_score(joint_run, modality):
    """Acceptance 4: the attributions of the decomposed residual at the pooled position, plus the
    terms it leaves out (score_remainder: the final norm's bias and the projection's bias through
    the joint space), sum to S (these models have no logit bias, so S is the logit)."""
    clip, logits, cache = joint_run
    assert clip.logit_bias is None
    view = getattr(cache, modality)
    other = cache["vision.hook_embedding" if modality == "text" else "text.hook_embedding"]
    stack = view.decompose_resid(pos_slice=view.pooled_slice)
    for i in range(2):
        attrs = view.logit_attrs(stack, other[i], pos_slice=view.pooled_slice)  # [component, batch]
        expected = logits[i] if modality == "text" else logits[:, i]
        torch.testing.assert_close(attrs.sum(0) + view.score_remainder(other[i]), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(view.score(other[i]), expected, atol=1e-4, rtol=0)
    # a target given as inputs of the other tower is encoded by the HookedCLIP; incorrect_tokens subtract
    target = pixels_for(clip) if modality == "text" else TEXTS
    diff = view.logit_attrs(stack, target[:1] if modality == "text" else target[0:1],
                            incorrect_tokens=other[1], pos_slice=view.pooled_slice).sum(0)
    remainder = view.score_remainder(other[0]) - view.score_remainder(other[1])
    expected = (logits[0] - logits[1]) if modality == "text" else (logits[:, 0] - logits[:, 1])
    torch.testing.assert_close(diff + remainder, expected, atol=1e-4, rtol=0)


def test_residual_directions_are_the_joint_space_read_back(clip):
    """tokens_to_residual_directions(target): s * w_final * (W_proj @ target_unit) / |own embedding|."""
    tower = clip.vision
    target = F.normalize(torch.randn(tower.cfg.d_embed, generator=torch.Generator().manual_seed(1)), dim=0)
    with torch.no_grad():
        own = tower(pixels_for(clip))
    direction = tower.tokens_to_residual_directions(target, own, scale=2.0)
    manual = 2.0 * tower.ln_post.w * (tower.proj.W @ target) / own.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(direction, manual)
    assert direction.shape == (2, tower.cfg.d_model)
    assert math.isclose(float(tower.tokens_to_residual_directions(target).detach().norm()),
                        float((tower.ln_post.w * (tower.proj.W @ target)).detach().norm()), rel_tol=1e-5)


def test_a_tower_run_alone_attributes_the_cosine(tiny_model):
    tower = tiny_model.text
    target = torch.randn(tower.cfg.d_embed, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb, cache = tower.run_with_cache(SENTENCES[:2])
    stack = cache.decompose_resid(pos_slice=cache.pooled_slice)
    total = cache.logit_attrs(stack, target, pos_slice=cache.pooled_slice).sum(0) + cache.score_remainder(target)
    torch.testing.assert_close(total, F.cosine_similarity(emb, target[None]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="texts and images need a HookedCLIP run"):
        cache.logit_attrs(stack, ["a red circle"], pos_slice=cache.pooled_slice)


def test_logit_attrs_still_sum_to_the_score_after_weight_processing(tiny_model):
    """Folding the final norm moves its gain and bias into the projection (which gains a bias):
    the directions and the remainder follow, and the sum is still S."""
    import copy

    processed = copy.deepcopy(tiny_model)
    processed.process_weights_(fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    with torch.no_grad():
        logits, cache = processed.run_with_cache(text=TEXTS, image=pixels_for(processed))
    text = cache.text
    stack = text.decompose_resid(pos_slice=text.pooled_slice)
    image = cache["vision.hook_embedding"][1]
    total = text.logit_attrs(stack, image, pos_slice=text.pooled_slice).sum(0) + text.score_remainder(image)
    torch.testing.assert_close(total, logits[1], atol=1e-4, rtol=0)


def test_a_stack_without_a_batch_dimension_takes_one_input_and_one_target(clip):
    """A stack with no batch dimension has one input; given two targets, whose attribution it is
    cannot be said, so it is refused rather than read against the first target's direction."""
    with torch.no_grad():
        _, cache = clip.run_with_cache(text=TEXTS[:1], image=pixels_for(clip))
    view = cache.text
    stack = view.decompose_resid(pos_slice=view.pooled_slice)[:, 0]  # [component, d_model]
    images = cache["vision.hook_embedding"]                           # two targets
    with pytest.raises(ValueError, match="without a batch dimension takes one input and one target"):
        view.logit_attrs(stack, images, pos_slice=view.pooled_slice, has_batch_dim=False)
    one = view.logit_attrs(stack, images[1], pos_slice=view.pooled_slice, has_batch_dim=False)
    batched = view.logit_attrs(stack[:, None], images[1], pos_slice=view.pooled_slice)
    torch.testing.assert_close(one, batched[:, 0])
