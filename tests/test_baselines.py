"""Subject-removed baselines (docs/methods.md#subject-removed-baseline): exact on synthetic scenes,
a fill inside a box on photos, and image ablation taking them as its baseline."""

import random

import numpy as np
import pandas as pd
import pytest
from conftest import existence_scenes
from PIL import Image

from clip_lens import baselines
from clip_lens.data import shapes
from clip_lens.data.shapes import Example, Scene, Shape
from clip_lens.studies.analyses import image_ablation

RED_CIRCLE, BLUE_SQUARE, RED_SQUARE = Shape("circle", "red", 15, 15, 8), Shape("square", "blue", 45, 45, 9), \
    Shape("square", "red", 45, 15, 7)


def _example(caption, foil, negation_in, shapes_=(RED_CIRCLE, BLUE_SQUARE, RED_SQUARE), seed=11):
    return Example(Scene(tuple(shapes_)), caption, foil, "existence", negation_in, seed)


@pytest.mark.parametrize("caption, kept", [
    ("There is a red circle.", (BLUE_SQUARE, RED_SQUARE)),
    ("There are some squares.", (RED_CIRCLE,)),
    ("There are some red squares.", (RED_CIRCLE, BLUE_SQUARE)),
])
def test_subject_removed_equals_a_render_of_the_scene_without_the_subject(caption, kept):
    foil = caption.replace(" a ", " no ").replace(" some ", " no ")
    example = _example(caption, foil, "foil")
    expected = shapes.render(Scene(kept), random.Random(example.seed + 1))
    assert baselines.subject_removed(example).tobytes() == expected.tobytes()


def test_an_absent_subject_leaves_the_image_as_it_is():
    example = _example("There is no green triangle.", "There is a green triangle.", "caption")
    assert baselines.subject_shapes(example) == ()
    assert baselines.subject_removed(example).tobytes() == shapes.image_of(example).tobytes()


def _shape_pixels(shape, seed):
    """Where `shape` is drawn: its render alone against the bare background."""
    rng = lambda: random.Random(seed + 1)  # noqa: E731
    alone, bare = (np.asarray(shapes.render(Scene(s), rng())) for s in ((shape,), ()))
    return (alone != bare).any(axis=-1)


def test_generated_examples_lose_exactly_their_subjects_pixels():
    """Over generated existence examples: the subject is found in the scene exactly when the
    generator chose a present one (negation in the foil), and the subject-removed image differs
    from the image only on the subject's pixels, all of which become background."""
    for example in shapes.examples(60, seed=5):
        removed = baselines.subject_shapes(example)
        assert bool(removed) == (example.negation_in == "foil"), example
        original, edited = np.asarray(shapes.image_of(example)), np.asarray(baselines.subject_removed(example))
        bare = np.asarray(shapes.render(Scene(()), random.Random(example.seed + 1)))
        subject = np.zeros(original.shape[:2], dtype=bool)
        for shape in removed:
            subject |= _shape_pixels(shape, example.seed)
        changed = (original != edited).any(axis=-1)
        assert (changed == subject).all(), example
        assert (edited[subject] == bare[subject]).all()


def test_only_existence_examples_of_the_generator_have_a_subject():
    colour = Example(Scene((RED_CIRCLE,)), "There is a red circle.", "There is a blue circle.", "colour", None, 7)
    with pytest.raises(ValueError, match="seed 7: a 'colour' example has no subject"):
        baselines.subject_removed(colour)
    with pytest.raises(ValueError, match="caption 'There is a purple star.'"):
        baselines.subject_removed(_example("There is a purple star.", "There is no purple star.", "foil"))


