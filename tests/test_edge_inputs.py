"""Inputs at the edges that used to give a silent wrong result: 16-bit and float image files, tiny
images, non-finite embeddings and selections `patch` cannot apply, layers outside a tower, a pairs
run whose every pair is excluded, and a captioner given a model it does not read. Each test failed
before the fix (a result came back instead of the number or error asserted here)."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import random_pixels
from PIL import Image

import clip_lens
from clip_lens.cli import main
from clip_lens.patching import hook_name

TEXTS = ["There is a red circle.", "There are two blue squares in the picture."]


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """A 64x64 grey picture [H, W] uint8 with every value 0..255 in it."""
    return (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def image_emb(tiny_model):
    with torch.no_grad():
        return tiny_model.encode_image(random_pixels(2, size=64, seed=1))


# --- 1. image files -------------------------------------------------------------------------------
def test_16_bit_and_float_images_give_the_pixels_of_the_8_bit_picture(tiny_model, picture, tmp_path):
    Image.fromarray(picture).save(tmp_path / "eight.png")
    Image.fromarray(picture.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")       # mode "I;16"
    Image.fromarray(picture.astype(np.int32) * 257).save(tmp_path / "int32.tiff")         # mode "I"
    Image.fromarray(picture.astype(np.float32) / 255).save(tmp_path / "float.tiff")       # mode "F", in [0, 1]
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16" and Image.open(tmp_path / "float.tiff").mode == "F"
    expected = tiny_model.to_pixels(str(tmp_path / "eight.png"))
    for name in ("sixteen.png", "int32.tiff", "float.tiff"):
        torch.testing.assert_close(tiny_model.to_pixels(str(tmp_path / name)), expected, rtol=0, atol=0, msg=name)
    # a PIL image handed over directly is read by the same rule
    torch.testing.assert_close(tiny_model.to_pixels(Image.open(tmp_path / "sixteen.png")), expected, rtol=0, atol=0)


def test_a_float_image_outside_0_1_is_refused_naming_the_file_and_its_range(tiny_model, picture, tmp_path):
    Image.fromarray(picture.astype(np.float32)).save(tmp_path / "float255.tiff")
    with pytest.raises(ValueError, match=r"float255.tiff: a float image \(PIL mode 'F'\) with values 0..255"):
        tiny_model.to_pixels(str(tmp_path / "float255.tiff"))
    nan = picture.astype(np.float32) / 255
    nan[3, 3] = np.nan
    with pytest.raises(ValueError, match=r"image 1: a float image \(PIL mode 'F'\) with NaN"):
        tiny_model.to_pixels([Image.fromarray(picture), Image.fromarray(nan)])


def test_a_tiny_image_is_warned_about_by_name(tiny_model, tmp_path):
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "dot.png")
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "small.png")
    with pytest.warns(UserWarning, match=r"dot.png is 1x1 pixels, upscaled more than 8x to the model's 64x64 input"):
        tiny_model.to_pixels([str(tmp_path / "small.png"), str(tmp_path / "dot.png")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 16 px of a 64 px input: an upscaling of 4, no warning
        tiny_model.to_pixels(str(tmp_path / "small.png"))


# --- 2. and 3. patch ------------------------------------------------------------------------------
def test_non_finite_embeddings_of_the_other_modality_are_refused_by_row(tiny_model, image_emb):
    bad = image_emb.clone()
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"image: embedding row 1 has NaN or infinite values"):
        clip_lens.patch(tiny_model, target=TEXTS, image=bad, layers=[1], intervention="zero", progress=False)
    text_emb = tiny_model.encode_text(tiny_model.to_tokens(TEXTS)).detach()
    text_emb[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"text: embedding row 0 has NaN or infinite values"):
        clip_lens.patch(tiny_model, target=random_pixels(2, size=64), text=text_emb, layers=[1], intervention="zero",
                        progress=False)
    with pytest.raises(ValueError, match=r"mean= has NaN or infinite values"):
        clip_lens.patch(tiny_model, target=TEXTS, image=image_emb, layers=[1], intervention="mean",
                        mean=torch.full((64,), float("nan")), progress=False)


@pytest.mark.parametrize("selection, hook, message", [
    (dict(heads=[1]), "resid", r"heads=\[1\] is read only by hook='z', not by hook='resid'"),
    (dict(heads=[1]), "mlp_post", r"heads=\[1\] is read only by hook='z', not by hook='mlp_post'"),
    (dict(neurons=[3]), "z", r"neurons=\[3\] is read only by hook='mlp_post', not by hook='z'"),
    (dict(heads=[0]), ["attn_out", "mlp_out"], r"heads=\[0\] is read only by hook='z', not by hook=\['attn_out', 'mlp_out'\]"),
    (dict(latents=[0]), "resid", r"latents=\[0\] is read only with sae="),
])
def test_a_unit_selection_the_hook_kind_cannot_apply_is_refused(tiny_model, image_emb, selection, hook, message):
    with pytest.raises(ValueError, match=message):
        clip_lens.patch(tiny_model, target=TEXTS, image=image_emb, hook=hook, layers=[1], intervention="zero",
                        progress=False, **selection)


# --- 4. hook names --------------------------------------------------------------------------------
def test_hook_name_refuses_a_layer_outside_the_tower():
    assert hook_name("resid", 3, 3) == "blocks.2.hook_resid_post"
    assert hook_name("z", 2, 3) == "blocks.2.attn.hook_z"
    with pytest.raises(ValueError, match=r"layer 99 is outside the layers of hook kind 'resid' in a tower of 3 blocks \(0..3\)"):
        hook_name("resid", 99, 3)
    with pytest.raises(ValueError, match=r"layer 3 is outside the layers of hook kind 'z' in a tower of 3 blocks \(0..2\)"):
        hook_name("z", 3, 3)
    with pytest.raises(ValueError, match=r"layer -1 is outside"):
        hook_name("mlp_out", -1, 3)
    with pytest.raises(ValueError, match=r"Unknown hook kind 'resid_pre'"):
        hook_name("resid_pre", 0, 3)


# --- 5. pairs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("study", ["heads", "causal-tracing", "ablate-heads", "all"])
def test_a_pairs_run_with_every_pair_excluded_fails_with_the_reasons(study, tmp_path, capsys):
    pd.DataFrame({"caption": ["There is a red circle.", "A cat.", "A red cat and a dog."],
                  "foil": ["There is no red circle at all.", "A big cat here.", "A blue cat and a cow."]}).to_csv(
        tmp_path / "p.csv", index=False)
    out = tmp_path / "out"
    assert main(["pairs", study, "--model", "clip_lens/tiny-shapes", "--pairs", str(tmp_path / "p.csv"), "--out",
                 str(out), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "every pair was excluded (3 in 1 file(s))" in err
    assert "unequal token lengths: 2" in err and "differs in more than one span of tokens: 1" in err
    assert not (out / "report.html").exists()


def test_a_comparison_whose_every_task_keeps_no_pair_fails_with_the_reasons(tmp_path, capsys):
    pd.DataFrame({"caption": ["There is a red circle.", "A cat."],
                  "foil": ["There is no red circle at all.", "A big cat here."]}).to_csv(tmp_path / "p.csv", index=False)
    assert main(["compare-tasks", "--model", "clip_lens/tiny-shapes", "--pairs", str(tmp_path / "p.csv"), "--out",
                 str(tmp_path / "out"), "--quiet"]) != 0
    assert "every pair was excluded (2 in 1 task(s)), so there is nothing to run. Exclusions per reason: unequal " \
           "token lengths: 2" in capsys.readouterr().err


# --- 6. captioners --------------------------------------------------------------------------------
def test_a_captioner_with_its_own_tower_refuses_a_model(tiny_model):
    from test_captioning import vision_encoder_decoder

    from clip_lens.captioning import HuggingFaceCaptioner

    captioner = HuggingFaceCaptioner(vision_encoder_decoder())
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"model= is not read by .*its own vision tower \(captioner.vision\), so hooks "
                                         r"on model.vision would not change its captions"):
        captioner.caption(pixels, tiny_model)
    with pytest.raises(ValueError, match=r"model= is not read by"):
        captioner.to_pixels([Image.new("RGB", (32, 32))], tiny_model)
    assert captioner.vision_tower() is captioner.vision
    assert captioner.features(pixels).shape == (2, 17, 48)
