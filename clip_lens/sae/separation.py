"""Which SAE latents separate two groups of inputs (docs/methods.md#latents-that-separate-two-groups),
e.g. negated from plain sentences.

Each input's score for a latent is its largest activation over the input's own positions; a
latent's separation is the area under the ROC curve of those scores (group 1 against group 0):
1 when every group-1 input scores above every group-0 input, 0.5 when the scores say nothing.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from clip_lens.hooks import split_tower_prefix

COLUMNS = ["latent", "auc", "fires_in_group", "fires_outside", "mean_in_group", "mean_outside"]


@torch.no_grad()
def input_scores(model: Any, sae: Any, inputs: Any, batch_size: int = 64) -> Tensor:
    """[n_inputs, n_latents]: each input's largest activation of each latent over its own positions
    (texts up to EOT), at `sae.hook`."""
    tower_name, local = split_tower_prefix(sae.hook)
    tower = getattr(model, tower_name)
    _, values = model.tower_input(inputs, name="inputs")
    out = []
    for lo in range(0, len(values), batch_size):
        batch = values[lo : lo + batch_size]
        _, cache = tower.run_with_cache(batch, names_filter=local)
        latents = sae.encode(cache[local])                                            # [batch, pos, n_latents]
        if tower.modality == "text":
            own = torch.arange(latents.shape[1], device=latents.device)[None] < tower.sequence_lengths(batch)[:, None]
            latents = latents.masked_fill(~own[..., None], float("-inf"))
        out.append(latents.amax(dim=1).float().cpu())
    return torch.cat(out)


def auc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Area under the ROC curve of each column of `scores` [n, k] for boolean `labels` [n], ties
    counted half (the Mann-Whitney statistic over the product of the group sizes)."""
    positive, negative = int(labels.sum()), int((~labels).sum())
    if positive == 0 or negative == 0:
        raise ValueError("both groups need at least one input to separate them")
    ranks = pd.DataFrame(scores).rank(axis=0, method="average").to_numpy()           # [n, k], ties averaged
    rank_sum = ranks[labels].sum(axis=0)
    return (rank_sum - positive * (positive + 1) / 2) / (positive * negative)


def separating_latents(scores: Tensor, in_group: Sequence[bool]) -> pd.DataFrame:
    """One row per latent, sorted by how far its AUC lies from 0.5: the AUC of group (in_group)
    against the rest, the share of inputs of each side on which it fires, its mean score on each."""
    labels = np.asarray(list(in_group), dtype=bool)
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} group labels for {len(scores)} inputs")
    values = scores.numpy()
    table = pd.DataFrame({"latent": np.arange(values.shape[1]), "auc": auc(values, labels),
                          "fires_in_group": (values[labels] > 0).mean(0), "fires_outside": (values[~labels] > 0).mean(0),
                          "mean_in_group": values[labels].mean(0), "mean_outside": values[~labels].mean(0)})
    order = np.argsort(-np.abs(table["auc"].to_numpy() - 0.5), kind="stable")
    return table.iloc[order].reset_index(drop=True)[COLUMNS]
