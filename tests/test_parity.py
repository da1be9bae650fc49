"""Acceptance 1 of the hooked-CLIP issue: outputs equal open_clip's and transformers' own forward
passes within 1e-5 (max-abs, float32) on real architectures with perturbed random weights."""

import open_clip
import pytest
import torch
from conftest import SENTENCES, fresh_open_clip, perturb_, random_pixels, shared_pair

import clip_lens

TOL = 1e-5


def assert_open_clip_parity(oc, hooked, name):
    tokens = open_clip.get_tokenizer(name)(SENTENCES)
    pixels = random_pixels(3, oc.visual.image_size[0])
    with torch.no_grad():
        text_ref, image_ref = oc.encode_text(tokens), oc.encode_image(pixels)
        logits_ref = oc.get_logits(pixels, tokens)[0]
        text, image = hooked.encode_text(tokens), hooked.encode_image(pixels)
        logits = hooked(text=tokens, image=pixels)
    assert logits.shape == (3, len(SENTENCES))
    torch.testing.assert_close(text, text_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(image, image_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(logits, logits_ref, atol=TOL, rtol=0)
    # the perturbed logit scale is what scales the logits (not the default 1/0.07)
    assert abs(hooked.logit_scale.item() - oc.logit_scale.item()) == 0
    assert abs(oc.logit_scale.item() - 4.6052) > 1e-3


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16"])
def test_open_clip_parity(name):
    oc, hooked = shared_pair(name)
    if name.endswith("quickgelu"):
        assert hooked.text.cfg.act_fn == "quick_gelu" and hooked.vision.cfg.act_fn == "quick_gelu"
    assert_open_clip_parity(oc, hooked, name)


@pytest.mark.slow
def test_open_clip_parity_vit_l14():
    oc = fresh_open_clip("ViT-L-14")
    assert_open_clip_parity(oc, clip_lens.HookedCLIP.from_open_clip(oc), "ViT-L-14")


def test_parity_variants_avg_pool_layer_scale_no_ln_pre():
    """Tower options open_clip configs use: mean pooling, LayerScale, no ln_pre, LN after pooling,
    a text projection with bias."""
    torch.manual_seed(1)
    oc = open_clip.model.CustomTextCLIP(
        embed_dim=32,
        vision_cfg=dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32, pool_type="avg",
                        ls_init_value=0.5, no_ln_pre=True, final_ln_after_pool=True),
        text_cfg=dict(context_length=77, vocab_size=49408, width=48, heads=4, layers=2,
                      ls_init_value=0.5, proj_type="linear", proj_bias=True),
    ).eval()
    perturb_(oc)
    hooked = clip_lens.HookedCLIP.from_open_clip(oc)
    assert hooked.vision.cfg.layer_scale and not hooked.vision.cfg.ln_pre and hooked.text.cfg.proj_bias
    assert_open_clip_parity(oc, hooked, "ViT-B-32")


def _hf_model(act: str, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=77, hidden_act=act),
        vision_config=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                           image_size=64, patch_size=16, hidden_act=act),
        projection_dim=48,
    )
    return perturb_(CLIPModel(cfg).eval(), seed=seed)


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def assert_hf_parity(hf, hooked):
    tokens = hooked.to_tokens(SENTENCES, trim=False)
    pixels = random_pixels(3, 64)
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=pixels)
        torch.testing.assert_close(hooked.encode_text(tokens), _features(hf.get_text_features(input_ids=tokens)), atol=TOL, rtol=0)
        torch.testing.assert_close(hooked.encode_image(pixels), _features(hf.get_image_features(pixel_values=pixels)), atol=TOL, rtol=0)
        torch.testing.assert_close(hooked(text=tokens, image=pixels), ref.logits_per_image, atol=TOL, rtol=0)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_huggingface_parity(act):
    hf = _hf_model(act)
    assert_hf_parity(hf, clip_lens.HookedCLIP.from_huggingface(hf))


def test_huggingface_directory_round_trip(tmp_path):
    hf = _hf_model("quick_gelu", seed=3)
    hf.save_pretrained(tmp_path / "clip")
    assert_hf_parity(hf, clip_lens.HookedCLIP.from_huggingface(tmp_path / "clip"))


def test_trimmed_and_full_context_runs_agree(vit_b32):
    _, model = vit_b32
    full = model.to_tokens(SENTENCES, trim=False)
    trimmed = model.to_tokens(SENTENCES)
    assert full.shape[1] == 77 and trimmed.shape[1] < 20
    assert int(trimmed.argmax(-1).max()) == trimmed.shape[1] - 1  # the longest EOT is the last slot
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(trimmed), model.encode_text(full), atol=1e-6, rtol=0)
    _, cache = model.run_with_cache(text=full, names_filter="text.blocks.0.hook_resid_pre")
    assert cache["text.blocks.0.hook_resid_pre"].shape[1] == trimmed.shape[1]
