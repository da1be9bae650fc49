"""Images to pixel tensors with a model's own preprocessing (open_clip's eval transform)."""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
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


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL modes of 16-bit files ("I": 32-bit ints)
SMALL_IMAGE_FACTOR = 8  # an image upscaled more than this on a side is warned about (see `to_pixels`)


def eight_bit_rgb(img: Image.Image, name: str) -> Image.Image:
    """An RGB image with 8-bit values, read by the rule of its PIL mode.

    PIL's own `convert("RGB")` clips every value above 255, so it turns a 16-bit image white and
    a float image in [0, 1] black; here those modes are scaled instead:

    - 16-bit ("I;16*") and 32-bit integer ("I", as PIL opens some 16-bit files) images are read
      as values in 0..65535 and scaled to 0..255 (v * 255 / 65535, rounded); an "I" image with
      values outside 0..65535 is refused, naming the image and its range;
    - float images ("F", e.g. a float TIFF) are read as intensities in [0, 1] and scaled to
      0..255 (rounded); values outside [0, 1], NaN or infinities are refused, naming the image
      and its range (a float image in another range has no scale we could guess: 0..255, or HDR);
    - every other mode goes through PIL's `convert("RGB")` (alpha dropped, palettes looked up).

    Args:
        name: the image in errors (its file, or "image i" of a list).
    """
    if img.mode not in SIXTEEN_BIT_MODES and img.mode != "F":
        return img.convert("RGB")
    values = np.asarray(img, dtype=np.float64)  # [H, W]
    finite = bool(np.isfinite(values).all())
    low, high = (float(values.min()), float(values.max())) if finite and values.size else (0.0, 0.0)
    if img.mode == "F":
        if not finite or low < 0 or high > 1:
            shown = "NaN or infinite values" if not finite else f"values {low:.4g}..{high:.4g}"
            raise ValueError(f"{name}: a float image (PIL mode 'F') with {shown}; float images are read as "
                             "intensities in [0, 1]: scale it to [0, 1], or save it as an 8-bit image")
        scaled = values * 255
    else:
        if low < 0 or high > 65535:
            raise ValueError(f"{name}: an integer image (PIL mode {img.mode!r}) with values {low:.0f}..{high:.0f}; "
                             "integer images are read as 16-bit (0..65535): save it as an 8-bit or 16-bit image")
        scaled = values * (255 / 65535)
    return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")


def load_image(image: ImageLike, name: Optional[str] = None) -> Image.Image:
    """A PIL image from a path, a PIL image, or a raw image tensor [3, H, W] (uint8, or float in [0, 1]).

    16-bit and float images are scaled to 8 bits by `eight_bit_rgb`'s rules (or refused, naming the
    file). Raises FileNotFoundError naming the file when a path does not exist.

    Args:
        name: the image in errors when it is not a path (default "the image").
    """
    if isinstance(image, Image.Image):
        if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
            return eight_bit_rgb(image, name or getattr(image, "filename", "") or "the image")
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"Image file not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()
        except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"Cannot read {path} as an image: {err}") from err
        return eight_bit_rgb(img, str(path))
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


def warn_if_small(img: Image.Image, name: str, input_size: Sequence[int]) -> None:
    """A warning naming the image when a side of it is under 1/SMALL_IMAGE_FACTOR of the model's
    input (height, width): most of the pixels the model sees are then interpolation (a 1x1 image
    becomes one flat colour). A warning, not an error: small images are sometimes meant (icons, CIFAR)."""
    width, height = img.size
    if height * SMALL_IMAGE_FACTOR < input_size[0] or width * SMALL_IMAGE_FACTOR < input_size[1]:
        warnings.warn(f"{name} is {width}x{height} pixels, upscaled more than {SMALL_IMAGE_FACTOR}x to the model's "
                      f"{input_size[1]}x{input_size[0]} input: most of what the model sees is interpolation",
                      stacklevel=3)


def _name(image: ImageLike, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return getattr(image, "filename", "") or f"image {index}"


def to_pixels(images: Union[ImageLike, Sequence[ImageLike]], transform: Callable[[Image.Image], Tensor],
              device: Optional[Any] = None) -> Float[Tensor, "batch 3 height width"]:
    """Preprocess one image or a list of them into a pixel batch [batch, 3, H, W]. An image far
    smaller than the model's input is warned about by name (`warn_if_small`)."""
    if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, Tensor) and images.ndim == 3):
        images = [images]
    if len(images) == 0:
        raise ValueError("images is empty: give at least one image")
    batch = []
    with torch.device("cpu"):  # decoding and resizing are CPU work, whatever the default device
        for i, image in enumerate(images):
            img = load_image(image, name=_name(image, i))
            batch.append(transform(img))
            warn_if_small(img, _name(image, i), tuple(batch[-1].shape[-2:]))
    pixels = torch.stack(batch)
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
