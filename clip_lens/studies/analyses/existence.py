"""VALSE existence instances ready for the negation studies: rephrased pairs, image embeddings,
scores S, d and segments (docs/methods.md#scores-and-segments)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.data import load_valse, prepare_existence, resolve_images
from clip_lens.model import HookedCLIP
from clip_lens.scores import encode_images, encode_texts, pair_scores

INSTANCE_COLUMNS = ["id", "negation_in", "caption", "foil", "d", "segment", "S_caption", "S_foil", "image_file"]


@dataclass
class ExistenceInstances:
    """Kept instances and what was left out.

    Attributes:
        frame: one row per kept instance: id, caption, foil (rephrased), image_file, negation_in,
            negated, non_negated, S_caption, S_foil, d, segment, correct.
        image_emb: [instances, d_embed], the image embeddings, row-aligned with `frame`.
        excluded: id, caption, foil, reason: rephrasing exclusions and skipped missing images.
        caption_emb, foil_emb: [instances, d_embed], the text embeddings (None when not given), so
            that later studies need not encode the texts again.
    """

    frame: pd.DataFrame
    image_emb: Float[Tensor, "n d_embed"]
    excluded: pd.DataFrame
    caption_emb: Optional[Tensor] = None
    foil_emb: Optional[Tensor] = None

    def text_embeddings(self, model: HookedCLIP) -> tuple[Tensor, Tensor]:
        """(caption, foil) embeddings [instances, d_embed], encoded now if not kept."""
        if self.caption_emb is not None and self.foil_emb is not None:
            return self.caption_emb, self.foil_emb
        return encode_texts(model, self.frame["caption"]), encode_texts(model, self.frame["foil"])

    def __len__(self) -> int:
        return len(self.frame)

    def instances_table(self) -> pd.DataFrame:
        """The `instances.csv` table: one row per kept instance."""
        return self.frame[INSTANCE_COLUMNS].copy()

    def subset(self, mask) -> "ExistenceInstances":
        mask = np.asarray(mask, dtype=bool)
        rows = torch.from_numpy(mask)
        keep = lambda emb: emb[rows] if emb is not None else None  # noqa: E731
        return ExistenceInstances(self.frame[mask].reset_index(drop=True), self.image_emb[rows], self.excluded,
                                  keep(self.caption_emb), keep(self.foil_emb))


IMAGE_BATCH = 32  # images encoded per forward pass


@dataclass
class ExistencePairs:
    """Kept pairs before their images are encoded and scored (`select`).

    Attributes:
        frame: one row per kept pair: id, caption, foil (rephrased), image_file, negation_in,
            negated, non_negated, and image_path when the images are files.
        excluded: id, caption, foil, reason: rephrasing exclusions and skipped missing images.
        caption_emb, foil_emb: [pairs, d_embed], the text embeddings.
        images: the given pixels [pairs, 3, H, W] or image embeddings [pairs, d_embed],
            row-aligned with `frame`; None when the images are the files at frame["image_path"].
    """

    frame: pd.DataFrame
    excluded: pd.DataFrame
    caption_emb: Tensor
    foil_emb: Tensor
    images: Optional[Tensor] = None

    def text_embeddings(self, model: HookedCLIP) -> tuple[Tensor, Tensor]:
        """(caption, foil) embeddings [pairs, d_embed]."""
        return self.caption_emb, self.foil_emb

    def __len__(self) -> int:
        return len(self.frame)


def prepare(model: HookedCLIP, valse_path: Union[str, Path], images: Union[str, Path, Tensor, None] = None, *,
            missing: str = "raise", limit: Optional[int] = None, sample: Optional[int] = None, seed: int = 0,
            progress: bool = True) -> ExistenceInstances:
    """Load VALSE existence, rephrase, find the images, encode them and score every instance
    (`select`, `encode`, `score`).

    Args:
        valse_path: existence.json (any VALSE piece in the existence format).
        images: the folder with the `image_file`s (Visual7W); or pixels [n, 3, H, W] or image
            embeddings [n, d_embed], row-aligned with the kept pairs.
        missing: "raise" or "skip" for images absent from the folder.
        limit: keep the first `limit` pairs only (quick runs).
        sample: keep a random sample of this many pairs (seeded by `seed`; dataset order kept),
            before images are read, so a sample costs only its own images.
    """
    pairs = select(model, valse_path, images, missing=missing, limit=limit, sample=sample, seed=seed)
    return score(model, pairs, encode(model, pairs, progress=progress))


def select(model: HookedCLIP, valse_path: Union[str, Path], images: Union[str, Path, Tensor, None], *,
           missing: str = "raise", limit: Optional[int] = None, sample: Optional[int] = None,
           seed: int = 0) -> ExistencePairs:
    """`prepare` up to the image encoding: the pairs kept (rephrased, limited or sampled, their
    images found) and their texts encoded. Arguments as in `prepare`."""
    prepared = prepare_existence(load_valse(valse_path), model.to_tokens)
    pairs, excluded = prepared.pairs.assign(_row=np.arange(len(prepared.pairs))), prepared.excluded
    if images is None:
        raise ValueError("give images: a folder with the VALSE images, or a tensor of pixels or image embeddings")
    if limit is not None:
        pairs = pairs.head(limit)
    if sample is not None and sample < len(pairs):
        pairs = pairs.sample(sample, random_state=seed).sort_index().reset_index(drop=True)
    given = None
    if isinstance(images, Tensor):
        given = _given_rows(images, pairs, len(prepared.pairs))
    else:
        resolved = resolve_images(pairs, images, missing=missing)
        pairs = resolved.pairs
        if len(resolved.missing):
            skipped = prepared.pairs.set_index("id").loc[resolved.missing["id"], ["caption", "foil"]].reset_index()
            skipped["reason"] = "image missing: " + resolved.missing["image_file"].astype(str).to_numpy()
            excluded = pd.concat([excluded, skipped], ignore_index=True)
    frame = pairs.drop(columns="_row").reset_index(drop=True)
    return ExistencePairs(frame, excluded, encode_texts(model, frame["caption"]), encode_texts(model, frame["foil"]),
                          given)


def encode(model: HookedCLIP, pairs: ExistencePairs, progress: bool = True) -> Float[Tensor, "n d_embed"]:
    """The pairs' image embeddings [pairs, d_embed]: as given, or encoded from the given pixels or
    from the image files."""
    if pairs.images is not None:
        if pairs.images.ndim == 2:
            return pairs.images
        return encode_images(model, pairs.images, batch_size=IMAGE_BATCH, progress=progress)
    return encode_images(model, list(pairs.frame["image_path"]), batch_size=IMAGE_BATCH, progress=progress)


def score(model: HookedCLIP, pairs: ExistencePairs, image_emb: Float[Tensor, "n d_embed"]) -> ExistenceInstances:
    """The instances: `pairs` scored against their image embeddings [pairs, d_embed] (S_caption,
    S_foil, d, segment, correct)."""
    if len(image_emb) != len(pairs):
        raise ValueError(f"{len(image_emb)} image embeddings for {len(pairs)} pairs")
    scores = pair_scores(model, pairs.caption_emb, pairs.foil_emb, image_emb)
    frame = pd.concat([pairs.frame, scores], axis=1)
    return ExistenceInstances(frame, image_emb, pairs.excluded, pairs.caption_emb, pairs.foil_emb)


def _given_rows(images: Tensor, pairs: pd.DataFrame, n_kept: int) -> Tensor:
    """The `pairs`' rows of `images` (pixels [n_kept, 3, H, W] or embeddings [n_kept, d_embed],
    row-aligned with every kept pair)."""
    if len(images) != n_kept:
        raise ValueError(f"{len(images)} images for {n_kept} kept pairs")
    return images[torch.tensor(pairs["_row"].to_numpy(), device=images.device)]
