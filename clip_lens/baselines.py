"""Subject-removed baseline images (docs/methods.md#subject-removed-baseline).

Image ablation replaces a component's output by its value on a baseline image. The mean-colour
image is far from any photo the model has seen; a subject-removed image keeps everything but the
subject of the caption:

- on synthetic scenes (`clip_lens.data.shapes`) exactly: `subject_removed(example)` renders the
  same scene, background and seed without the shapes the existence pair names;
- on photos approximately: `fill_mask(image, mask)` paints the subject's pixels (a segmentation
  mask the user gives) from the image's own pixels around them, and `fill_box(image, box)` its
  bounding box (a smooth diffusion fill, or the mean colour of a ring around it).

`clip_lens.studies.analyses.image_ablation.improvement_rates` sets image-ablation results under
several baselines side by side.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from clip_lens.checks import is_integer
from clip_lens.data import shapes

FILL_METHODS = ("diffusion", "ring")
RING_WIDTH = 3  # pixels around the box whose mean colour the "ring" fill takes

_COLOUR = "|".join(shapes.COLOURS)
_KIND = "|".join(shapes.SHAPES)
_PLURAL = "|".join(shapes.PLURALS.values())
_EXISTENCE_SENTENCE = re.compile(
    rf"There (?:is (?:a|no) (?:(?P<c1>{_COLOUR}) )?(?P<k1>{_KIND})|are (?:some|no) (?:(?P<c2>{_COLOUR}) )?(?P<k2>{_PLURAL}))\.")


# --- synthetic scenes: exact -----------------------------------------------------------------
def subject_of(example: shapes.Example) -> tuple[Optional[str], str]:
    """(colour or None, kind) the existence pair of `example` is about, read from its caption
    ("There is no red circle." -> ("red", "circle"); "There are some squares." -> (None, "square"))."""
    if example.kind != "existence":
        raise ValueError(f"example with seed {example.seed}: a {example.kind!r} example has no subject; "
                         "subject removal takes existence examples")
    match = _EXISTENCE_SENTENCE.fullmatch(example.caption)
    if match is None:
        raise ValueError(f"example with seed {example.seed}: caption {example.caption!r} is not an existence "
                         "sentence of the shapes generator")
    colour = match["c1"] or match["c2"]
    kind = match["k1"] or {plural: k for k, plural in shapes.PLURALS.items()}[match["k2"]]
    return colour, kind


def subject_shapes(example: shapes.Example) -> tuple[shapes.Shape, ...]:
    """The shapes of the example's scene that its subject names (every square for "squares");
    none when the subject is absent (negation in the caption: "There is no red circle.")."""
    colour, kind = subject_of(example)
    return tuple(s for s in example.scene.shapes if s.kind == kind and (colour is None or s.colour == colour))


def subject_removed(example: shapes.Example) -> Image.Image:
    """The example's image without its subject: the same scene, background and seed rendered with
    the subject's shapes left out. Equal to `shapes.image_of(example)` when the subject is absent."""
    return shapes.image_of(example, omit=subject_shapes(example))


