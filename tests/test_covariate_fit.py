"""The joint covariate fit (clip_lens.studies.analyses.covariates) and the image measures it uses
(clip_lens.image_stats): measures on images whose answer is known, a planted scorer recovered
exactly, intervals that cover the truth at their level, refusals by name, and the tiny CLIP."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from clip_lens import image_stats
from clip_lens.studies.analyses import covariates

# image measures -----------------------------------------------------------------------------------

def test_a_flat_grey_image_has_no_contrast_and_no_colour():
    grey = Image.new("RGB", (16, 12), (128, 128, 128))
    assert image_stats.brightness(grey) == pytest.approx(128 / 255)
    assert image_stats.contrast(grey) == pytest.approx(0, abs=1e-12)
    assert image_stats.colourfulness(grey) == pytest.approx(0, abs=1e-12)


def test_black_and_white_halves_have_contrast_one_half():
    halves = torch.zeros(3, 8, 10)
    halves[:, :, 5:] = 1
    assert image_stats.brightness(halves) == pytest.approx(0.5)
    assert image_stats.contrast(halves) == pytest.approx(0.5)
    assert image_stats.colourfulness(halves) == pytest.approx(0, abs=1e-12)


def test_pure_colours_by_hand():
    red = torch.zeros(3, 4, 4)
    red[0] = 1
    # rg = 1, yb = 1/2 at every pixel: no spread, 0.3 * sqrt(1 + 1/4)
    assert image_stats.colourfulness(red) == pytest.approx(0.3 * math.sqrt(1.25))
    assert image_stats.brightness(red) == pytest.approx(0.299)                  # Rec. 601 weights
    assert image_stats.brightness(Image.new("RGB", (4, 4), (0, 255, 0))) == pytest.approx(0.587)
    # half red, half blue: rg in {1, 0}, yb in {1/2, -1}: sds 1/2 and 3/4, means 1/2 and -1/4
    mixed = torch.zeros(3, 2, 2)
    mixed[0, 0], mixed[2, 1] = 1, 1
    expected = math.hypot(0.5, 0.75) + 0.3 * math.hypot(0.5, -0.25)
    assert image_stats.colourfulness(mixed) == pytest.approx(expected)


def test_a_pil_image_and_its_tensor_agree():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
    pil, tensor = Image.fromarray(array), torch.from_numpy(array).permute(2, 0, 1) / 255
    for measure in (image_stats.brightness, image_stats.contrast, image_stats.colourfulness):
        assert measure(pil) == pytest.approx(measure(tensor), abs=1e-7)


def test_bad_images_are_refused_by_name():
    with pytest.raises(ValueError, match=r"\[3, H, W\], got shape \[8, 8, 3\]"):
        image_stats.brightness(torch.zeros(8, 8, 3))
    with pytest.raises(ValueError, match="in \\[0, 1\\].*max 255"):
        image_stats.contrast(torch.full((3, 2, 2), 255.0))
    with pytest.raises(TypeError, match="got ndarray"):
        image_stats.colourfulness(np.zeros((3, 2, 2)))


# the t quantile -----------------------------------------------------------------------------------

@pytest.mark.parametrize("df, expected", [(1, 12.706204736), (2, 4.302652730), (10, 2.228138852),
                                          (30, 2.042272456), (100000, 1.9599877)])
def test_t_quantile_matches_the_table(df, expected):
    assert covariates.t_quantile(0.975, df) == pytest.approx(expected, rel=1e-6)


# the fit ------------------------------------------------------------------------------------------

PLANTED = {"brightness": 0.5, "size": -2.0, "length": 0.1}


def planted_scorer(n, seed, noise=0.0):
    """d = 0.5 * brightness - 2 * size + 0.1 * length (+ noise): brightness measured on the image,
    length in words of the caption, the subject's size looked up from the scene metadata by image."""
    instances = covariates.covariate_instances(n, seed)
    size_of = {image.tobytes(): size for image, size in zip(instances["image"], instances["size"])}
    rng = np.random.default_rng(seed)

    def scorer(captions, foils, images):
        d = np.array([PLANTED["brightness"] * image_stats.brightness(image) + PLANTED["size"] * size_of[image.tobytes()]
                      + PLANTED["length"] * len(caption.split()) for caption, image in zip(captions, images)])
        return d + noise * rng.standard_normal(len(d))
    return scorer


def test_the_planted_coefficients_are_recovered_exactly():
    result = covariates.joint_covariate_fit(planted_scorer(120, 0), n=120, seed=0)
    table = result["coefficients"].set_index("term")
    for term in covariates.COVARIATES:
        assert table.loc[term, "unit_coefficient"] == pytest.approx(PLANTED.get(term, 0.0), abs=1e-8)
        # per standard deviation: the unit coefficient times the covariate's spread
        assert table.loc[term, "coefficient"] == pytest.approx(PLANTED.get(term, 0.0) * table.loc[term, "sd"], abs=1e-8)
    assert table.loc["intercept", "unit_coefficient"] == pytest.approx(0.0, abs=1e-8)
    assert table.loc["intercept", "coefficient"] == pytest.approx(result["instances"]["d"].mean(), abs=1e-8)
    r2 = result["r2"].set_index("term")
    assert r2.loc["all", "r2"] == pytest.approx(1.0, abs=1e-10) and (r2["n"] == 120).all()
    assert r2["r2"].between(0, 1 + 1e-12).all() and r2.loc["size", "r2"] > r2.loc["objects", "r2"]
    assert list(result["instances"].columns[-7:]) == [*covariates.COVARIATES, "d"]


