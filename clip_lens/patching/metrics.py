"""What a patch measures: the other modality's embeddings, the score of a run (S, the embedding, or
a user's metric held to one value per run), and scores kept in float32 whatever the towers' dtype.
Shared by the engine's runners and by `clip_lens.circuits`."""

from __future__ import annotations

import functools
from typing import Any, Callable, Union

import torch
from torch import Tensor

from clip_lens.model import HookedCLIP
from clip_lens.scores import score as clip_score
from clip_lens.towers import HookedTower

Metric = Union[str, Callable[[Tensor, Tensor], Tensor]]
Score = Callable[[Tensor, Tensor], Tensor]  # (embeddings [batch, d_embed], other [batch, d_embed]) -> [batch]


def other_embeddings(model: HookedCLIP, tower: HookedTower, other: Any, n: int) -> Tensor:
    """The other modality's embeddings [n, d_embed], computed once."""
    argument = "image" if tower.modality == "text" else "text"
    if other is None:
        raise ValueError(f"patching the {tower.modality} tower needs the other modality: pass "
                         f"{argument}=pixels, inputs or embeddings")
    d_embed = model.text.cfg.d_embed
    if isinstance(other, Tensor) and other.ndim == 2 and other.is_floating_point() and other.shape[1] == d_embed:
        emb = other
        check_finite_rows(emb, argument)
    else:
        other_tower, value = model.tower_input(other, name=argument)
        if other_tower is tower:
            raise ValueError(f"the other modality of a {tower.modality} patch cannot be {tower.modality} input")
        with torch.no_grad():
            emb = other_tower(value)
    if emb.shape[0] == 1:
        emb = emb.expand(n, -1)
    if emb.shape[0] != n:
        raise ValueError(f"{emb.shape[0]} embeddings of the other modality for {n} pairs (give 1 or {n})")
    return emb.detach().to(tower.device)


def check_finite_rows(emb: Tensor, argument: str) -> None:
    """A ValueError naming `argument` and the first row of `emb` [n, d] with a NaN or infinite value
    (it would turn every score of its pairs into NaN)."""
    bad = (~torch.isfinite(emb)).any(dim=-1).nonzero().flatten()
    if len(bad):
        raise ValueError(f"{argument}: embedding row {int(bad[0])} has NaN or infinite values ({len(bad)} of "
                         f"{emb.shape[0]} rows); every score against it would be NaN")


def score_function(model: HookedCLIP, metric: Metric) -> Score:
    if isinstance(metric, str) and metric == "embedding":
        return lambda emb, other: emb
    if isinstance(metric, str) and metric == "score":
        return functools.partial(clip_score, model)  # S (docs/methods.md#the-score-s)
    if callable(metric):
        return functools.partial(_checked_metric, metric)
    raise ValueError(f"metric={metric!r}: use 'score', 'embedding' or a callable(embedding, other_embedding) -> [batch]")


def in_float32(score: Score, emb: Tensor, other: Tensor) -> Tensor:
    """A score of embeddings cast to float32: in a half-precision model only the towers run in
    half precision; S, d and every difference of them are computed and kept in float32."""
    return score(emb.float(), other.float())


def _checked_metric(metric: Callable[[Tensor, Tensor], Tensor], emb: Tensor, other: Tensor) -> Tensor:
    """A user's metric, held to one value per run: a scalar would fill every cell with one number."""
    values = metric(emb, other)
    if not isinstance(values, Tensor) or tuple(values.shape) != (emb.shape[0],):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"metric {getattr(metric, '__name__', metric)!r} returned {shape}; it must return one value per "
                         f"run, a tensor of shape [batch] = [{emb.shape[0]}]")
    return values
