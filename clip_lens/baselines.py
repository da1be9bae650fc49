"""Subject-removed baseline images (docs/methods.md#subject-removed-baseline).

Image ablation replaces a component's output by its value on a baseline image. The mean-colour
image is far from any photo the model has seen; a subject-removed image keeps everything but the
subject of the caption:

- on synthetic scenes (`clip_lens.data.shapes`) exactly: `subject_removed(example)` renders the
  same scene, background and seed without the shapes the existence pair names;
- on photos approximately: `fill_box(image, box)` paints the subject's box from the image's own
  pixels around it (a smooth diffusion fill, or the mean colour of a ring around the box).

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
    replaced by a fill from the pixels around it; every pixel outside the box is kept.

    Args:
        method: "diffusion" (default): each filled pixel the average of its four neighbours, the
            pixels just outside the box held fixed (a harmonic fill: smooth, and continuous with
            the surroundings on every side); "ring": one flat colour, the mean of the pixels within
            `RING_WIDTH` pixels outside the box.
    """
    if method not in FILL_METHODS:
        raise ValueError(f"fill method {method!r}: choose one of {list(FILL_METHODS)}")
    rgb = image.convert("RGB")
    x0, y0, x1, y1 = check_box(box, rgb.size)
    values = np.asarray(rgb, dtype=np.float64).copy()  # [H, W, 3]
    fill = _harmonic_fill(values, (x0, y0, x1, y1)) if method == "diffusion" else _ring_mean(values, (x0, y0, x1, y1))
    values[y0:y1, x0:x1] = fill
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "RGB")


def _ring_mean(values: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The mean colour [3] of the image's pixels within RING_WIDTH pixels outside the box."""
    x0, y0, x1, y1 = box
    height, width = values.shape[:2]
    outer = values[max(y0 - RING_WIDTH, 0):min(y1 + RING_WIDTH, height), max(x0 - RING_WIDTH, 0):min(x1 + RING_WIDTH, width)]
    inner_sum = values[y0:y1, x0:x1].sum(axis=(0, 1))
    count = outer.shape[0] * outer.shape[1] - (y1 - y0) * (x1 - x0)
    return (outer.sum(axis=(0, 1)) - inner_sum) / count


def _harmonic_fill(values: np.ndarray, box: tuple[int, int, int, int], tolerance: float = 1e-3) -> np.ndarray:
    """The box's pixels [h, w, 3] solving the discrete Laplace equation: each the mean of its
    neighbours inside the image, the pixels bordering the box fixed (sides on the image's edge
    have no neighbour there). Solved by conjugate gradients to `tolerance` (in 0..255 units)."""
    x0, y0, x1, y1 = box
    height, width = values.shape[:2]
    h, w = y1 - y0, x1 - x0
    degree = np.full((h, w), 4.0)
    known = np.zeros((h, w, 3))
    for present, rows, cols, border in ((y0 > 0, 0, slice(None), lambda: values[y0 - 1, x0:x1]),
                                        (y1 < height, -1, slice(None), lambda: values[y1, x0:x1]),
                                        (x0 > 0, slice(None), 0, lambda: values[y0:y1, x0 - 1]),
                                        (x1 < width, slice(None), -1, lambda: values[y0:y1, x1])):
        if present:
            known[rows, cols] += border()
        else:
            degree[rows, cols] -= 1

    def laplacian(u: np.ndarray) -> np.ndarray:  # degree * u minus the unknown neighbours
        out = degree[..., None] * u
        out[1:] -= u[:-1]
        out[:-1] -= u[1:]
        out[:, 1:] -= u[:, :-1]
        out[:, :-1] -= u[:, 1:]
        return out

    u = np.broadcast_to(_ring_mean(values, box), (h, w, 3)).copy()  # start from the flat fill
    residual = known - laplacian(u)
    direction, size = residual.copy(), (residual * residual).sum()
    for _ in range(20 * (h + w) + 100):
        if np.abs(residual).max() < tolerance:
            break
        step = laplacian(direction)
        alpha = size / (direction * step).sum()
        u += alpha * direction
        residual -= alpha * step
        new_size = (residual * residual).sum()
        direction = residual + (new_size / size) * direction
        size = new_size
    return u


# --- comparing baselines -----------------------------------------------------------------------
