"""Attention cancellation and attention maps: value-only attention against a hand-computed forward
pass, settings, image folders and captions files, attention distance on known patterns."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import random_pixels, write_noise_images

from clip_lens.data.image_sets import ImageSet, caption_targets, load_captions, load_image_folder
from clip_lens.studies.analyses import attention_cancellation, attention_maps


def value_only_forward(tower, pixels, cancelled):
    """The vision forward pass written out, attention replaced by out_proj(V) in `cancelled` blocks."""
    x = tower.embed_pixels(pixels)
    d = tower.cfg.d_model
    for b, block in enumerate(tower.blocks):
        h = block.ln1(x)
        if b in cancelled:
            v = F.linear(h, block.attn.qkv_weight[2 * d:], block.attn.qkv_bias[2 * d:])
            attn = F.linear(v, block.attn.out_weight, block.attn.out_bias)
        else:
            attn = block.attn(h)
        x = x + attn
        x = x + block.mlp(block.ln2(x))
    return tower.pool(x)


def test_value_only_attention_equals_a_hand_computed_forward(vit_b32):
    _, model = vit_b32
    pixels = random_pixels(2, seed=31)
    settings = {"2": (1,), "1-3": (0, 1, 2), "12": (11,), "1-12": tuple(range(12))}
    images = pd.DataFrame({"image": ["a.png", "b.png"], "label": ["x", "y"]})
    result = attention_cancellation.run(model, ImageSet(images, ["a x", "a y", "a z"], np.array([0, 1]), "two images"),
                                        settings=settings, pixels=pixels, progress=False)
    text = model.encode_text(model.to_tokens(["a x", "a y", "a z"]))
    with torch.no_grad():
        for s, layers in enumerate([(), *settings.values()]):
            emb = value_only_forward(model.vision, pixels, set(layers))
            logits = model.logit_scale.exp() * F.normalize(emb, dim=-1) @ F.normalize(text, dim=-1).T
            np.testing.assert_allclose(result.logits[s], logits.numpy(), atol=1e-4)
    pred = result.predictions()
    assert list(pred["setting"].unique()) == ["baseline", "2", "1-3", "12", "1-12"]
    best = result.logits.argmax(-1)
    assert (pred["correct"].to_numpy() == (best == np.array([0, 1])[None]).reshape(-1)).all()
    summary = result.summary().set_index("setting")
    assert summary.loc["1-3", "blocks"] == "0,1,2"  # setting names keep the study's 1-based layers; tables count from 0
    assert summary.loc["baseline", "accuracy"] == pytest.approx((best[0] == [0, 1]).mean())


def test_settings_parse_one_based_layers():
    assert attention_cancellation.parse_settings("1 4-6 1,5,9", 12) == {"1": (0,), "4-6": (3, 4, 5), "1,5,9": (0, 4, 8)}
    with pytest.raises(ValueError, match="layers run 1..12"):
        attention_cancellation.parse_settings("0-3", 12)
    default = attention_cancellation.default_settings(12)
    assert len(default) == 12 + 8 and default["10-12"] == (9, 10, 11) and default["1-12"] == tuple(range(12))
    six = attention_cancellation.default_settings(6)
    assert six["1-2"] == (0, 1) and six["1-6"] == tuple(range(6))


def test_image_folders_and_captions(tmp_path):
    write_noise_images(["a.png", "b.jpg"], tmp_path / "flat")
    assert load_image_folder(tmp_path / "flat")["label"].isna().all()
    write_noise_images(["1.png"], tmp_path / "classes" / "cat")
    write_noise_images(["2.png", "3.png"], tmp_path / "classes" / "dog")
    frame = load_image_folder(tmp_path / "classes")
    assert frame["label"].tolist() == ["cat", "dog", "dog"]
    (tmp_path / "flat" / "labels.csv").write_text("image,label\nb.jpg,dog\na.png,a photo of a cat\n")
    frame = load_image_folder(tmp_path / "flat")
    assert frame["label"].tolist() == ["dog", "a photo of a cat"] and frame["image"][0].endswith("b.jpg")
    (tmp_path / "caps.txt").write_text("dog\ta photo of a dog\n# comment\n\na photo of a cat\n")
    captions, by_label = load_captions(tmp_path / "caps.txt")
    assert captions == ["a photo of a dog", "a photo of a cat"]
    assert caption_targets(frame["label"], by_label).tolist() == [0, 1]
    with pytest.raises(ValueError, match="labels without a caption: \\['horse'\\]"):
        caption_targets(["horse"], by_label)
    (tmp_path / "flat" / "labels.csv").write_text("image,label\nnothere.png,dog\n")
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        load_image_folder(tmp_path / "flat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        load_image_folder(tmp_path / "empty")


def test_attention_distance_on_known_patterns():
    grid = (3, 3)
    n = 1 + 9
    identity = torch.eye(n)[None]
    assert attention_maps.attention_distance(identity, grid).item() == pytest.approx(0.0)
    # every query patch attends only to the class token and to patch (0, 0): distance from each patch to the corner
    pattern = torch.zeros(1, n, n)
    pattern[:, :, 0], pattern[:, :, 1] = 0.5, 0.5
    coords = [(r, c) for r in range(3) for c in range(3)]
    expected = np.mean([np.hypot(r, c) for r, c in coords])
    assert attention_maps.attention_distance(pattern, grid).item() == pytest.approx(expected)
    maps = attention_maps.class_token_attention(torch.arange(n * n, dtype=torch.float).view(n, n), grid)
    assert maps.shape == (3, 3) and maps[0, 0] == 1 and maps[2, 2] == 9


def test_mean_attention_distance_and_maps_on_a_real_tower(vit_b32):
    _, model = vit_b32
    pixels = random_pixels(2, seed=33)
    table = attention_maps.mean_attention_distance(model, pixels)
    assert len(table) == 12 * 12 and (table["distance"] > 0).all()
    grid = model.vision.cfg.grid_size
    assert (table["distance"] < np.hypot(grid[0] - 1, grid[1] - 1)).all()
    pattern = attention_maps.patterns(model, pixels[:1], [3])
    maps = attention_maps.class_token_attention(pattern[0, 0], grid)
    assert maps.shape == (12, *grid) and torch.all(maps.sum(dim=(1, 2)) <= 1 + 1e-5)
    fig = attention_maps.attention_map_figure(attention_maps.model_view(model, pixels[0]), maps, "maps")
    assert len(fig.data) == 2 * 12
