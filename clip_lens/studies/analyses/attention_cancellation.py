"""Layer-wise attention cancellation in the vision encoder (docs/methods.md#attention-cancellation).

In the chosen layers every position attends only to itself (the attention pattern becomes the
identity), so the attention block outputs out_proj(V). For each image and a list of candidate
captions: the caption CLIP selects, its cosine similarity, every caption's logit and the accuracy
against a label, for the baseline and every setting. Runs through `clip_lens.patch`
(`intervention="value_only"`, `metric="embedding"`).

With a captioner (`clip_lens.captioning`), each setting also generates a caption per image from the
cancelled tower, scored against the image by CLIP: under the same setting (as the selected caption
is) and against the unmodified image embedding (docs/methods.md#generated-captions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.checkpoints import Checkpoints
from clip_lens.data.image_sets import ImageSet
from clip_lens.model import HookedCLIP
from clip_lens.patching import hook_name, patch, value_only_attention
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
        generated: with a captioner, the caption generated per [setting][image]; None without.
        generated_cosine: [setting, image], cosine of the generated caption with the image
            embedding under the same setting; generated_cosine_clean: with the unmodified one.
    """

    images: pd.DataFrame
    captions: list
    settings: list
    layers: list
    logits: Float[np.ndarray, "setting image caption"]
    cosine: Float[np.ndarray, "setting image caption"]
    generated: Optional[list] = None
    generated_cosine: Optional[Float[np.ndarray, "setting image"]] = None
    generated_cosine_clean: Optional[Float[np.ndarray, "setting image"]] = None

    def predictions(self) -> pd.DataFrame:
        """One row per setting x image: selected caption, its cosine and logit, correct; with a
        captioner also the generated caption, its two cosines and whether it changed."""
        selected = self.logits.argmax(axis=-1)
        rows = []
        for s, setting in enumerate(self.settings):
            for i, row in enumerate(self.images.itertuples(index=False)):
                k = int(selected[s, i])
                rows.append(dict(setting=setting, image=_file_name(row.image), label=row.label, selected=self.captions[k],
                                 cosine=float(self.cosine[s, i, k]), logit=float(self.logits[s, i, k]),
                                 correct=bool(k == row.target) if row.target >= 0 else None,
                                 changed=bool(k != selected[0, i])))
                if self.generated is not None:
                    rows[-1].update(generated=self.generated[s][i], generated_cosine=float(self.generated_cosine[s, i]),
                                    generated_cosine_clean=float(self.generated_cosine_clean[s, i]),
                                    generated_changed=self.generated[s][i] != self.generated[0][i])
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """Per setting: its blocks (numbered from 0, as in every table; the setting's name keeps the
        study's 1-based layers), accuracy, mean cosine of the selected caption, and the share of
        images whose selection changed from the baseline. With a captioner (the study's Table 1):
        the mean cosine of the generated captions, under the setting and against the unmodified
        image, and the share of images whose generated caption changed."""
        pred = self.predictions()
        labelled = pred.dropna(subset=["correct"])
        columns = dict(mean_cosine=("cosine", "mean"), changed=("changed", "mean"))
        if self.generated is not None:
            columns.update(mean_generated_cosine=("generated_cosine", "mean"),
                           mean_generated_cosine_clean=("generated_cosine_clean", "mean"),
                           generated_changed=("generated_changed", "mean"))
        table = pred.groupby("setting", sort=False).agg(**columns)
        table["accuracy"] = labelled.groupby("setting", sort=False)["correct"].mean() if len(labelled) else np.nan
        table.insert(0, "blocks", ["" if not l else ",".join(str(b) for b in l) for l in self.layers])
        return table.reset_index()[["setting", "blocks", "accuracy", *columns]]

    def caption_table(self, image: int = 0) -> pd.DataFrame:
        """For one image, per setting (the study's Figure 5): the selected caption and, with a
        captioner, the generated one, each with its cosine under the setting."""
        if not 0 <= image < len(self.images):
            raise ValueError(f"image {image} is out of range: the study has {len(self.images)} images")
        pred = self.predictions()
        pred = pred.iloc[image :: len(self.images)]
        keep = ["setting", "selected", "cosine"] + (["generated", "generated_cosine"] if self.generated is not None else [])
        return pred[keep].reset_index(drop=True)

    def logits_frame(self) -> pd.DataFrame:
        """Long format: setting, image, caption, logit, cosine."""
        s, i, c = np.meshgrid(range(len(self.settings)), range(len(self.images)), range(len(self.captions)), indexing="ij")
        return pd.DataFrame({"setting": np.array(self.settings)[s.ravel()],
                             "image": [_file_name(p) for p in self.images["image"].to_numpy()[i.ravel()]],
                             "caption": np.array(self.captions)[c.ravel()],
                             "logit": self.logits.ravel(), "cosine": self.cosine.ravel()})

    def images_frame(self) -> pd.DataFrame:
        """One row per image: image (path), label, target (its correct caption's index, -1: none)."""
        return self.images[["image", "label", "target"]].assign(image=[str(p) for p in self.images["image"]])

    def figures(self) -> dict[str, go.Figure]:
        return figures(self.summary(), self.logits_frame(), self.images_frame())

    def generated_figure(self, summary: Optional[pd.DataFrame] = None) -> go.Figure:
        return generated_figure(self.summary() if summary is None else summary)


