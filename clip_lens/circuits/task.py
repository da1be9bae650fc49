"""A circuit task: clean and corrupted runs of one tower and the metric that compares them."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.images import mean_colour_pixels
from clip_lens.model import HookedCLIP
from clip_lens.patching.metrics import Metric, Score, in_float32, other_embeddings, score_function
from clip_lens.towers import HookedTower


@dataclass(frozen=True)
class Task:
    """Pairs of runs of one tower: circuits say which edges carry the difference between them.

    Attributes:
        tower: the text or vision tower.
        clean: the runs whose behaviour is explained, [n, pos] tokens or [n, 3, H, W] pixels.
        corrupt: the runs that supply the values of edges outside a circuit, shaped as `clean`
            (texts with the same token lengths, so that positions line up).
        other: [n, d_embed], the other modality each pair's metric compares with.
        score: (embeddings [batch, d_embed], other [batch, d_embed]) -> metric [batch], float32.
    """

    tower: HookedTower
    clean: Tensor
    corrupt: Tensor
    other: Float[Tensor, "n d_embed"]
    score: Score

    @property
    def n_pairs(self) -> int:
        return self.clean.shape[0]

    def rows(self, lo: int, hi: int) -> "Task":
        """Pairs lo..hi, each input trimmed to that chunk's longest text."""
        clean, corrupt = self.clean[lo:hi], self.corrupt[lo:hi]
        if self.tower.modality == "text":
            clean, corrupt = self.tower.trim(clean), self.tower.trim(corrupt)
        return Task(self.tower, clean, corrupt, self.other[lo:hi], self.score)

    def metric(self, emb: Float[Tensor, "batch d_embed"], rows: Optional[Tensor] = None) -> Float[Tensor, " batch"]:
        """The metric of embeddings whose pair i is `rows[i]` (default: 0..batch-1), in float32."""
        other = self.other if rows is None else self.other[rows]
        if other.shape[0] != emb.shape[0]:
            raise ValueError(f"{emb.shape[0]} embeddings for {other.shape[0]} pairs of this task")
        return self.score(emb, other)


def make_task(model: Union[HookedCLIP, HookedTower], *, clean: Any, corrupt: Any = None, image: Any = None, text: Any = None,
              metric: Metric = "score") -> Task:
    """A checked task.

    Args:
        clean: texts / tokens (text tower) or images / pixels (vision tower).
        corrupt: the same kind of input, one per clean run. For images it defaults to each image's
            mean colour (`clip_lens.images.mean_colour_pixels`); texts need one given.
        image / text: the other modality, as inputs or embeddings [1 or n, d_embed].
        metric: "score" (S, docs/methods.md#the-score-s) or a callable
            (embedding [batch, d_embed], other [batch, d_embed]) -> [batch].
    """
    if isinstance(model, HookedTower):
        return _tower_task(model, clean, corrupt, image if model.modality == "text" else text, metric)
    tower, clean = model.tower_input(clean, name="clean")
    if corrupt is None:
        if tower.modality == "text":
            raise ValueError("a text task needs corrupt= texts (one per clean text, with the same token length)")
        cfg = model.preprocess_cfg
        corrupt = mean_colour_pixels(clean, cfg["mean"], cfg["std"])
    corrupt_tower, corrupt = model.tower_input(corrupt, name="corrupt")
    if corrupt_tower is not tower:
        raise ValueError(f"corrupt is {corrupt_tower.modality} input but clean is {tower.modality} input")
    if isinstance(metric, str) and metric == "embedding":
        raise ValueError("circuits need a scalar metric: metric='score' or a callable(embedding, other) -> [batch]")
    clean, corrupt = _aligned(tower, clean, corrupt)
    other_input = image if tower.modality == "text" else text
    other = other_embeddings(model, tower, other_input, clean.shape[0])
    return Task(tower, clean, corrupt, other, functools.partial(in_float32, score_function(model, metric)))


def _tower_task(tower: HookedTower, clean: Any, corrupt: Any, other: Any, metric: Metric) -> Task:
    """A task on a tower alone (no CLIP around it): the metric must be a callable, and the other
    modality is optional (embeddings [1 or n, d] if given; the metric receives [n, 0] otherwise)."""
    if not callable(metric):
        raise ValueError("a task on a tower alone needs metric= a callable(embedding, other) -> [batch]; 'score' "
                         "needs the CLIP model around the tower")
    if corrupt is None:
        raise ValueError("give corrupt= inputs, one per clean input")
    inputs = []
    for name, value in (("clean", clean), ("corrupt", corrupt)):
        if tower.modality == "text" and (isinstance(value, str) or (isinstance(value, (list, tuple)) and value
                                                                     and isinstance(value[0], str))):
            value = tower.to_tokens(value)
        if not isinstance(value, Tensor):
            raise ValueError(f"{name}: give {'texts or tokens' if tower.modality == 'text' else 'pixels'}, "
                             f"not {type(value).__name__}")
        inputs.append(tower.check_input(value))
    clean, corrupt = _aligned(tower, *inputs)
    n = clean.shape[0]
    if other is None:
        other = torch.zeros(n, 0, device=tower.device)
    elif not (isinstance(other, Tensor) and other.ndim == 2 and other.shape[0] in (1, n)):
        raise ValueError(f"the other modality of a tower task must be embeddings [1 or {n}, d]")
    return Task(tower, clean, corrupt, other.expand(n, -1).to(tower.device),
                functools.partial(in_float32, score_function(None, metric)))


def _aligned(tower: HookedTower, clean: Tensor, corrupt: Tensor) -> tuple[Tensor, Tensor]:
    """Clean and corrupted inputs checked to pair up: as many of each, texts of equal token lengths."""
    if corrupt.shape[0] != clean.shape[0]:
        raise ValueError(f"{corrupt.shape[0]} corrupted runs for {clean.shape[0]} clean runs; give one each")
    if tower.modality != "text":
        return clean, corrupt
    lengths_clean, lengths_corrupt = tower.sequence_lengths(clean), tower.sequence_lengths(corrupt)
    bad = (lengths_clean != lengths_corrupt).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"pair {i}: the clean text has {int(lengths_clean[i])} tokens and the corrupted one "
                         f"{int(lengths_corrupt[i])}; edges join positions, so both need the same token length")
    width = max(clean.shape[1], corrupt.shape[1])
    return _pad(clean, width), _pad(corrupt, width)


def _pad(tokens: Tensor, width: int) -> Tensor:
    """Tokens padded with zeros to `width` positions (after EOT, so nothing reads them)."""
    if tokens.shape[1] == width:
        return tokens
    pad = torch.zeros(tokens.shape[0], width - tokens.shape[1], dtype=tokens.dtype, device=tokens.device)
    return torch.cat([tokens, pad], dim=1)
