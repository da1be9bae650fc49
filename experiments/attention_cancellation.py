"""Layer-wise attention cancellation in the vision encoder (docs/methods.md#attention-cancellation).

In the chosen layers every position attends only to itself (the attention pattern becomes the
identity), so the attention block outputs out_proj(V). For each image and a list of candidate
captions: the caption CLIP selects, its cosine similarity, every caption's logit and the accuracy
against a label, for the baseline and every setting. Runs through `clip_lens.patch`
(`intervention="value_only"`, `metric="embedding"`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

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
from clip_lens.scores import encode_texts

PAPER_RANGES = ("1-3", "4-6", "7-9", "10-12", "1-4", "5-8", "9-12", "1-12")


def parse_settings(spec: Union[str, Sequence[str]], n_layers: int) -> dict[str, tuple[int, ...]]:
    """Settings by name -> 0-based block indices. Names use 1-based layers as in the study:
    "3" (one layer), "1-3" (a range), "1,5,9" (a set), comma-or-space separated in a string."""
    items = re.split(r"[\s;]+", spec.strip()) if isinstance(spec, str) else list(spec)
    settings = {}
    for item in filter(None, items):
        parts = []
        for piece in item.split(","):
            lo, _, hi = piece.partition("-")
            lo, hi = int(lo), int(hi or lo)
            if not 1 <= lo <= hi <= n_layers:
                raise ValueError(f"setting {item!r}: layers run 1..{n_layers}")
            parts.extend(range(lo - 1, hi))
        settings[item] = tuple(sorted(set(parts)))
    return settings


def default_settings(n_layers: int) -> dict[str, tuple[int, ...]]:
    """Every single layer, and the study's ranges (thirds, quarters and all layers of a 12-layer
    tower; for other depths the same fractions)."""
    singles = [str(l) for l in range(1, n_layers + 1)]
    if n_layers == 12:
        ranges = list(PAPER_RANGES)
    else:
        bounds = lambda k: [(round(i * n_layers / k) + 1, round((i + 1) * n_layers / k)) for i in range(k)]  # noqa: E731
        ranges = [f"{a}-{b}" for k in (3, 4) for a, b in bounds(k) if a <= b] + [f"1-{n_layers}"]
    settings: dict[str, tuple[int, ...]] = {}
    for name, layers in parse_settings(singles + list(dict.fromkeys(ranges)), n_layers).items():
        if layers not in settings.values():  # shallow towers: a "range" may be a single layer
            settings[name] = layers
    return settings


@dataclass
class AttentionCancellation:
    """Result of `run`.

    Attributes:
        images: one row per image (image, label, target: the correct caption's index or -1).
        captions: the candidate captions.
        settings: "baseline" then each setting's name; layers: their 0-based blocks.
        logits: [setting, image, caption]; cosine: the same as cosine similarities.
    """

    images: pd.DataFrame
    captions: list
    settings: list
    layers: list
    logits: Float[np.ndarray, "setting image caption"]
    cosine: Float[np.ndarray, "setting image caption"]

    def predictions(self) -> pd.DataFrame:
        """One row per setting x image: selected caption, its cosine and logit, correct."""
        selected = self.logits.argmax(axis=-1)
        rows = []
        for s, setting in enumerate(self.settings):
            for i, row in enumerate(self.images.itertuples(index=False)):
                k = int(selected[s, i])
                rows.append(dict(setting=setting, image=_file_name(row.image), label=row.label, selected=self.captions[k],
                                 cosine=float(self.cosine[s, i, k]), logit=float(self.logits[s, i, k]),
                                 correct=bool(k == row.target) if row.target >= 0 else None,
                                 changed=bool(k != selected[0, i])))
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """Per setting: its blocks (numbered from 0, as in every table; the setting's name keeps the
        study's 1-based layers), accuracy, mean cosine of the selected caption, and the share of
        images whose selection changed from the baseline."""
        pred = self.predictions()
        labelled = pred.dropna(subset=["correct"])
        table = pred.groupby("setting", sort=False).agg(mean_cosine=("cosine", "mean"), changed=("changed", "mean"))
        table["accuracy"] = labelled.groupby("setting", sort=False)["correct"].mean() if len(labelled) else np.nan
        table.insert(0, "blocks", ["" if not l else ",".join(str(b) for b in l) for l in self.layers])
        return table.reset_index()[["setting", "blocks", "accuracy", "mean_cosine", "changed"]]

    def logits_frame(self) -> pd.DataFrame:
        """Long format: setting, image, caption, logit, cosine."""
        s, i, c = np.meshgrid(range(len(self.settings)), range(len(self.images)), range(len(self.captions)), indexing="ij")
        return pd.DataFrame({"setting": np.array(self.settings)[s.ravel()],
                             "image": [_file_name(p) for p in self.images["image"].to_numpy()[i.ravel()]],
                             "caption": np.array(self.captions)[c.ravel()],
                             "logit": self.logits.ravel(), "cosine": self.cosine.ravel()})

    def figures(self) -> dict[str, go.Figure]:
        summary = self.summary()
        accuracy = summary["accuracy"].notna().any()
        y = "accuracy" if accuracy else "changed"
        bars = px.bar(summary, x="setting", y=y, color=np.where(summary["setting"] == "baseline", "baseline", "cancelled"),
                      color_discrete_map={"baseline": "#264653", "cancelled": "#e76f51"}, hover_data=["blocks", "mean_cosine"])
        bars.update_layout(showlegend=False)
        bars.update_xaxes(title_text="self-attention cancelled in layers", type="category")
        bars.update_yaxes(title_text="accuracy" if accuracy else "share of images whose caption changed", range=[0, 1])
        correct = np.take_along_axis(self.cosine, np.maximum(self.images["target"].to_numpy(), 0)[None, :, None], axis=-1)[..., 0]
        heat = go.Figure(go.Heatmap(z=(correct if accuracy else self.cosine.max(axis=-1)).T, x=self.settings,
                                    y=[_file_name(p) for p in self.images["image"]], colorscale="Viridis",
                                    colorbar=dict(title="cosine"),
                                    hovertemplate="%{y}<br>%{x}<br>cosine %{z:.4f}<extra></extra>"))
        heat.update_xaxes(type="category", title_text="setting")
        return {"cancellation_accuracy": style(bars, "Accuracy with self-attention cancelled" if accuracy else
                                                "Selections changed by cancelling self-attention", height=420),
                "cancellation_cosine": style(heat, "Cosine similarity with the " + ("correct" if accuracy else "selected")
                                              + " caption", height=max(360, 24 * len(self.images) + 160))}


def _file_name(path) -> str:
    return str(path).replace("\\", "/").rsplit("/", 1)[-1]


def run(model: HookedCLIP, images: pd.DataFrame, captions: Sequence[str], *, targets: Optional[Sequence[int]] = None,
        settings: Optional[dict[str, tuple[int, ...]]] = None, pixels: Optional[Tensor] = None,
        pair_chunk: int = 32, progress: bool = True) -> AttentionCancellation:
    """Cancel self-attention in each setting and score every image against every caption.

    Args:
        images: a frame with `image` (paths) and optionally `label` (see `clip_lens.data.image_sets`).
        captions: the candidate captions.
        targets: each image's correct caption index (-1: unknown); default all unknown.
        settings: name -> 0-based blocks (default `default_settings`).
        pixels: [n, 3, H, W] instead of reading `images["image"]`.
    """
    images = images.reset_index(drop=True).copy()
    if "label" not in images:
        images["label"] = None
    images["target"] = np.asarray(targets if targets is not None else [-1] * len(images), dtype=int)
    settings = settings or default_settings(model.vision.cfg.n_layers)
    if pixels is None:
        pixels = model.to_pixels(list(images["image"]))
    result = patch(model, target=pixels, hook="pattern", intervention="value_only", layers=list(settings.values()),
                   metric="embedding", pair_chunk=pair_chunk, progress=progress)
    embeddings = torch.cat([result.baseline[None], result.effects.permute(1, 0, 2)])  # [setting, image, d_embed]
    embeddings, text = embeddings.to(model.device), encode_texts(model, captions).float()
    with torch.no_grad():
        cosine = F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).T
        logits = model.logits_from_embeddings(embeddings, text)
    return AttentionCancellation(images, list(captions), ["baseline", *settings], [(), *settings.values()],
                                 logits.cpu().numpy(), cosine.cpu().numpy())
