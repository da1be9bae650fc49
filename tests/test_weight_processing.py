"""TransformerLens's weight processing on loading (fold_ln, center_writing_weights,
fold_value_biases): both towers' embeddings unchanged to 1e-5 on the tiny CLIP, ViT-B-32, ViT-M-16-alt
(LayerScale), a small open_clip CLIP with the other variants (no ln_pre, mean pooling, final norm
after pooling, projection bias, non-causal text) and a transformers CLIPModel; the weights really
processed; the hooks that keep their meaning; TransformerLens's apply_ln at the last layer needing
no gain or bias after fold_ln; and dtype given by name or torch dtype at every entry point."""

import copy

import open_clip
import pytest
import torch
from conftest import fresh_open_clip, perturb_, tiny_hf_config

import clip_lens
from clip_lens import loading, zoo
from clip_lens.config import TextConfig
from clip_lens.lens import joint_space_directions
from clip_lens.model import as_dtype
from clip_lens.model_sources import ModelSource
from clip_lens.towers import HookedTextTower

ALL = dict(fold_ln=True, center_writing_weights=True, fold_value_biases=True)
EACH = [dict(fold_ln=True), dict(center_writing_weights=True), dict(fold_value_biases=True), ALL]
EACH_IDS = ["fold_ln", "center_writing_weights", "fold_value_biases", "all"]


def embeddings(model, tokens, pixels):
    with torch.no_grad():
        return model.encode_text(tokens), model.encode_image(pixels)


def assert_processed(model, flags):
    """The weights show each asked-for transform (so an equal embedding is not a no-op passing)."""
    for tower in (model.text, model.vision):
        blocks = tower.blocks
        if flags.get("fold_ln"):
            for norm in [b.ln1 for b in blocks] + [b.ln2 for b in blocks] + [tower.final_norm]:
                assert torch.equal(norm.w, torch.ones_like(norm.w)) and torch.equal(norm.b, torch.zeros_like(norm.b))
            assert tower.proj.b is not None
        if flags.get("center_writing_weights"):
            for b in blocks:
                for out in (b.attn, b.mlp):
                    assert out.out_weight.mean(0).abs().max() < 1e-6 and out.out_bias.mean().abs() < 1e-6
            assert tower.W_pos.mean(-1).abs().max() < 1e-6
        if flags.get("fold_value_biases"):
            assert all(torch.equal(b.attn.b_V, torch.zeros_like(b.attn.b_V)) for b in blocks)


