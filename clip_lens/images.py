"""Images to pixel tensors with a model's own preprocessing (open_clip's eval transform)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

ImageLike = Union[str, os.PathLike, Image.Image, Tensor]


def default_preprocess_cfg(image_size: tuple[int, int]) -> dict:
    """open_clip's default preprocessing (OpenAI mean/std, bicubic, shortest-side resize)."""
    from open_clip.transform import PreprocessCfg

    cfg = asdict(PreprocessCfg())
    cfg["size"] = tuple(image_size)
    return cfg


def build_transform(preprocess_cfg: dict) -> Callable[[Image.Image], Tensor]:
    """open_clip's evaluation transform for a preprocessing config."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    known = PreprocessCfg.__dataclass_fields__.keys()
    return image_transform_v2(PreprocessCfg(**{k: v for k, v in preprocess_cfg.items() if k in known}), is_train=False)


def load_image(image: ImageLike) -> Image.Image:
    """A PIL image from a path, a PIL image, or a raw image tensor [3, H, W] (uint8, or float in [0, 1]).

    Raises FileNotFoundError naming the file when a path does not exist.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"Image file not found: {path}")
        with Image.open(path) as img:
            return img.convert("RGB")
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"A raw image tensor must be [3, H, W]; got shape {tuple(image.shape)}")
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(image.cpu())
    raise TypeError(f"Cannot read an image from {type(image).__name__}")


def to_pixels(images: Union[ImageLike, Sequence[ImageLike]], transform: Callable[[Image.Image], Tensor],
              device: Optional[Any] = None) -> Float[Tensor, "batch 3 height width"]:
    """Preprocess one image or a list of them into a pixel batch [batch, 3, H, W]."""
    if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, Tensor) and images.ndim == 3):
        images = [images]
    pixels = torch.stack([transform(load_image(img)) for img in images])
    return pixels.to(device) if device is not None else pixels


def mean_colour_pixels(pixels: Float[Tensor, "batch 3 height width"], mean: Sequence[float], std: Sequence[float],
                       grey: bool = False) -> Float[Tensor, "batch 3 height width"]:
    """Each image replaced by one constant colour: its mean over all pixels, per channel (or, with
    `grey`, over the channels too), taken in the image's own [0, 1] colour space (the model's
    normalisation `(x - mean) / std` undone, then redone).

    Args:
        pixels: model inputs, normalised with `mean` / `std` (e.g. from `HookedCLIP.to_pixels`).
        mean, std: the per-channel normalisation (`model.preprocess_cfg["mean"]`, `["std"]`).
    """
    m = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    colour = (pixels * s + m).mean(dim=(2, 3), keepdim=True)  # [batch, 3, 1, 1] in [0, 1] units
    if grey:
        colour = colour.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    return ((colour - m) / s).expand_as(pixels).clone()
