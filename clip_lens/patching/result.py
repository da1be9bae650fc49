"""`PatchResult`: what `clip_lens.patch` returns."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd
import torch
from torch import Tensor


@dataclass
class PatchResult:
    """What `patch` returns.

    Attributes:
        effects: the metric of each intervened target run, [pair, (hook), layer, (position),
            (head | neuron | latent)] (+ [embed] with metric="embedding"); NaN where a position
            lies beyond a pair's last token.
        baseline: [pair] (+ [embed]), the metric of the clean target run.
        source_baseline: [pair], the metric of the clean source run (None without a source).
        dims: names of the axes of `effects`.
        hook: the hook kind ("attn_out+mlp_out" for several, along the "hook" axis).
        layers, positions, heads, neurons, latents: the labels along those axes (None: no such axis);
            with positions given per pair, `positions` are the slots 0..k-1 and
            `extra["pair_positions"]` [pair, slot] each pair's own positions (-1: none).
        contributions: with method="attribution" or "integrated_gradients", the estimates of
            metric(intervened) - metric(clean) themselves, shaped like `effects` (None otherwise).
        lengths: [pair], each target's own positions (tokens up to EOT; every position of an
            image): the cells at later positions do not exist and hold NaN.
    """

    effects: Tensor
    baseline: Tensor
    source_baseline: Optional[Tensor]
    dims: tuple[str, ...]
    layers: list
    positions: Optional[list]
    heads: Optional[list]
    hook: str
    intervention: str
    method: str = "exact"
    extra: dict = field(default_factory=dict)
    neurons: Optional[list] = None
    latents: Optional[list] = None
    contributions: Optional[Tensor] = None
    lengths: Optional[Tensor] = None

    def measured(self) -> Tensor:
        """[effects' shape, value axes left out], True where a cell exists (its position lies
        within the pair's own length); the other cells hold NaN by construction."""
        shape = self.effects.shape[: len(self.dims) - (1 if "embed" in self.dims else 0)]
        if "position" not in self.dims or self.lengths is None:
            return torch.ones(shape, dtype=torch.bool, device=self.effects.device)
        axis = self.dims.index("position")
        own = self.extra.get("pair_positions")  # [pair, slot], each pair's own positions (-1: none)
        if own is not None:
            inside = (own >= 0) & (own < self.lengths[:, None])
        else:  # a joint intervention (a tuple of positions) exists where its last position does
            last = [max(p) if isinstance(p, tuple) else p for p in self.positions]
            inside = torch.tensor(last, device=self.lengths.device)[None] < self.lengths[:, None]       # [pair, position]
        view = [inside.shape[0]] + [1] * (len(shape) - 1)
        view[axis] = inside.shape[1]
        return inside.view(view).expand(shape)
    def changes(self) -> Tensor:
        """metric(intervened) - metric(clean), shaped like `effects`: the attribution estimates
        as computed, or the exact effects less the baseline."""
        if self.contributions is not None:
            return self.contributions
        n_value_dims = self.baseline.ndim - 1  # the trailing [embed] axis with metric="embedding"
        view = self.baseline.shape[:1] + (1,) * (self.effects.ndim - 1 - n_value_dims) + self.baseline.shape[1:]
        return self.effects - self.baseline.view(view)

    def to_frame(self) -> pd.DataFrame:
        """One row per pair x intervention (long format); cells past a pair's length left out. A
        measured cell whose metric is NaN stays in the frame, and a warning names its pairs.

        Columns: pair, [hook], layer, [position], [head | neuron | latent], metric, baseline,
        [source_baseline], hook, intervention, method.
        """
        if "embed" in self.dims:
            raise ValueError("effects are embeddings (metric='embedding'); score them, then tabulate")
        labels = {"pair": list(range(self.effects.shape[0])), "hook": self.hook.split("+"), "layer": self.layers,
                  "position": self.positions, "head": self.heads, "neuron": self.neurons, "latent": self.latents}
        # tuples (joint interventions) stay single labels, not index levels of their own
        levels = [pd.Index(labels[d], tupleize_cols=False, dtype=object)
                  if any(isinstance(label, tuple) for label in labels[d]) else labels[d] for d in self.dims]
        index = pd.MultiIndex.from_product(levels, names=list(self.dims))
        measured = self.measured().reshape(-1).numpy()
        frame = pd.DataFrame({"metric": self.effects.detach().cpu().reshape(-1).numpy()}, index=index).reset_index()
        frame = frame[measured]
        if frame["metric"].isna().any():
            pairs = sorted(set(frame.loc[frame["metric"].isna(), "pair"]))
            warnings.warn(f"the metric is NaN in {int(frame['metric'].isna().sum())} measured cells, of pairs "
                          f"{pairs[:10]}{' ...' if len(pairs) > 10 else ''}", stacklevel=2)
        pairs = frame["pair"].to_numpy()
        if "pair_positions" in self.extra:  # "position" holds the slot; the position itself beside it
            frame["token_position"] = self.extra["pair_positions"].numpy()[pairs, frame["position"].to_numpy()]
        frame["baseline"] = self.baseline.detach().cpu().numpy()[pairs]
        if self.source_baseline is not None:
            frame["source_baseline"] = self.source_baseline.detach().cpu().numpy()[pairs]
        if "hook" not in self.dims:
            frame["hook"] = self.hook
        frame["intervention"], frame["method"] = self.intervention, self.method
        return frame.reset_index(drop=True)
