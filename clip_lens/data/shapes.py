"""Synthetic scenes of coloured shapes with captions and foils in the VALSE existence style.

A scene is a 64 x 64 image with zero to three shapes (circle, square, triangle) of different
colours, sizes and places. Its existence pairs come in two placements of the negation:
- negation in the foil: caption "There is a red circle." (true), foil "There is no red circle.";
- negation in the caption: caption "There is no blue square." (true: absent), foil "There is a blue square.";
and the same with shape names alone ("There are some squares." / "There are no squares.").
Colour-swap and count pairs serve as extra hard negatives in training. Everything is determined by
the seed; `export_valse` writes a VALSE-format JSON file and an image folder, so every study runs on
the scenes unchanged.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Optional, Union

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SIZE = 64
MAX_OBJECTS = 3


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: int  # centre
    y: int
    r: int  # half size


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]

    def has(self, kind: Optional[str] = None, colour: Optional[str] = None) -> bool:
        return any((kind is None or s.kind == kind) and (colour is None or s.colour == colour) for s in self.shapes)


def random_scene(rng: random.Random) -> Scene:
    """Zero to three shapes; no two of the same colour and kind, kept apart so none hides another."""
    n = rng.choice([0, 1, 1, 2, 2, 3, 3])
    shapes: list[Shape] = []
    for _ in range(50):
        if len(shapes) == n:
            break
        kind, colour, r = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randint(6, 13)
        x, y = rng.randint(r + 1, SIZE - r - 2), rng.randint(r + 1, SIZE - r - 2)
        if any(s.kind == kind and s.colour == colour for s in shapes):
            continue
        if any(abs(s.x - x) < s.r + r + 2 and abs(s.y - y) < s.r + r + 2 for s in shapes):
            continue
        shapes.append(Shape(kind, colour, x, y, r))
    return Scene(tuple(shapes))


def render(scene: Scene, rng: Optional[random.Random] = None, omit: Collection[Shape] = ()) -> Image.Image:
    """The scene as a 64 x 64 RGB image on a light, slightly varied background.

    Args:
        omit: shapes of the scene left undrawn; the background (drawn from `rng` first) and every
            other shape are as in the full render; where no shape overlaps another (as in
            `random_scene`), the image differs from the full one only in the omitted shapes' pixels.
    """
    rng = rng or random.Random(0)
    shade = rng.randint(225, 250)
    image = Image.new("RGB", (SIZE, SIZE), (shade, shade, shade - rng.randint(0, 10)))
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        if s in omit:
            continue
        box = (s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.x, s.y - s.r), (s.x - s.r, s.y + s.r), (s.x + s.r, s.y + s.r)], fill=fill)
    return image


def describe(scene: Scene) -> str:
    """The scene in one sentence, shapes from left to right: "There is a red circle.",
    "There is a red circle and a blue square.", "There is a red circle, a blue square and a
    green triangle.", "There are no shapes." (what the shipped captioner learns to say)."""
    names = [f"a {s.colour} {s.kind}" for s in sorted(scene.shapes, key=lambda s: (s.x, s.y))]
    if not names:
        return "There are no shapes."
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"There is {listed}."


def one_shape_scene(rng: random.Random) -> Scene:
    """A scene with exactly one shape, sized and placed as in `single_shape_set`."""
    r = rng.randint(8, 14)
    return Scene((Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randint(r + 1, SIZE - r - 2),
                        rng.randint(r + 1, SIZE - r - 2), r),))


def _subject(rng: random.Random, scene: Scene, present: bool) -> Optional[tuple[str, str]]:
    """(singular phrase, plural phrase) of a subject present in / absent from the scene."""
    for _ in range(30):
        coloured = rng.random() < 0.7
        kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS)) if coloured else None
        if scene.has(kind, colour) == present:
            return (f"{colour} {kind}" if colour else kind), (f"{colour} {PLURALS[kind]}" if colour else PLURALS[kind])
    return None


def existence_pair(scene: Scene, rng: random.Random, negation_in: str) -> Optional[tuple[str, str]]:
    """(caption, foil) for the scene, the negated sentence being the foil or the caption.

    Negation in the foil: the subject is present ("There is a red circle." / "There is no red circle.");
    negation in the caption: it is absent ("There is no red circle." / "There is a red circle.").
    Plural forms take "some" ("There are some squares." / "There are no squares.").
    """
    subject = _subject(rng, scene, present=negation_in == "foil")
    if subject is None:
        return None
    singular, plural = subject
    if rng.random() < 0.5:
        positive, negated = f"There is a {singular}.", f"There is no {singular}."
    else:
        positive, negated = f"There are some {plural}.", f"There are no {plural}."
    return (positive, negated) if negation_in == "foil" else (negated, positive)


