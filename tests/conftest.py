"""Shared fixtures: real open_clip architectures with random weights moved off their initial values.

Building a ViT is the slow part of most tests, so each architecture is built once per session and
shared; tests must not modify these models (use `fresh_open_clip` for that).
"""

from __future__ import annotations

import copy
import functools
import logging

import open_clip
import pytest
import torch

import clip_lens

logging.getLogger().setLevel(logging.ERROR)  # open_clip logs "initialized randomly" on each build

SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Move every LayerNorm gain and bias, linear bias, class/positional embedding and the logit
    scale away from its initial value (1, 0, ...), so that a wrong weight mapping cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim <= 1 or "embedding" in name or "logit_scale" in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    return model


def fresh_open_clip(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return perturb_(open_clip.create_model(name).eval(), seed=seed)


@functools.lru_cache(maxsize=None)
def shared_pair(name: str):
    """(open_clip model, HookedCLIP) for an architecture, built once per session."""
    oc = fresh_open_clip(name)
    return oc, clip_lens.HookedCLIP.from_open_clip(oc, tokenizer=open_clip.get_tokenizer(name))


@pytest.fixture(scope="session")
def vit_b32():
    return shared_pair("ViT-B-32")


@pytest.fixture(scope="session")
def tiny_model():
    """The shipped tiny CLIP (clip_lens/tiny-shapes), loaded once per session; do not modify it."""
    from clip_lens import tiny

    return clip_lens.HookedCLIP.from_pretrained(tiny.NAME)


@pytest.fixture(scope="session")
def tiny64(tiny_model):
    """The tiny CLIP in float64 (a copy, built once per session: the tiny model stays as it is;
    do not modify it), for comparisons at float64 rounding."""
    return copy.deepcopy(tiny_model).to(torch.float64)


@pytest.fixture(scope="session")
def vit_b32_image(vit_b32):
    """(pixels [1, 3, 224, 224], their ViT-B-32 image embedding [1, d_embed]): the other modality
    of text-tower patching tests."""
    _, model = vit_b32
    image = random_pixels(1, seed=5)
    with torch.no_grad():
        return image, model.encode_image(image)


SENTENCES = [
    "There are no giraffes.",
    "There are some giraffes.",
    "a photo of a cat sitting on a red sofa next to a window",
    "x",
]


@pytest.fixture(scope="session")
def sentences():
    return list(SENTENCES)


def tiny_hf_config():
    """A one-block transformers CLIPConfig (32 wide, 32 x 32 images), for loading tests."""
    import transformers

    return transformers.CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                "num_attention_heads": 2, "max_position_embeddings": 16},
                                   vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                                   projection_dim=16)


def existence_scenes(model, folder, n: int, seed: int):
    """Existence instances of `n` synthetic scenes (`clip_lens.data.shapes.export_valse` into
    `folder`), scored by `model`."""
    from clip_lens.data import shapes
    from clip_lens.studies.analyses import existence

    path = shapes.export_valse(folder, n, seed=seed)
    with torch.no_grad():
        return existence.prepare(model, path, images=folder / "images", progress=False)


def random_pixels(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def write_noise_images(names, folder, size: int = 32, seed: int = 0):
    """Generated stand-ins for dataset images (VALSE's own are not available here): uniform noise."""
    import numpy as np
    from PIL import Image

    folder = __import__("pathlib").Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
    return folder
