"""Synthetic shape scenes: captions true of their image, foils false, deterministic, and exported
in VALSE's format so the negation studies read them unchanged."""

import random

import numpy as np

from clip_lens.data import load_valse, prepare_existence
from clip_lens.data.shapes import COLOURS, PLURALS, SHAPES, examples, export_valse, image_of, random_scene, render


def truth(sentence, scene):
    """Whether an existence sentence holds in the scene (read back from the words)."""
    words = sentence.rstrip(".").split()
    negated = words[2] == "no"
    rest = words[3:]
    colour = rest[0] if rest[0] in COLOURS else None
    noun = rest[-1]
    kind = next(k for k in SHAPES if noun in (k, PLURALS[k]))
    return scene.has(kind, colour) != negated


def test_existence_captions_are_true_and_foils_false():
    data = list(examples(400, seed=5))
    assert {ex.negation_in for ex in data} == {"caption", "foil"}
    for ex in data:
        assert truth(ex.caption, ex.scene) and not truth(ex.foil, ex.scene)
        negated = ex.caption if ex.negation_in == "caption" else ex.foil
        assert " no " in negated


def test_scenes_are_deterministic_and_drawn_as_described():
    a = [(ex.caption, ex.foil, ex.scene) for ex in examples(50, seed=7, kinds=("existence", "colour", "count"))]
    b = [(ex.caption, ex.foil, ex.scene) for ex in examples(50, seed=7, kinds=("existence", "colour", "count"))]
    assert a == b
    scene = random_scene(random.Random(3))
    image = np.asarray(render(scene))
    for shape in scene.shapes:  # the centre pixel has the shape's colour
        assert tuple(image[shape.y, shape.x]) == COLOURS[shape.colour]


def test_export_reads_as_valse_existence(tmp_path, vit_b32):
    _, model = vit_b32
    path = export_valse(tmp_path, 60, seed=2)
    frame = load_valse(path)
    assert len(frame) == 60 and all((tmp_path / "images" / f).is_file() for f in frame["image_file"])
    prepared = prepare_existence(frame, model.to_tokens)  # raises on a pair that is not one token apart
    assert len(prepared.pairs) == 60 and len(prepared.excluded) == 0
    ex = next(iter(examples(1, seed=2)))
    assert np.array_equal(np.asarray(image_of(ex)), np.asarray(__import__("PIL.Image").Image.open(tmp_path / "images" / frame["image_file"][0])))