# --- fill_box on photos ----------------------------------------------------------------------------
def _noise(width=40, height=30, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("method", baselines.FILL_METHODS)
@pytest.mark.parametrize("box", [(5, 4, 20, 17), (0, 0, 12, 30), (39, 29, 40, 30), (10, 0, 11, 30)])
def test_fill_box_changes_only_the_pixels_inside_the_box(method, box):
    image = _noise()
    filled = np.asarray(baselines.fill_box(image, box, method=method)).astype(int)
    outside = np.ones((30, 40), dtype=bool)
    x0, y0, x1, y1 = box
    outside[y0:y1, x0:x1] = False
    assert (filled[outside] == np.asarray(image)[outside]).all()
    assert np.asarray(image).tobytes() == _noise().tobytes()  # the input is left as it was


def test_ring_fill_is_the_mean_colour_around_the_box():
    values = np.asarray(_noise()).astype(float)
    ring = np.ones((30, 40), dtype=bool)
    ring[:, :] = False
    ring[4 - 3:17 + 3, 5 - 3:20 + 3] = True
    ring[4:17, 5:20] = False
    filled = np.asarray(baselines.fill_box(_noise(), (5, 4, 20, 17), method="ring"))
    assert (filled[4:17, 5:20] == np.rint(values[ring].mean(axis=0))).all()


@pytest.mark.parametrize("box", [(8, 6, 30, 25), (0, 6, 15, 25)])
def test_diffusion_fill_restores_a_linear_gradient(box):
    """A linear gradient is its own diffusion fill (each value the mean of its neighbours), also
    in a box on the image's left edge, where the gradient runs along that edge."""
    ys, xs = np.mgrid[0:30, 0:40]
    gradient = np.stack([20 + 6 * ys, 200 - 5 * ys, 100 + 2 * ys + (xs if box[0] else 0)], axis=-1)
    image = Image.fromarray(gradient.astype(np.uint8))
    filled = np.asarray(baselines.fill_box(image, box)).astype(int)
    assert np.abs(filled - gradient).max() <= 1


@pytest.mark.parametrize("box, says", [
    ((-1, 0, 5, 5), "reaches outside the 40x30 image"), ((0, 0, 41, 5), "reaches outside"),
    ((30, 20, 45, 35), "reaches outside"), ((5, 5, 5, 9), "empty or in the wrong order"),
    ((9, 5, 4, 8), "empty or in the wrong order"), ((0, 0, 40, 30), "covers the whole"),
    ((1.5, 0, 5, 5), "four integer"), ((1, 2, 3), "four integer"), ("0,0,5,5", "four integer"),
    ((True, 0, 5, 5), "four integer"),
])
def test_bad_boxes_are_refused_naming_the_box(box, says):
    with pytest.raises(ValueError, match=f"box {repr(box).replace('(', '[(]').replace(')', '[)]')}: .*{says}"):
        baselines.fill_box(_noise(), box)


def test_an_unknown_fill_method_is_refused():
    with pytest.raises(ValueError, match="fill method 'blur'"):
        baselines.fill_box(_noise(), (1, 1, 5, 5), method="blur")


# --- fill_mask: the subject's own outline from a segmentation ----------------------------------------
def _disk(cy=15, cx=22, r=7, shape=(30, 40)):
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r


@pytest.mark.parametrize("method", baselines.FILL_METHODS)
def test_fill_mask_changes_only_the_marked_pixels(method):
    image, mask = _noise(), _disk()
    filled = np.asarray(baselines.fill_mask(image, mask, method=method)).astype(int)
    assert (filled[~mask] == np.asarray(image)[~mask]).all()
    assert (filled[mask] != np.asarray(image)[mask]).any()


def test_diffusion_fill_of_a_mask_restores_a_linear_gradient():
    ys, xs = np.mgrid[0:30, 0:40]
    gradient = np.stack([20 + 6 * ys, 200 - 5 * ys, 100 + 2 * ys + xs], axis=-1)
    mask = _disk() | _disk(cy=6, cx=6, r=3)              # two disks, neither touching the image's edge
    filled = np.asarray(baselines.fill_mask(Image.fromarray(gradient.astype(np.uint8)), mask)).astype(int)
    assert np.abs(filled - gradient).max() <= 1


def test_a_box_mask_fills_as_the_box_and_the_ring_is_the_mask_s_surroundings():
    mask = np.zeros((30, 40), dtype=bool)
    mask[4:17, 5:20] = True
    assert baselines.box_of(mask) == (5, 4, 20, 17)
    for method in baselines.FILL_METHODS:
        by_mask = np.asarray(baselines.fill_mask(_noise(), Image.fromarray(mask.astype(np.uint8) * 255), method=method))
        assert by_mask.tobytes() == np.asarray(baselines.fill_box(_noise(), (5, 4, 20, 17), method=method)).tobytes()
    disk = _disk()
    ring = np.zeros_like(disk)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            ring |= np.roll(np.roll(disk, dy, axis=0), dx, axis=1)
    ring &= ~disk
    values = np.asarray(_noise()).astype(float)
    filled = np.asarray(baselines.fill_mask(_noise(), disk, method="ring"))
    assert (filled[disk] == np.rint(values[ring].mean(axis=0))).all()


@pytest.mark.parametrize("mask, says", [
    (np.zeros((30, 40), dtype=bool), "mask is empty"), (np.ones((30, 40), dtype=bool), "covers the whole 40x30"),
    (np.ones((40, 30), dtype=bool), r"mask has shape \(40, 30\); the image is 40x30, so give \[30, 40\]"),
])
def test_bad_masks_are_refused_by_name(mask, says):
    with pytest.raises(ValueError, match=says):
        baselines.fill_mask(_noise(), mask)


# --- image ablation against the subject-removed baseline ------------------------------------------
N_SCENES = 8


@pytest.fixture(scope="module")
def scenes(tiny_model, tmp_path_factory):
    """Existence instances of N_SCENES synthetic scenes, their pixels and their examples (row-aligned)."""
    instances = existence_scenes(tiny_model, tmp_path_factory.mktemp("scenes"), N_SCENES, seed=2)
    examples = list(shapes.examples(N_SCENES, seed=2))
    assert list(instances.frame["id"]) == [f"shapes_{i:05d}" for i in range(N_SCENES)]
    return instances, tiny_model.to_pixels(list(instances.frame["image_path"])), examples


def _tables(result):
    return [result.table(), result.segment_means(), result.outcome_counts(), result.mha_vs_mlp()]


def test_the_mean_colour_image_as_baseline_reproduces_the_default_exactly(tiny_model, scenes):
    instances, pixels, _ = scenes
    mean = image_ablation.run(tiny_model, instances, progress=False, pair_chunk=3)
    given = image_ablation.mean_colour_pixels(pixels, tiny_model.preprocess_cfg["mean"], tiny_model.preprocess_cfg["std"])
    with_baseline = image_ablation.run_with_baseline(tiny_model, instances, given, progress=False, pair_chunk=3)
    for default, other in zip(_tables(mean), _tables(with_baseline)):
        pd.testing.assert_frame_equal(default, other, check_exact=True)


def test_the_image_itself_as_baseline_has_no_effect(tiny_model, scenes):
    instances, pixels, _ = scenes
    result = image_ablation.run_with_baseline(tiny_model, instances, pixels.clone(), progress=False)
    assert (result.iae == 0).all()
    assert set(result.table()["change"]) == {"unchanged"}


def test_subject_removed_against_mean_colour(tiny_model, scenes):
    instances, pixels, examples = scenes
    removed = [baselines.subject_removed(e) for e in examples]
    ablations = {"mean colour": image_ablation.run(tiny_model, instances, pixels=pixels, progress=False),
                 "subject removed": image_ablation.run_with_baseline(tiny_model, instances, removed, pixels=pixels,
                                                                     progress=False)}
    rates = image_ablation.improvement_rates(ablations)
    layers = tiny_model.vision.cfg.n_layers
    assert list(rates.columns) == ["baseline", "negation_in", "component", "cases", "better", "worse", "unchanged",
                                   "fixes", "breaks"]
    assert len(rates) == 2 * 2 * 2
    per_placement = instances.frame["negation_in"].value_counts()
    assert (rates["cases"] == rates["negation_in"].map(per_placement) * layers).all()
    np.testing.assert_allclose(rates[["better", "worse", "unchanged"]].sum(axis=1), 1.0)
    assert (rates["fixes"] <= rates["better"]).all() and (rates["breaks"] <= rates["worse"]).all()
    # the subject is absent where the negation is in the caption: the baseline is the image itself
    absent = rates[(rates["baseline"] == "subject removed") & (rates["negation_in"] == "caption")]
    assert (absent["unchanged"] == 1.0).all()
    present = rates[(rates["baseline"] == "subject removed") & (rates["negation_in"] == "foil")]
    assert (present["unchanged"] < 1.0).all()
    # the table counts the outcome table's own "better" rows
    table = ablations["mean colour"].table()
    mha_foil = table[(table["component"] == "MHA") & (table["negation_in"] == "foil")]
    row = rates[(rates["baseline"] == "mean colour") & (rates["negation_in"] == "foil") & (rates["component"] == "MHA")]
    assert row["better"].item() == pytest.approx((mha_foil["change"] == "better").mean())


def test_a_baseline_of_the_wrong_length_or_shape_is_refused(tiny_model, scenes):
    instances, pixels, _ = scenes
    with pytest.raises(ValueError, match=f"baseline has 3 images for {N_SCENES} instances"):
        image_ablation.run_with_baseline(tiny_model, instances, pixels[:3], progress=False)
    with pytest.raises(ValueError, match="baseline images 0..1 have shape"):
        image_ablation.run_with_baseline(tiny_model, instances, pixels[:, :, :8, :8], progress=False, pair_chunk=2)
