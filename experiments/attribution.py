"""Attributing a CLIP score to attention heads, and the faithfulness of the rankings (METHODS.md).

Three rankings of the heads of one tower, per instance:
- attribution patching: the first-order estimate of zero-ablating each head (all positions), from
  one forward and one backward pass (`clip_lens.patch(method="attribution")`);
- Logit Lens: each head's direct contribution, its output at the pooled position removed from the
  final residual stream and the result passed through the final norm and projection;
- random.
A deletion curve zeroes the top-k heads of a ranking together (exact runs through `clip_lens.patch`)
and records the score; the area under the mean curve (per unit of k) is smaller when a ranking
finds the heads the score depends on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from clip_lens.model import HookedCLIP
from clip_lens.patching import patch
from clip_lens.plot import style
from clip_lens.towers import HookedTextTower

METHODS = ("attribution patching", "logit lens", "random")


def _tower(model: HookedCLIP, inputs: Tensor):
    return model.text if inputs.dtype in (torch.long, torch.int) else model.vision


def attribution_scores(model: HookedCLIP, inputs: Tensor, other: Tensor) -> Float[Tensor, "n layer head"]:
    """Estimated drop of S when each head is zeroed at every position (attribution patching)."""
    kind = "image" if inputs.dtype in (torch.long, torch.int) else "text"
    res = patch(model, target=inputs, hook="z", positions="sequence", intervention="zero", method="attribution",
                progress=False, **{kind: other})
    return res.baseline[:, None, None] - res.effects


@torch.no_grad()
def logit_lens_scores(model: HookedCLIP, inputs: Tensor, other: Tensor) -> Float[Tensor, "n layer head"]:
    """Drop of S when one head's output at the pooled position is removed from the final residual."""
    tower = _tower(model, inputs)
    L = tower.cfg.n_layers
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    _, cache = tower.run_with_cache(inputs, names_filter=names)
    rows = torch.arange(len(inputs))
    pooled = tower.pooled_positions(inputs) if isinstance(tower, HookedTextTower) else torch.zeros(len(inputs), dtype=torch.long)
    final = cache[names[-1]][rows, pooled]                                   # [n, d_model]
    scale = model.logit_scale.exp()

    def score(resid):
        emb = tower.pool_rows(resid) if isinstance(tower, HookedTextTower) else tower.pool(resid[:, None])
        return scale * F.cosine_similarity(emb, other.expand_as(emb), dim=-1)

    clean = score(final)
    out = torch.zeros(len(inputs), L, tower.cfg.n_heads)
    for l, block in enumerate(tower.blocks):
        z = cache[f"blocks.{l}.attn.hook_z"][rows, pooled]                   # [n, head, d_head]
        per_head = torch.einsum("nhe,hed->nhd", z, block.attn.W_O)           # [n, head, d_model]
        if block.ls1 is not None:
            per_head = per_head * block.ls1
        for h in range(tower.cfg.n_heads):
            out[:, l, h] = clean - score(final - per_head[:, h])
    return out


def _zero_heads(heads: dict[int, list[int]]):
    def hook(z: Tensor, hook) -> Tensor:
        z = z.clone()
        z[..., heads[hook.layer()], :] = 0.0
        return z
    return hook


def deletion_curve(model: HookedCLIP, inputs: Tensor, other: Tensor, ranking: Float[Tensor, "n layer head"],
                   ks: Sequence[int]) -> Float[np.ndarray, "n k"]:
    """S with the top-k heads of each instance's ranking zeroed together, for each k."""
    tower = _tower(model, inputs)
    n_heads = tower.cfg.n_heads
    kind = "image" if inputs.dtype in (torch.long, torch.int) else "text"
    if max(ks) <= 0:
        raise ValueError("ks needs at least one k > 0")
    out = np.zeros((len(inputs), len(ks)))
    for i in range(len(inputs)):
        order = ranking[i].flatten().argsort(descending=True).tolist()
        for j, k in enumerate(ks):
            if k <= 0:
                continue
            chosen: dict[int, list[int]] = {}
            for flat in order[:k]:
                chosen.setdefault(flat // n_heads, []).append(flat % n_heads)
            res = patch(model, target=inputs[i:i + 1], hook="z", intervention=_zero_heads(chosen),
                        layers=[tuple(sorted(chosen))], progress=False, **{kind: other[i:i + 1]})
            out[i, j] = float(res.effects[0, 0])
            clean = float(res.baseline[0])  # the engine's clean run: the score at k = 0
        out[i, [j for j, k in enumerate(ks) if k <= 0]] = clean
    return out


@dataclass
class Faithfulness:
    """Deletion curves per method (`curves`: method, k, mean score, change from the clean score) and
    the area under each (`areas`: method, area, clean), with the rankings (`scores`)."""

    curves: pd.DataFrame
    areas: pd.DataFrame
    scores: dict

    def figure(self) -> go.Figure:
        fig = px.line(self.curves, x="k", y="score", color="method", markers=True,
                      color_discrete_map={"attribution patching": "#2a9d8f", "logit lens": "#e76f51", "random": "#999"})
        fig.update_xaxes(title_text="heads removed (top-k of each ranking)")
        fig.update_yaxes(title_text="mean score S")
        return style(fig, "Deletion curves: how fast each ranking's top heads destroy the score", height=420)


def faithfulness(model: HookedCLIP, inputs: Tensor, other: Tensor, ks: Sequence[int] = (0, 1, 2, 4, 8, 16, 32),
                 seed: int = 0) -> Faithfulness:
    """Deletion curves of attribution patching, Logit Lens and a random ranking, and their areas."""
    tower = _tower(model, inputs)
    other = other.detach()
    scores = {"attribution patching": attribution_scores(model, inputs, other),
              "logit lens": logit_lens_scores(model, inputs, other),
              "random": torch.rand(len(inputs), tower.cfg.n_layers, tower.cfg.n_heads,
                                   generator=torch.Generator().manual_seed(seed))}
    rows, areas = [], []
    for method, ranking in scores.items():
        curve = deletion_curve(model, inputs, other, ranking, ks)          # [n, k]
        mean = curve.mean(0)
        for j, k in enumerate(ks):
            rows.append(dict(method=method, k=k, score=mean[j], change=mean[j] - mean[0]))
        # area under the mean score curve, per unit of k: smaller = the score falls faster
        areas.append(dict(method=method, area=float(np.trapezoid(mean, ks) / (ks[-1] - ks[0])), clean=float(mean[0])))
    return Faithfulness(pd.DataFrame(rows), pd.DataFrame(areas), scores)