def figures(summary: pd.DataFrame, logits: pd.DataFrame, images: pd.DataFrame) -> dict[str, go.Figure]:
    """The study's figures from its tables: `summary`, `logits` (long, setting x image x caption, as
    `AttentionCancellation.logits_frame`) and `images` (image, label, target, as `images_frame`)."""
    figures = {"cancellation_accuracy": accuracy_figure(summary),
               "cancellation_cosine": cosine_figure(summary, logits, images)}
    if "mean_generated_cosine" in summary:
        figures["cancellation_generated"] = generated_figure(summary)
    return figures


def accuracy_figure(summary: pd.DataFrame) -> go.Figure:
    """Accuracy per setting (without labels: the share of images whose selection changed)."""
    accuracy = summary["accuracy"].notna().any()
    y = "accuracy" if accuracy else "changed"
    bars = px.bar(summary, x="setting", y=y, color=np.where(summary["setting"] == "baseline", "baseline", "cancelled"),
                  color_discrete_map={"baseline": "#264653", "cancelled": "#e76f51"}, hover_data=["blocks", "mean_cosine"])
    bars.update_layout(showlegend=False)
    bars.update_xaxes(title_text="self-attention cancelled in layers", type="category")
    bars.update_yaxes(title_text="accuracy" if accuracy else "share of images whose caption changed", range=[0, 1])
    return style(bars, "Accuracy with self-attention cancelled" if accuracy else
                 "Selections changed by cancelling self-attention", height=420)


def cosine_figure(summary: pd.DataFrame, logits: pd.DataFrame, images: pd.DataFrame) -> go.Figure:
    """Heat map [image x setting] of the cosine with the correct caption (without labels: with the
    selected one)."""
    accuracy = summary["accuracy"].notna().any()
    settings = list(summary["setting"])
    cosine = logits["cosine"].to_numpy().reshape(len(settings), len(images), -1)   # [setting, image, caption]
    correct = np.take_along_axis(cosine, np.maximum(images["target"].to_numpy(), 0)[None, :, None], axis=-1)[..., 0]
    heat = go.Figure(go.Heatmap(z=(correct if accuracy else cosine.max(axis=-1)).T, x=settings,
                                y=[_file_name(p) for p in images["image"]], colorscale="Viridis",
                                colorbar=dict(title="cosine"),
                                hovertemplate="%{y}<br>%{x}<br>cosine %{z:.4f}<extra></extra>"))
    heat.update_xaxes(type="category", title_text="setting")
    return style(heat, "Cosine similarity with the " + ("correct" if accuracy else "selected") + " caption",
                 height=max(360, 24 * len(images) + 160))


def generated_figure(summary: pd.DataFrame) -> go.Figure:
    """Mean cosine per setting of the selected and of the generated captions (Table 1 drawn)."""
    fig = go.Figure()
    for column, name, colour in (("mean_cosine", "selected caption", "#264653"),
                                 ("mean_generated_cosine", "generated caption", "#e76f51"),
                                 ("mean_generated_cosine_clean", "generated caption, unmodified image", "#f4a261")):
        fig.add_bar(x=summary["setting"], y=summary[column], name=name, marker_color=colour,
                    hovertemplate="%{x}<br>" + name + ": %{y:.4f}<extra></extra>")
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category", title_text="self-attention cancelled in layers")
    fig.update_yaxes(title_text="mean cosine with the image")
    return style(fig, "CLIP similarity of selected and generated captions", height=420)


def _file_name(path) -> str:
    return str(path).replace("\\", "/").rsplit("/", 1)[-1]


def generate_captions(model: HookedCLIP, captioner, settings: dict[str, tuple[int, ...]], *, images: Sequence = (),
                      pixels: Optional[Tensor] = None, beams: int = 1, max_new_tokens: Optional[int] = None,
                      progress: bool = True) -> list[list[str]]:
    """Captions per [setting][image] from `captioner` with self-attention cancelled in each
    setting's blocks of the tower it reads (an empty setting: the baseline).

    `pixels` are used when the captioner reads `model.vision`; a captioner with its own tower
    (a Hugging Face vision-encoder-decoder) preprocesses `images` itself.
    """
    reader = model if captioner.reads_model else None  # a captioner with its own tower refuses model=
    tower = captioner.vision_tower(reader)
    n_layers = tower.cfg.n_layers
    for name, layers in settings.items():
        if layers and max(layers) >= n_layers:
            raise ValueError(f"setting {name!r} cancels block {max(layers)}, but the captioner's vision tower has "
                             f"{n_layers} blocks")
    if tower is model.vision and pixels is not None:
        inputs = pixels
    elif len(images):
        inputs = captioner.to_pixels(list(images), reader)
    else:
        raise ValueError("the captioner reads its own vision tower and needs the images (paths or PIL images), not "
                         "the CLIP's pixels")
    out = []
    for layers in tqdm(settings.values(), desc="generating captions", disable=not progress):
        hooks = [(hook_name("pattern", layer, n_layers), value_only_attention) for layer in layers]
        with tower.hooks(fwd_hooks=hooks):
            out.append(captioner.caption(inputs, reader, beams=beams, max_new_tokens=max_new_tokens))
    return out