# --- photos: a fill from the image's own background ----------------------------------------------
def check_box(box: Sequence, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """`box` (x0, y0, x1, y1) in pixels, x1 and y1 exclusive (PIL's crop convention), as ints; a
    ValueError naming the box when it is not four integers, empty, in the wrong order, reaches
    outside the image of `size` (width, height), or covers all of it (nothing to fill from)."""
    width, height = size
    if isinstance(box, (str, bytes)) or not hasattr(box, "__len__") or len(box) != 4 or not all(
            is_integer(v) for v in box):
        raise ValueError(f"box {box!r}: give four integer pixel coordinates (x0, y0, x1, y1)")
    x0, y0, x1, y1 = (int(v) for v in box)
    if x0 >= x1 or y0 >= y1:
        raise ValueError(f"box {box!r}: empty or in the wrong order; give x0 < x1 and y0 < y1 (x1, y1 exclusive)")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ValueError(f"box {box!r}: reaches outside the {width}x{height} image (0 <= x0 < x1 <= {width}, "
                         f"0 <= y0 < y1 <= {height})")
    if (x0, y0, x1, y1) == (0, 0, width, height):
        raise ValueError(f"box {box!r}: covers the whole {width}x{height} image; no background is left to fill from")
    return x0, y0, x1, y1


def fill_box(image: Image.Image, box: Sequence[int], method: str = "diffusion") -> Image.Image:
    """An RGB copy of `image` with the pixels inside `box` (x0, y0, x1, y1; x1, y1 exclusive)
    replaced by a fill from the pixels around it; every pixel outside the box is kept. As
    `fill_mask` with the box as the mask."""
    rgb = image.convert("RGB")
    x0, y0, x1, y1 = check_box(box, rgb.size)
    mask = np.zeros((rgb.size[1], rgb.size[0]), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return fill_mask(rgb, mask, method=method)


def check_mask(mask, size: tuple[int, int]) -> np.ndarray:
    """`mask` (a [height, width] boolean array, or a PIL image: non-zero is the subject) as a bool
    array; a ValueError when its shape is not the image's of `size` (width, height), it is empty,
    or it covers the whole image (nothing to fill from)."""
    width, height = size
    array = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
    if array.shape != (height, width):
        raise ValueError(f"mask has shape {array.shape}; the image is {width}x{height}, so give [{height}, {width}]")
    array = array.astype(bool)
    if not array.any():
        raise ValueError("mask is empty: it marks no pixel of the subject")
    if array.all():
        raise ValueError(f"mask covers the whole {width}x{height} image; no background is left to fill from")
    return array


def box_of(mask) -> tuple[int, int, int, int]:
    """The bounding box (x0, y0, x1, y1; x1, y1 exclusive) of a segmentation mask's pixels, e.g. to
    report or to fill a box instead of the mask's outline."""
    array = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask).astype(bool)
    if array.ndim != 2 or not array.any():
        raise ValueError(f"mask of shape {array.shape}: give a [height, width] mask marking at least one pixel")
    ys, xs = np.nonzero(array)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def fill_mask(image: Image.Image, mask, method: str = "diffusion") -> Image.Image:
    """An RGB copy of `image` with the pixels the segmentation `mask` marks (the subject) replaced
    by a fill from the pixels around them; every other pixel is kept.

    Args:
        mask: [height, width] booleans (or a PIL image, non-zero marking the subject).
        method: "diffusion" (default): each filled pixel the average of its four neighbours, the
            unmarked pixels held fixed (a harmonic fill: smooth, and continuous with the
            surroundings on every side); "ring": one flat colour, the mean of the unmarked pixels
            within `RING_WIDTH` pixels of the mask (Chebyshev distance).
    """
    if method not in FILL_METHODS:
        raise ValueError(f"fill method {method!r}: choose one of {list(FILL_METHODS)}")
    rgb = image.convert("RGB")
    marked = check_mask(mask, rgb.size)
    values = np.asarray(rgb, dtype=np.float64).copy()  # [H, W, 3]
    values[marked] = _harmonic_fill(values, marked) if method == "diffusion" else _ring_mean(values, marked)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "RGB")


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` grown by `radius` pixels in every direction (a square structuring element)."""
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        for step in range(1, radius + 1):
            shifted = np.zeros_like(out)
            ahead = [slice(None)] * 2
            behind = [slice(None)] * 2
            ahead[axis], behind[axis] = slice(step, None), slice(None, -step)
            shifted[tuple(ahead)] |= out[tuple(behind)]
            shifted[tuple(behind)] |= out[tuple(ahead)]
            grown |= shifted
        out = grown
    return out


def _ring_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mean colour [3] of the unmarked pixels within RING_WIDTH pixels of the mask."""
    ring = _dilate(mask, RING_WIDTH) & ~mask
    return values[ring].mean(axis=0)


def _neighbour_sum(u: np.ndarray) -> np.ndarray:
    """Each pixel's sum of its four neighbours' values inside the image ([H, W, 3])."""
    out = np.zeros_like(u)
    out[1:] += u[:-1]
    out[:-1] += u[1:]
    out[:, 1:] += u[:, :-1]
    out[:, :-1] += u[:, 1:]
    return out


def _harmonic_fill(values: np.ndarray, mask: np.ndarray, tolerance: float = 1e-3) -> np.ndarray:
    """The marked pixels' values [marked, 3] solving the discrete Laplace equation: each the mean
    of its neighbours inside the image, the unmarked pixels fixed (pixels on the image's edge have
    fewer neighbours). Solved by conjugate gradients to `tolerance` (in 0..255 units), on the
    mask's bounding box grown by one pixel."""
    x0, y0, x1, y1 = box_of(mask)
    height, width = mask.shape
    y0, x0, y1, x1 = max(y0 - 1, 0), max(x0 - 1, 0), min(y1 + 1, height), min(x1 + 1, width)
    inside, known_values = mask[y0:y1, x0:x1], values[y0:y1, x0:x1]
    degree = _neighbour_sum(np.ones(inside.shape + (1,)))[..., 0]
    # the window's border neighbours outside it are never marked pixels' neighbours (grown by one)
    known = np.where(inside[..., None], _neighbour_sum(np.where(inside[..., None], 0.0, known_values)), 0.0)

    def laplacian(u: np.ndarray) -> np.ndarray:  # degree * u minus the marked neighbours, on marked pixels
        return np.where(inside[..., None], degree[..., None] * u - _neighbour_sum(u), 0.0)

    u = np.where(inside[..., None], _ring_mean(values, mask), 0.0)  # start from the flat fill
    residual = known - laplacian(u)
    direction, size = residual.copy(), (residual * residual).sum()
    for _ in range(20 * (inside.shape[0] + inside.shape[1]) + 100):
        if np.abs(residual).max() < tolerance:
            break
        step = laplacian(direction)
        alpha = size / (direction * step).sum()
        u += alpha * direction
        residual -= alpha * step
        new_size = (residual * residual).sum()
        direction = residual + (new_size / size) * direction
        size = new_size
    return u[inside]


# --- comparing baselines -----------------------------------------------------------------------
