"""Tokens and images: trimming, string tokens, preprocessing with the model's own transform."""

import numpy as np
import open_clip
import pytest
import torch
from conftest import SENTENCES
from PIL import Image


def test_to_tokens_matches_open_clip_tokenizer(vit_b32):
    _, model = vit_b32
    full = open_clip.get_tokenizer("ViT-B-32")(SENTENCES)
    trimmed = model.to_tokens(SENTENCES)
    assert torch.equal(trimmed, full[:, : trimmed.shape[1]])
    assert torch.all(full[:, trimmed.shape[1]:] == 0)


def test_to_str_tokens(vit_b32):
    _, model = vit_b32
    assert model.to_str_tokens("There are no giraffes.") == [
        "<start_of_text>", "there ", "are ", "no ", "gira", "ffes ", ". ", "<end_of_text>"]
    row = model.to_tokens(["x", "There are no giraffes."])[0]
    assert model.to_str_tokens(row) == ["<start_of_text>", "x ", "<end_of_text>"]


def test_to_pixels_matches_open_clip_preprocess(vit_b32, tmp_path):
    oc, model = vit_b32
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (180, 260, 3), dtype=np.uint8))
    path = tmp_path / "img.png"
    image.save(path)
    expected = preprocess(image)[None]
    torch.testing.assert_close(model.to_pixels(image), expected)
    torch.testing.assert_close(model.to_pixels([path, str(path)]), expected.repeat(2, 1, 1, 1))
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 [3, H, W]
    torch.testing.assert_close(model.to_pixels(raw), expected)


def test_missing_image_is_named(vit_b32, tmp_path):
    _, model = vit_b32
    with pytest.raises(FileNotFoundError, match="v7w_missing.jpg"):
        model.to_pixels([tmp_path / "v7w_missing.jpg"])


def test_bad_inputs_get_clear_errors(vit_b32):
    _, model = vit_b32
    with pytest.raises(ValueError, match=r"use model.to_tokens"):
        model.encode_text(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[batch, 3, 224, 224\]"):
        model.encode_image(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="needs text"):
        model()
    with pytest.raises(ValueError, match="stop_at_layer=13 is out of range"):
        model.text(model.to_tokens(["a"]), stop_at_layer=13)


def test_start_and_stop_at_layer_resume_exactly(vit_b32):
    _, model = vit_b32
    tokens = model.to_tokens(SENTENCES)
    with torch.no_grad():
        mid = model.text(tokens, stop_at_layer=5)
        resumed = model.text(tokens, residual=mid, start_at_layer=5)
        torch.testing.assert_close(resumed, model.text(tokens), atol=0, rtol=0)
        pixels = torch.randn(1, 3, 224, 224)
        mid = model.vision(pixels, stop_at_layer=12)
        assert torch.equal(model.vision(residual=mid, start_at_layer=12), model.vision(pixels))