def colour_pair(scene: Scene, rng: random.Random) -> Optional[tuple[str, str]]:
    """A colour swap: ("There is a red circle." true, "There is a blue circle." false)."""
    if not scene.shapes:
        return None
    s = rng.choice(scene.shapes)
    others = [c for c in COLOURS if not scene.has(s.kind, c)]
    if not others:
        return None
    return f"There is a {s.colour} {s.kind}.", f"There is a {rng.choice(others)} {s.kind}."


def count_pair(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """The number of shapes: ("There are two shapes." true, "There are three shapes." false)."""
    words = ["no", "one", "two", "three"]
    n = len(scene.shapes)
    wrong = rng.choice([k for k in range(len(words)) if k != n])
    say = lambda k: "There is one shape." if k == 1 else f"There are {words[k]} shapes."  # noqa: E731
    return say(n), say(wrong)


@dataclass(frozen=True)
class Example:
    """One scene with a true caption and a false foil; `kind` is existence / colour / count."""

    scene: Scene
    caption: str
    foil: str
    kind: str
    negation_in: Optional[str]
    seed: int


def examples(n: int, seed: int = 0, kinds: tuple[str, ...] = ("existence",)) -> Iterator[Example]:
    """`n` examples, deterministic from `seed`; existence pairs alternate the negation placement."""
    rng = random.Random(seed)
    made = 0
    while made < n:
        scene_seed = rng.randrange(2**31)
        local = random.Random(scene_seed)
        scene = random_scene(local)
        kind = rng.choice(kinds)
        negation_in = None
        if kind == "existence":
            negation_in = "foil" if made % 2 == 0 else "caption"
            pair = existence_pair(scene, local, negation_in)
        elif kind == "colour":
            pair = colour_pair(scene, local)
        else:
            pair = count_pair(scene, local)
        if pair is None:
            continue
        yield Example(scene, pair[0], pair[1], kind, negation_in, scene_seed)
        made += 1


def image_of(example: Example, omit: Collection[Shape] = ()) -> Image.Image:
    """The example's image (its scene rendered with the example's own seed), `omit`'s shapes left out."""
    return render(example.scene, random.Random(example.seed + 1), omit=omit)


def export_valse(folder: Union[str, Path], n: int, seed: int = 1) -> Path:
    """Write `n` existence examples as `folder/existence.json` (VALSE format) and `folder/images/`.

    Returns the JSON path; images are named `shapes_<index>.png`.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    data = {}
    for i, ex in enumerate(examples(n, seed)):
        name = f"shapes_{i:05d}.png"
        image_of(ex).save(folder / "images" / name)
        data[f"shapes_{i:05d}"] = {"dataset": "clip_lens-shapes", "image_file": name, "caption": ex.caption,
                                   "foil": ex.foil, "linguistic_phenomena": "existence",
                                   "mturk": {"caption": 3, "foil": 0, "other": 0}, "negation_in": ex.negation_in}
    path = folder / "existence.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def single_shape_set(folder: Union[str, Path], per_class: int = 2, seed: int = 3) -> tuple[Path, Path]:
    """A labelled image folder of one-shape scenes (every colour x kind, `per_class` each) and a
    captions file ("label<TAB>There is a red circle.") for attention cancellation.

    Returns (image folder, captions file).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows, lines = ["image,label"], []
    for colour in COLOURS:
        for kind in SHAPES:
            label = f"{colour} {kind}"
            lines.append(f"{label}\tThere is a {label}.")
            for i in range(per_class):
                r = rng.randint(8, 14)
                shape = Shape(kind, colour, rng.randint(r + 1, SIZE - r - 2), rng.randint(r + 1, SIZE - r - 2), r)
                name = f"{colour}_{kind}_{i}.png"
                render(Scene((shape,)), rng).save(folder / name)
                rows.append(f"{name},{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    captions = folder.parent / "captions.txt"
    captions.write_text("\n".join(lines) + "\n")
    return folder, captions