def check_processing(model, flags, tokens, pixels, build=None, expected=None):
    """A processed copy (made by `build(flags)`, default a deep copy of `model`) embeds as `model`
    (or gives the `expected` (text, image) embeddings)."""
    processed = build(flags) if build else copy.deepcopy(model).process_weights_(**flags)
    assert_processed(processed, flags)
    expected = expected or embeddings(model, tokens, pixels)
    for got, want in zip(embeddings(processed, tokens, pixels), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return processed


# --- the tiny CLIP --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_inputs(tiny_model):
    tokens = tiny_model.to_tokens(["There is a red circle.", "There are no squares."])
    return tokens, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("flags", EACH, ids=EACH_IDS)
def test_tiny_model_embeddings_are_unchanged(tiny_model, tiny_inputs, flags):
    check_processing(tiny_model, flags, *tiny_inputs)


def test_from_pretrained_takes_the_flags_itself(tiny_model, tiny_inputs):
    # fold_ln used to be passed on to open_clip, which failed on it
    check_processing(tiny_model, ALL, *tiny_inputs, build=lambda f: clip_lens.HookedCLIP.from_pretrained(zoo.NAME, **f))
    with pytest.raises(ValueError, match="center_unembed is a TransformerLens option"):
        clip_lens.HookedCLIP.from_pretrained(zoo.NAME, center_unembed=True)


def test_a_tower_is_processed_on_its_own(tiny_model, tiny_inputs):
    tokens, _ = tiny_inputs
    text = copy.deepcopy(tiny_model.text).process_weights_(**ALL)
    with torch.no_grad():
        torch.testing.assert_close(text(tokens), tiny_model.text(tokens), atol=1e-5, rtol=1e-5)
    assert torch.equal(text.ln_final.w, torch.ones_like(text.ln_final.w))


def test_hooks_that_keep_their_meaning(tiny_model, tiny_inputs):
    tokens, pixels = tiny_inputs
    processed = copy.deepcopy(tiny_model).process_weights_(**ALL)
    _, before = tiny_model.run_with_cache(text=tokens, image=pixels)
    _, after = processed.run_with_cache(text=tokens, image=pixels)
    for name in before.keys():
        if name.endswith(("hook_scale", "hook_pattern", "hook_q", "hook_k", "mlp.hook_pre", "hook_embedding")):
            torch.testing.assert_close(after[name], before[name], atol=1e-5, rtol=1e-5, msg=name)
    # centring: the text residual stream is mean-zero over d_model; before, it was not
    resid = "text.blocks.1.hook_resid_pre"
    assert after[resid].mean(-1).abs().max() < 1e-5 < before[resid].mean(-1).abs().max()
    # fold_ln: the pooled vector is the final norm's x_hat (no gain, no bias)
    pooled = after["text.hook_pooled"]
    assert pooled.mean(-1).abs().max() < 1e-5 and not torch.allclose(pooled, before["text.hook_pooled"], atol=1e-3)
    # weight-based reading of a direction in the joint space is unchanged
    directions = torch.randn(3, tiny_model.vision.cfg.d_model, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(joint_space_directions(processed.vision, directions),
                               joint_space_directions(tiny_model.vision, directions), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_apply_ln_at_the_last_layer_needs_no_gain_after_fold_ln(tiny_model, tiny_inputs, modality):
    processed = copy.deepcopy(tiny_model).process_weights_(fold_ln=True)
    tokens, pixels = tiny_inputs
    tower, inputs = (processed.text, tokens) if modality == "text" else (processed.vision, pixels)
    emb, cache = tower.run_with_cache(inputs)
    rows, pooled = torch.arange(len(inputs)), tower.pooled_positions(inputs)
    parts = cache.decompose_resid(apply_ln=True)                  # centred, divided by the cached scale
    torch.testing.assert_close(tower.proj(parts.sum(0)[rows, pooled]), emb, atol=1e-5, rtol=1e-5)


def test_bad_flags_and_a_tower_without_projection_are_refused(tiny_model):
    model = copy.deepcopy(tiny_model)
    with pytest.raises(TypeError, match=r"fold_ln='yes': expected True or False"):
        model.process_weights_(fold_ln="yes")
    cfg = TextConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, n_ctx=5, d_embed=None, d_vocab=10)
    tower = HookedTextTower(cfg)
    torch.nn.init.normal_(tower.blocks[0].ln1.w)
    before = tower.blocks[0].ln1.w.clone()
    with pytest.raises(ValueError, match=r"text tower has no projection .*ln_final"):
        tower.process_weights_(fold_ln=True)
    assert torch.equal(tower.blocks[0].ln1.w, before)  # refused before anything changed


# --- open_clip architectures ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def b32_inputs(vit_b32):
    _, model = vit_b32
    return model.to_tokens(["There are no giraffes.", "a photo of a cat"]), \
        torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))


def test_vit_b32_embeddings_are_unchanged(vit_b32, b32_inputs):
    oc, model = vit_b32
    check_processing(model, ALL, *b32_inputs, build=lambda f: clip_lens.HookedCLIP.from_open_clip(oc, **f))


@pytest.mark.slow
@pytest.mark.parametrize("flags", EACH[:3], ids=EACH_IDS[:3])
def test_vit_b32_embeddings_are_unchanged_by_each_flag(vit_b32, b32_inputs, flags):
    check_processing(vit_b32[1], flags, *b32_inputs)


@pytest.fixture(scope="module")
def layer_scale_clip():
    """ViT-M-16-alt (open_clip, random weights): a vision tower with LayerScale, which
    center_writing_weights folds into the output weights."""
    return fresh_open_clip("ViT-M-16-alt")


@pytest.mark.parametrize("flags", [ALL, pytest.param(dict(center_writing_weights=True), marks=pytest.mark.slow)],
                         ids=["all", "center_writing_weights"])
