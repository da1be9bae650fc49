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


def path_in_folder(folder: Union[str, os.PathLike], name: Any, where: str) -> Path:
    """`folder / name` for a file name read from a data file, or a ValueError naming the entry
    when it points outside `folder` (an absolute path, `..`, or a link leading out): files listed
    in a dataset are read from its image folder only.

    Args:
        where: the entry, for the error (e.g. "VALSE instance 12").
    """
    folder = Path(folder)
    candidate = folder / str(name)
    base = folder.resolve()
    resolved = candidate.resolve()
    if Path(str(name)).is_absolute() or (resolved != base and base not in resolved.parents):
        raise ValueError(f"{where}: image file {str(name)!r} lies outside the image folder {folder}; refused")
    return candidate


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
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"Cannot read {path} as an image: {err}") from err
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"A raw image tensor must be [3, H, W]; got shape {tuple(image.shape)}")
        if image.is_floating_point():
            if not bool(torch.isfinite(image).all()):
                raise ValueError("A raw image tensor has NaN or infinite values")
            if float(image.min()) < 0 or float(image.max()) > 1:
                raise ValueError(f"A raw float image tensor takes values in [0, 1]; got {float(image.min()):.3g}.."
                                 f"{float(image.max()):.3g} (0-255 values are uint8 tensors; normalised pixels go to "
                                 "the model directly, not through to_pixels)")
        elif image.dtype != torch.uint8:
            raise ValueError(f"A raw image tensor is uint8 or float in [0, 1]; got {image.dtype}")
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(image.cpu())
    raise TypeError(f"Cannot read an image from {type(image).__name__}")


def to_pixels(images: Union[ImageLike, Sequence[ImageLike]], transform: Callable[[Image.Image], Tensor],
              device: Optional[Any] = None) -> Float[Tensor, "batch 3 height width"]:
    """Preprocess one image or a list of them into a pixel batch [batch, 3, H, W]."""
    if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, Tensor) and images.ndim == 3):
        images = [images]
    if len(images) == 0:
        raise ValueError("images is empty: give at least one image")
    with torch.device("cpu"):  # decoding and resizing are CPU work, whatever the default device
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