@dataclass(frozen=True)
class Captioning:
    """Generated captions in `run`: `captioner` (a `clip_lens.captioning.Captioner`), greedy
    decoding or beam search with `beams` > 1, at most `max_new_tokens` (default: the captioner's)."""

    captioner: Any
    beams: int = 1
    max_new_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if self.captioner is None:
            raise ValueError("beams and max_new_tokens shape generated captions: give a captioner too")


def run(model: HookedCLIP, images: ImageSet, *, settings: Optional[dict[str, tuple[int, ...]]] = None,
        pixels: Optional[Tensor] = None, captioner=None, pair_chunk: int = 32, checkpoints: Optional[Checkpoints] = None,
        progress: bool = True) -> AttentionCancellation:
    """Cancel self-attention in each setting and score every image against every caption.

    Args:
        images: the image set (`clip_lens.data.image_sets.ImageSet`): `frame` with `image` (paths)
            and optionally `label`, the candidate `captions`, and `targets`, each image's correct
            caption index (-1: unknown; None: all unknown).
        settings: name -> 0-based blocks (default `default_settings`).
        pixels: [n, 3, H, W] instead of reading `images.frame["image"]`.
        captioner: a `clip_lens.captioning.Captioner` (greedy decoding) or a `Captioning`: also
            generate a caption per image and setting and score it with CLIP.
        pair_chunk: images run at a time, and saved as one chunk unless `checkpoints.sized(n)` saves every n.
        checkpoints: save each finished chunk of images there, and read back the chunks an
            interrupted run saved (`clip_lens.checkpoints`).
    """
    captioning = captioner if captioner is None or isinstance(captioner, Captioning) else Captioning(captioner)
    captions = list(images.captions)
    targets = images.targets
    images = images.frame.reset_index(drop=True).copy()
    if "label" not in images:
        images["label"] = None
    images["target"] = np.asarray(targets if targets is not None else [-1] * len(images), dtype=int)
    settings = settings or default_settings(model.vision.cfg.n_layers)
    if pixels is None:
        pixels = model.to_pixels(list(images["image"]))
    paths = list(images["image"])

    def chunk(lo: int, hi: int) -> dict[str, np.ndarray]:
        """Image-major arrays of images lo..hi - 1: embeddings [image, setting, d_embed] (the
        baseline first) and, with a captioner, the generated captions [image, setting]."""
        result = patch(model, target=pixels[lo:hi], hook="pattern", intervention="value_only",
                       layers=list(settings.values()), metric="embedding", pair_chunk=pair_chunk, progress=False)
        arrays = {"embeddings": torch.cat([result.baseline[:, None], result.effects], dim=1).float().cpu().numpy()}
        if captioning is not None:
            generated = generate_captions(model, captioning.captioner, {"baseline": (), **settings}, images=paths[lo:hi],
                                          pixels=pixels[lo:hi], beams=captioning.beams,
                                          max_new_tokens=captioning.max_new_tokens, progress=False)
            arrays["generated"] = np.array(generated, dtype=str).T  # [image, setting]
        return arrays

    chunks = (checkpoints or Checkpoints(None)).chunks("attention_cancellation", len(images), pair_chunk, chunk, progress,
                                                       ids=[str(p) for p in paths])
    embeddings = torch.from_numpy(np.concatenate([c["embeddings"] for c in chunks])).permute(1, 0, 2)  # [setting, image, d]
    embeddings, text = embeddings.to(model.device), encode_texts(model, captions).float()
    with torch.no_grad():
        cosine = F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).T
        logits = model.logits_from_embeddings(embeddings, text)
    result = AttentionCancellation(images, captions, ["baseline", *settings], [(), *settings.values()],
                                   logits.cpu().numpy(), cosine.cpu().numpy())
    if captioning is not None:
        generated = np.concatenate([c["generated"] for c in chunks]).T  # [setting, image]
        result.generated = [[str(caption) for caption in row] for row in generated]
        result.generated_cosine, result.generated_cosine_clean = _generated_cosines(model, result.generated, embeddings)
    return result


def _generated_cosines(model: HookedCLIP, generated: list[list[str]], embeddings: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of each generated caption's text embedding with the image embedding under its setting
    ([setting, image]) and with the unmodified (baseline) image embedding."""
    unique = sorted({c for per_setting in generated for c in per_setting})
    text = F.normalize(encode_texts(model, unique).float(), dim=-1)
    index = {c: i for i, c in enumerate(unique)}
    rows = torch.tensor([[index[c] for c in per_setting] for per_setting in generated], device=text.device)
    caption = text[rows]                                     # [setting, image, d_embed]
    images = F.normalize(embeddings.float(), dim=-1)          # [setting, image, d_embed]
    with torch.no_grad():
        return ((caption * images).sum(-1).cpu().numpy(), (caption * images[:1]).sum(-1).cpu().numpy())