def test_layer_scale_model_embeddings_match_open_clip(layer_scale_clip, flags):
    tokens = open_clip.get_tokenizer("ViT-M-16-alt")(["a dog on a red sofa"])
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = layer_scale_clip.encode_text(tokens), layer_scale_clip.encode_image(pixels)
    processed = check_processing(None, flags, tokens, pixels, expected=expected,
                                 build=lambda f: clip_lens.HookedCLIP.from_open_clip(layer_scale_clip, **f))
    assert processed.vision.cfg.layer_scale
    assert all(torch.equal(b.ls1, torch.ones_like(b.ls1)) for b in processed.vision.blocks)


@pytest.fixture(scope="module")
def variant_clip():
    """A small open_clip CLIP with the variants ViT-B-32 lacks: no ln_pre, mean pooling with the final
    norm after pooling, LayerScale in both towers, a text projection with a bias, non-causal text
    pooled at the last position."""
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8, ls_init_value=0.5, no_ln_pre=True,
                  pool_type="avg", final_ln_after_pool=True)
    text = dict(context_length=16, vocab_size=100, width=32, heads=4, layers=2, ls_init_value=0.5, pool_type="last",
                no_causal_mask=True, proj_bias=True)
    return perturb_(open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval())


@pytest.mark.parametrize("flags", EACH, ids=EACH_IDS)
def test_variant_embeddings_match_open_clip(variant_clip, flags):
    tokens = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    processed = clip_lens.HookedCLIP.from_open_clip(variant_clip, **flags)
    assert_processed(processed, flags)
    assert processed.vision.ln_pre is None and processed.vision.cfg.final_ln_after_pool
    with torch.no_grad():
        ours = embeddings(processed, tokens, pixels)
        theirs = variant_clip.encode_text(tokens), variant_clip.encode_image(pixels)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- transformers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_clip():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return perturb_(transformers.CLIPModel(tiny_hf_config()).eval())


@pytest.mark.parametrize("flags", EACH, ids=EACH_IDS)
def test_huggingface_embeddings_are_unchanged(hf_clip, flags):
    model = clip_lens.HookedCLIP.from_huggingface(hf_clip)
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    tokens[:, -1] = model.text.eot_token_id  # the text embedding is read at each row's end-of-text token
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    check_processing(model, flags, tokens, pixels, build=lambda f: clip_lens.HookedCLIP.from_huggingface(hf_clip, **f))


# --- dtype by name or torch dtype -------------------------------------------------------------------
BAD_DTYPES = ["half", "float64", torch.float64, 16]


@pytest.mark.parametrize("value, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                             ("float16", torch.float16), (torch.bfloat16, torch.bfloat16), (None, None)])
def test_as_dtype_takes_names_and_torch_dtypes(value, expected):
    assert as_dtype(value) is expected


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=str)
def test_as_dtype_refuses_anything_else(bad):
    with pytest.raises(ValueError, match=r"precision=.*: use one of 'float32' or torch\.float32, 'bfloat16'"):
        as_dtype(bad, name="precision")


def test_every_loader_takes_a_dtype_name_or_a_torch_dtype(variant_clip, hf_clip):
    builders = {
        "from_pretrained": lambda d: clip_lens.HookedCLIP.from_pretrained(zoo.NAME, dtype=d),
        "from_open_clip": lambda d: clip_lens.HookedCLIP.from_open_clip(variant_clip, dtype=d),
        "from_huggingface": lambda d: clip_lens.HookedCLIP.from_huggingface(hf_clip, dtype=d),
        "from_parts": lambda d: clip_lens.HookedCLIP.from_parts(loading.open_clip_parts(variant_clip), dtype=d),
    }
    for where, build in builders.items():
        assert build("bfloat16").dtype == torch.bfloat16, where
        assert build(torch.float16).dtype == torch.float16, where
        with pytest.raises(ValueError, match=r"dtype='bf16': use one of"):
            build("bf16")


def test_model_source_takes_a_torch_dtype_by_name():
    assert ModelSource(zoo.NAME, dtype=torch.bfloat16).dtype == "bfloat16"
    assert ModelSource(zoo.NAME, dtype="float16").dtype == "float16"
    for bad in ("bf16", None):
        with pytest.raises(ValueError, match=r"dtype=.*: use one of"):
            ModelSource(zoo.NAME, dtype=bad)
