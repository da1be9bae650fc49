"""Photometric measures of an image: brightness, contrast and colourfulness
(docs/methods.md#joint-covariate-fit).

Each takes a PIL image or an RGB tensor [3, H, W] with values in [0, 1], and measures the
gamma-encoded values as stored (no conversion to linear light):
- brightness: the mean luma, with the Rec. 601 weights 0.299 R + 0.587 G + 0.114 B;
- contrast: RMS contrast, the standard deviation of the luma over the pixels (population form);
- colourfulness: Hasler and Suesstrunk's measure, on the [0, 1] scale (1/255 of the value on the
  0-255 scale of their paper).
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
from PIL import Image

REC601 = (0.299, 0.587, 0.114)  # luma weights of R, G, B
ImageInput = Union[Image.Image, torch.Tensor]


def rgb_array(image: ImageInput) -> np.ndarray:
    """The image as float64 [H, W, 3] in [0, 1]; a ValueError names a bad shape or range."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected a PIL image or a tensor [3, H, W], got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"expected an RGB tensor [3, H, W], got shape {list(image.shape)}")
    array = image.detach().to("cpu", torch.float64).numpy().transpose(1, 2, 0)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError(f"tensor values must lie in [0, 1], got min {array.min():g} and max {array.max():g}")
    return array


def luma(image: ImageInput) -> np.ndarray:
    """Per-pixel luma [H, W] with the Rec. 601 weights."""
    return rgb_array(image) @ np.asarray(REC601)


def brightness(image: ImageInput) -> float:
    """Mean luma (Rec. 601) in [0, 1]: 0 for black, 1 for white."""
    return float(luma(image).mean())


def contrast(image: ImageInput) -> float:
    """RMS contrast: the standard deviation of the luma over the pixels, in [0, 0.5]."""
    return float(luma(image).std())


def colourfulness(image: ImageInput) -> float:
    """Hasler and Suesstrunk's colourfulness on the [0, 1] scale: with the opponent channels
    rg = R - G and yb = (R + G) / 2 - B over the pixels, sqrt(sd(rg)^2 + sd(yb)^2) +
    0.3 * sqrt(mean(rg)^2 + mean(yb)^2). 0 for any grey image."""
    rgb = rgb_array(image)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = (rgb[..., 0] + rgb[..., 1]) / 2 - rgb[..., 2]
    spread = np.hypot(rg.std(), yb.std())
    centre = np.hypot(rg.mean(), yb.mean())
    return float(spread + 0.3 * centre)
