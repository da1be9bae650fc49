"""Controlled covariates of the negation score (docs/pairs.md, "Controlled covariates").

Synthetic scenes (`clip_lens.data.shapes`) with one subject shape whose size is set, paired with
existence captions whose length is set by extra words that keep the truth value ("There is a red
circle." / "There is a red circle in the picture." / "... in the picture here."), the negation in
the foil (the subject is present). Subject size and caption length vary independently; each cell
gives the mean d and the accuracy, and a least-squares fit d ~ 1 + size + length gives each
factor's effect.

The joint covariate fit (docs/methods.md#joint-covariate-fit) lets brightness, contrast,
colourfulness, subject size, caption length and the number of shapes vary together in varied
scenes and fits d on all of them by least squares, with intervals and R² alone and together.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from clip_lens.data import shapes
from clip_lens.model import HookedCLIP
from clip_lens.scores import score as clip_score

SIZES = (6, 9, 12)                        # the subject's half size in pixels (images are 64 x 64)
SUFFIXES = ("", " in the picture", " in the picture here")  # extra words, same truth value
# (captions, foils, images) -> d per pair: S(caption) - S(foil)
Scorer = Callable[[list, list, list], np.ndarray]


def scene_pairs(n_per_cell: int, sizes: Sequence[int] = SIZES, suffixes: Sequence[str] = SUFFIXES,
                seed: int = 0) -> pd.DataFrame:
    """One row per pair: size, length (the number of extra words), caption, foil, image (PIL).
    The same scenes and subjects appear in every length, so that length alone changes across it."""
    rng = random.Random(seed)
    rows = []
    for size in sizes:
        for i in range(n_per_cell):
            kind, colour = rng.choice(shapes.SHAPES), rng.choice(list(shapes.COLOURS))
            x, y = rng.randint(size + 1, shapes.SIZE - size - 2), rng.randint(size + 1, shapes.SIZE - size - 2)
            scene = shapes.Scene((shapes.Shape(kind, colour, x, y, size),))
            image = shapes.render(scene, random.Random(rng.randrange(2**31)))
            for suffix in suffixes:
                rows.append(dict(size=size, length=len(suffix.split()), scene=f"{size}-{i}",
                                 caption=f"There is a {colour} {kind}{suffix}.",
                                 foil=f"There is no {colour} {kind}{suffix}.", image=image))
    return pd.DataFrame(rows)


def clip_scorer(model: HookedCLIP, batch_size: int = 256) -> Scorer:
    """d = S(caption) - S(foil) with `model` (docs/methods.md#the-difference-d)."""
    def scorer(captions: list, foils: list, images: list) -> np.ndarray:
        out = []
        for lo in range(0, len(captions), batch_size):
            with torch.no_grad():
                image = model.encode_image(model.to_pixels(images[lo : lo + batch_size]))
                caption = model.encode_text(model.to_tokens(captions[lo : lo + batch_size]))
                foil = model.encode_text(model.to_tokens(foils[lo : lo + batch_size]))
                out.append((clip_score(model, caption, image) - clip_score(model, foil, image)).cpu().numpy())
        return np.concatenate(out)
    return scorer


def covariate_grid(scorer: Scorer, n_per_cell: int = 50, sizes: Sequence[int] = SIZES,
                   suffixes: Sequence[str] = SUFFIXES, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(pairs with their d, the table by size x length, the fitted effects).

    The table: size, length, pairs, mean_d, accuracy (d > 0). The effects: term ("intercept",
    "size" per pixel of half size, "length" per extra word), effect, and the mean d at the smallest
    and largest level of each factor averaged over the other."""
    if n_per_cell < 1:
        raise ValueError(f"n_per_cell={n_per_cell}: give at least one scene per cell")
    pairs = scene_pairs(n_per_cell, sizes, suffixes, seed)
    pairs["d"] = scorer(list(pairs["caption"]), list(pairs["foil"]), list(pairs["image"]))
    pairs["correct"] = pairs["d"] > 0
    table = pairs.groupby(["size", "length"]).agg(pairs=("d", "size"), mean_d=("d", "mean"),
                                                  accuracy=("correct", "mean")).reset_index()
    design = np.column_stack([np.ones(len(pairs)), pairs["size"], pairs["length"]]).astype(float)
    coefficients, *_ = np.linalg.lstsq(design, pairs["d"].to_numpy(dtype=float), rcond=None)
    effects = pd.DataFrame({"term": ["intercept", "size", "length"], "effect": coefficients})
    return pairs.drop(columns="image"), table, effects


# Joint covariate fit (docs/methods.md#joint-covariate-fit) ----------------------------------------

COVARIATES = ("brightness", "contrast", "colourfulness", "size", "length", "objects")
# extra words after "There is a red circle" that keep its truth value: 0, 1, 3, 4, 5 and 6 words
LENGTH_SUFFIXES = ("", " here", " in the picture", " in the picture here", " in this small picture here",
                   " somewhere in this small picture here")
# ranges of the PIL enhancement factors drawn per scene (1 leaves the rendered image as it is)
EDIT_FACTORS = {"Color": (0.3, 1.5), "Contrast": (0.4, 1.6), "Brightness": (0.45, 1.15)}
SUBJECT_SIZES, OTHER_SIZES = (5, 14), (5, 9)   # half sizes in pixels, drawn uniformly
# captions -> caption length per caption
CountTokens = Callable[[list], np.ndarray]


def word_counts(captions: list) -> np.ndarray:
    """The number of words (split at white space) of each caption."""
    return np.array([len(caption.split()) for caption in captions], dtype=float)


def token_counter(model: HookedCLIP) -> CountTokens:
    """Caption length with `model`'s tokenizer: the tokens between SOT and EOT (as in
    docs/methods.md#preliminary-measures)."""
    def count(captions: list) -> np.ndarray:
        tokens = model.to_tokens(list(captions))
        return (model.text.pooled_positions(tokens) - 1).cpu().numpy().astype(float)
    return count


def _shapes_apart(shapes_so_far: list, shape: shapes.Shape) -> bool:
    """Whether `shape` keeps clear of every shape placed so far and repeats none's colour and kind."""
    return not any((s.kind == shape.kind and s.colour == shape.colour)
                   or (abs(s.x - shape.x) < s.r + shape.r + 2 and abs(s.y - shape.y) < s.r + shape.r + 2)
                   for s in shapes_so_far)


def varied_scene(rng: random.Random) -> shapes.Scene:
    """One to three shapes kept apart; the first is the subject, of half size 5 to 14 pixels, the
    others of 5 to 9."""
    while True:
        wanted, placed = rng.randint(1, shapes.MAX_OBJECTS), []
        for _ in range(100):
            if len(placed) == wanted:
                return shapes.Scene(tuple(placed))
            r = rng.randint(*(OTHER_SIZES if placed else SUBJECT_SIZES))
            shape = shapes.Shape(rng.choice(shapes.SHAPES), rng.choice(list(shapes.COLOURS)),
                                 rng.randint(r + 1, shapes.SIZE - r - 2), rng.randint(r + 1, shapes.SIZE - r - 2), r)
            if _shapes_apart(placed, shape):
                placed.append(shape)
        if len(placed) == wanted:
            return shapes.Scene(tuple(placed))


def edited_image(image, rng: random.Random):
    """`image` with its colour saturation, contrast and brightness scaled by factors drawn from
    EDIT_FACTORS (PIL's ImageEnhance, in that order)."""
    from PIL import ImageEnhance

    for name, (low, high) in EDIT_FACTORS.items():
        image = getattr(ImageEnhance, name)(image).enhance(rng.uniform(low, high))
    return image


def covariate_instances(n: int, seed: int = 0, count_tokens: Optional[CountTokens] = None) -> pd.DataFrame:
    """`n` instances of varied synthetic scenes, one row each: scene, caption, foil, image (PIL) and
    the covariates (COVARIATES). The caption names the subject (negation in the foil); `size` is the
    subject's half size in pixels, `objects` the number of shapes, `length` the caption's length by
    `count_tokens` (words when None); the image measures come from `clip_lens.image_stats`."""
    from clip_lens import image_stats

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: give a whole number of instances, at least 1")
    rng, rows = random.Random(seed), []
    for i in range(n):
        scene = varied_scene(rng)
        image = edited_image(shapes.render(scene, random.Random(rng.randrange(2**31))), rng)
        subject, suffix = scene.shapes[0], rng.choice(LENGTH_SUFFIXES)
        rows.append(dict(scene=i, caption=f"There is a {subject.colour} {subject.kind}{suffix}.",
                         foil=f"There is no {subject.colour} {subject.kind}{suffix}.", image=image,
                         brightness=image_stats.brightness(image), contrast=image_stats.contrast(image),
                         colourfulness=image_stats.colourfulness(image), size=subject.r, objects=len(scene.shapes)))
    frame = pd.DataFrame(rows)
    frame.insert(frame.columns.get_loc("size") + 1, "length", (count_tokens or word_counts)(list(frame["caption"])))
    return frame


_GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(32)  # nodes and weights on [-1, 1]


def _t_cdf_above_zero(x: float, df: int) -> float:
    """P(0 < T < x) for Student's t with `df` degrees of freedom (Gauss-Legendre quadrature of
    its density on panels of width at most 1)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    nodes, weights = _GAUSS_LEGENDRE
    edges = np.linspace(0.0, x, max(1, math.ceil(x)) + 1)
    half = np.diff(edges)[:, None] / 2
    points = (edges[:-1, None] + half) + half * nodes[None, :]
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(points**2 / df))
    return float((half * weights[None, :] * density).sum())


def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile (in (0.5, 1)) of Student's t with `df` degrees of freedom, by
    Newton's method on its distribution function (monotone from 0, since that is concave above 0)."""
    if not 0.5 < probability < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < probability < 1 and df >= 1, got {probability} and {df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    x = 0.0
    for _ in range(200):
        step = (probability - 0.5 - _t_cdf_above_zero(x, df)) / math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))
        x += step
        if abs(step) < 1e-12 * max(1.0, x):
            break
    return x


def _checked_columns(instances: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """The named columns as float [n, k]; a ValueError names a missing column or a row without a
    finite number."""
    missing = [c for c in columns if c not in instances.columns]
    if missing:
        raise ValueError(f"the instances have no column {', '.join(map(repr, missing))} "
                         f"(columns: {', '.join(map(str, instances.columns))})")
    values = instances[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        value = instances[columns[col]].iloc[row]
        value = value.item() if isinstance(value, np.generic) else value
        raise ValueError(f"column {columns[col]!r}, row {instances.index[row]!r}: {value!r} is not a finite number")
    return values


def standardised(values: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z-scores [n, k], means [k], standard deviations [k], population form); a ValueError names
    every constant column, since its coefficient could not be estimated."""
    mean, sd = values.mean(axis=0), values.std(axis=0)
    constant = [name for name, m, s in zip(names, mean, sd) if s <= 1e-12 * max(1.0, abs(m))]
    if constant:
        raise ValueError(f"covariate {', '.join(map(repr, constant))} is constant over the instances: "
                         "its effect cannot be estimated; vary it or leave it out of the fit")
    return (values - mean) / sd, mean, sd


def refuse_collinear(z: np.ndarray, names: Sequence[str], tolerance: float = 1e-6) -> None:
    """A ValueError naming the covariates of a (near) linear dependence among the standardised
    columns `z`: the smallest singular value under `tolerance` times the largest."""
    _, singular, right = np.linalg.svd(z, full_matrices=False)
    if singular[-1] > tolerance * singular[0]:
        return
    weights = right[-1]
    involved = [name for name, w in zip(names, weights) if abs(w) > 0.05 * np.abs(weights).max()]
    raise ValueError(f"covariates {', '.join(map(repr, involved))} are collinear (one is a linear function "
                     "of the others over these instances): their separate effects cannot be estimated; "
                     "leave one out")


def least_squares(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(coefficients, their covariance matrix, R²) of the ordinary least-squares fit of y on
    `design` (whose first column is the intercept): covariance = s² (XᵀX)⁻¹, s² = RSS / (n - p)."""
    q, r = np.linalg.qr(design)
    coefficients = np.linalg.solve(r, q.T @ y)
    residual = y - design @ coefficients
    inverse_r = np.linalg.inv(r)
    variance = residual @ residual / (len(y) - design.shape[1])
    total = ((y - y.mean()) ** 2).sum()
    return coefficients, variance * inverse_r @ inverse_r.T, float(1 - residual @ residual / total)


def _coefficient_table(coefficients: np.ndarray, covariance: np.ndarray, scale: tuple, names: Sequence[str],
                       t: float) -> pd.DataFrame:
    """One row per term: the coefficient per standard deviation with its standard error and
    interval, and the same in the covariate's own units (the intercept: d at all covariates 0)."""
    mean, sd = scale
    to_units = np.eye(len(coefficients))
    to_units[1:, 1:] /= sd[:, None]
    to_units[0, 1:] = -mean / sd
    unit_coefficients, unit_covariance = to_units @ coefficients, to_units @ covariance @ to_units.T
    table = pd.DataFrame({"term": ["intercept", *names], "sd": [np.nan, *sd]})
    for prefix, values, cov in (("", coefficients, covariance), ("unit_", unit_coefficients, unit_covariance)):
        error = np.sqrt(np.clip(np.diag(cov), 0, None))
        table[f"{prefix}coefficient"], table[f"{prefix}std_error"] = values, error
        table[f"{prefix}low"], table[f"{prefix}high"] = values - t * error, values + t * error
    return table


def covariate_fit(instances: pd.DataFrame, covariates: Sequence[str] = COVARIATES, response: str = "d",
                  level: float = 0.95) -> dict[str, pd.DataFrame]:
    """Ordinary least squares of `response` on the standardised covariates plus an intercept.

    Returns {"coefficients": term, sd (the covariate's standard deviation), coefficient, std_error,
    low, high (per standard deviation; `level` interval from Student's t with n - k - 1 degrees of
    freedom), and unit_coefficient, unit_std_error, unit_low, unit_high (per unit of the covariate);
    "r2": term (each covariate alone, then "all"), covariates, r2, n}. Constant or collinear
    covariates, a constant response and too few instances are refused by name."""
    names = list(covariates)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"covariates={names!r}: give at least one covariate, each once")
    values, y = _checked_columns(instances, names), _checked_columns(instances, [response])[:, 0]
    if len(y) < len(names) + 2:
        raise ValueError(f"{len(y)} instances for {len(names)} covariates and an intercept: "
                         f"give at least {len(names) + 2} so that the error can be estimated")
    if np.ptp(y) == 0:
        raise ValueError(f"the response {response!r} is constant ({y[0]!r}): R² is undefined")
    z, mean, sd = standardised(values, names)
    refuse_collinear(z, names)
    design = np.column_stack([np.ones(len(y)), z])
    coefficients, covariance, r2 = least_squares(design, y)
    t = t_quantile((1 + level) / 2, len(y) - design.shape[1])
    alone = [least_squares(design[:, [0, j + 1]], y)[2] for j in range(len(names))]
    r2_table = pd.DataFrame({"term": [*names, "all"], "covariates": [1] * len(names) + [len(names)],
                             "r2": [*alone, r2], "n": len(y)})
    return {"coefficients": _coefficient_table(coefficients, covariance, (mean, sd), names, t), "r2": r2_table}


def joint_covariate_fit(scorer: Scorer, n: int = 400, seed: int = 0,
                        count_tokens: Optional[CountTokens] = None) -> dict[str, pd.DataFrame]:
    """d of `n` varied synthetic scenes (`covariate_instances`) by `scorer`, fitted jointly on
    COVARIATES (`covariate_fit`). Returns {"instances" (without the images, with d), "coefficients",
    "r2"}; pass `token_counter(model)` for caption lengths in the model's tokens."""
    instances = covariate_instances(n, seed, count_tokens)
    instances["d"] = np.asarray(scorer(list(instances["caption"]), list(instances["foil"]),
                                       list(instances["image"])), dtype=float)
    return {"instances": instances.drop(columns="image"), **covariate_fit(instances)}