def test_with_noise_the_intervals_cover_the_truth():
    """One draw (seed 2): every interval covers its true coefficient. Each 95% interval misses 5% of
    draws by design (seed 1 misses for contrast); the level itself is checked below."""
    result = covariates.joint_covariate_fit(planted_scorer(300, 2, noise=0.5), n=300, seed=2)
    table = result["coefficients"].set_index("term")
    for term in covariates.COVARIATES:
        truth = PLANTED.get(term, 0.0)
        assert table.loc[term, "unit_low"] < truth < table.loc[term, "unit_high"]
        assert table.loc[term, "low"] < truth * table.loc[term, "sd"] < table.loc[term, "high"]
    assert 0 < result["r2"].set_index("term").loc["all", "r2"] < 1


def test_the_intervals_hold_their_level():
    """Over 400 noise draws on one design, each 95% interval covers its true coefficient about 95%
    of the time (binomial sd about 1.1%)."""
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(rng.normal(size=(30, 3)), columns=["a", "b", "c"])
    frame["c"] += frame["a"]                                   # correlated, not collinear
    truth = np.array([1.0, -0.5, 0.0, 2.0])                    # intercept, a, b, c in their own units
    design = np.column_stack([np.ones(30), frame.to_numpy()])
    covered = np.zeros(4)
    for _ in range(400):
        frame["d"] = design @ truth + rng.normal(scale=0.7, size=30)
        table = covariates.covariate_fit(frame, ["a", "b", "c"])["coefficients"]
        covered += (table["unit_low"] < truth) & (truth < table["unit_high"])
    assert ((covered / 400 > 0.91) & (covered / 400 < 0.99)).all(), covered / 400


def test_one_covariate_alone_and_together():
    frame = pd.DataFrame({"x": [0.0, 1, 2, 3, 4, 5], "w": [1.0, 0, 1, 0, 1, 0]})
    frame["d"] = 3 * frame["x"] + 1
    result = covariates.covariate_fit(frame, ["x", "w"])
    r2 = result["r2"].set_index("term")
    assert r2.loc["x", "r2"] == pytest.approx(1) and r2.loc["all", "r2"] == pytest.approx(1)
    assert r2.loc["w", "r2"] == pytest.approx(np.corrcoef(frame["w"], frame["d"])[0, 1] ** 2)
    assert list(r2["covariates"]) == [1, 1, 2]


def _frame(**columns):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=10), "b": rng.normal(size=10), "d": rng.normal(size=10)})
    for name, values in columns.items():
        frame[name] = values
    return frame


def test_a_constant_covariate_is_refused_by_name():
    with pytest.raises(ValueError, match="covariate 'b' is constant"):
        covariates.covariate_fit(_frame(b=2.5), ["a", "b"])


def test_collinear_covariates_are_refused_by_name():
    frame = _frame()
    frame["c"] = 2 * frame["a"] - frame["b"] + 1
    frame["e"] = np.arange(10.0) ** 2
    with pytest.raises(ValueError, match="covariates 'a', 'b', 'c' are collinear") as caught:
        covariates.covariate_fit(frame, ["a", "e", "b", "c"])
    assert "'e'" not in str(caught.value)


@pytest.mark.parametrize("frame, fit, message", [
    (_frame(), dict(covariates=["a", "size"]), "no column 'size'"),
    (_frame(b=[1.0] * 9 + [np.nan]), dict(covariates=["a", "b"]), "column 'b', row 9: nan is not a finite number"),
    (_frame(a=["x"] + [1.0] * 9), dict(covariates=["a", "b"]), "column 'a', row 0: 'x' is not a finite number"),
    (_frame(d=1.0), dict(covariates=["a", "b"]), "response 'd' is constant"),
    (_frame().head(3), dict(covariates=["a", "b"]), "3 instances for 2 covariates"),
    (_frame(), dict(covariates=["a", "a"]), "each once"),
])
def test_bad_input_is_refused_by_name(frame, fit, message):
    with pytest.raises(ValueError, match=message):
        covariates.covariate_fit(frame, **fit)


def test_the_instances_vary_every_covariate():
    instances = covariates.covariate_instances(60, seed=3)
    assert len(instances) == 60 and set(instances["objects"]) == {1, 2, 3}
    assert instances["length"].nunique() == len(covariates.LENGTH_SUFFIXES)
    assert (instances[list(covariates.COVARIATES)].std() > 0).all()
    first = instances.iloc[0]
    assert first["caption"].startswith("There is a ") and first["foil"].startswith("There is no ")
    again = covariates.covariate_instances(60, seed=3)
    assert again.drop(columns="image").equals(instances.drop(columns="image"))
    with pytest.raises(ValueError, match="n=0"):
        covariates.covariate_instances(0)


def test_the_tiny_clip_fit(tiny_model):
    count = covariates.token_counter(tiny_model)
    assert list(count(["There is a red circle.", "There is a red circle here."])) == [6.0, 7.0]
    result = covariates.joint_covariate_fit(covariates.clip_scorer(tiny_model), n=60, seed=0, count_tokens=count)
    table = result["coefficients"]
    numbers = table.drop(columns=["term", "sd"]).to_numpy(dtype=float)
    assert np.isfinite(numbers).all() and (table["low"] <= table["high"]).all()
    assert result["r2"]["r2"].between(0, 1).all() and len(result["r2"]) == len(covariates.COVARIATES) + 1
