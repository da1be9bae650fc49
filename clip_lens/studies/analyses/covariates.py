"""Controlled covariates of the negation score (docs/pairs.md, "Controlled covariates").

Synthetic scenes (`clip_lens.data.shapes`) with one subject shape whose size is set, paired with
existence captions whose length is set by extra words that keep the truth value ("There is a red
circle." / "There is a red circle in the picture." / "... in the picture here."), the negation in
the foil (the subject is present). Subject size and caption length vary independently; each cell
gives the mean d and the accuracy, and a least-squares fit d ~ 1 + size + length gives each
factor's effect.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

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
