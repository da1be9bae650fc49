"""A latent browser: what each latent of an SAE fires on, in one self-contained HTML page.

    data = browser_data(model, sae, image_paths, concepts=["red", "green", "blue"])
    write_browser(data, "runs/sae/latents.html")      # open it; `#latent-17` is latent 17's section
    data = read_browser_data("runs/sae/latents.html")  # the same dict, read back from the page

Latents are computed at every position of the SAE's hook. An input's score for a latent is its
activation at the pooled position (the class token, or a text's EOT; a vision tower pooled by the
mean of its patches: the mean over patches), or with `rank_by="max"` its largest activation at any
position. Per latent: the inputs with the largest scores (images with the latent's map over the
patches, texts with each token's activation), a histogram of its non-zero scores, the share of
inputs with a non-zero score, the concept names it aligns with best
(`clip_lens.sae.alignment.latent_alignment`) and its mean attribution for each class it is relied
on for (positive only).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.hooks import split_tower_prefix
from clip_lens.sae.alignment import latent_alignment
from clip_lens.sae.browser_page import render_page

DATA_TAG = re.compile(r'<script type="application/json" id="latent-data">(.*?)</script>', re.S)
HISTOGRAM_BINS = 20
THUMBNAIL = 96  # pixels on the longer side of an embedded image


# --- where to read ---------------------------------------------------------------------------------
def _resolve_hook(model: Any, sae, hook: Optional[str], inputs: Any) -> tuple[str, str]:
    """(tower "vision" / "text", the hook's name inside the tower), from `hook` or the SAE's own."""
    name = hook if hook is not None else getattr(sae, "hook", None)
    if name is None:
        raise ValueError("the SAE does not say which hook it reads (sae.hook is None): pass hook=, e.g. "
                         "'vision.blocks.2.hook_resid_post'")
    prefix, local = split_tower_prefix(name)
    tower, _ = model.tower_input(inputs[:1] if isinstance(inputs, (list, tuple, Tensor)) else inputs, name="inputs")
    if prefix is not None and prefix != tower.modality:
        raise ValueError(f"hook {name!r} is in the {prefix} tower, but the inputs are {tower.modality} inputs")
    return tower.modality, local


def _prepared_inputs(model: Any, inputs: Any) -> tuple[Any, Tensor, list[str]]:
    """(tower, the tower's inputs, a name per input: the file name, or the text)."""
    if isinstance(inputs, (list, tuple)) and not inputs:
        raise ValueError("inputs is empty: give at least one image or text")
    tower, checked = model.tower_input(list(inputs) if isinstance(inputs, tuple) else inputs, name="inputs")
    if isinstance(inputs, (list, tuple)) and tower.modality == "text":
        names = [str(text) for text in inputs]
    elif isinstance(inputs, (list, tuple)):
        names = [Path(item).name if isinstance(item, (str, os.PathLike)) else f"image {i}" for i, item in enumerate(inputs)]
    else:
        names = [f"{'text' if tower.modality == 'text' else 'image'} {i}" for i in range(len(checked))]
    return tower, checked, names


@torch.no_grad()
def _latents(tower, sae, hook: str, batch: Tensor) -> Tensor:
    """The SAE's latents at every position of a batch, [b, pos, n_latents]; a text's positions
    after its EOT are 0."""
    _, cache = tower.run_with_cache(batch, names_filter=[hook])
    if hook not in cache:
        raise ValueError(f"the {tower.modality} tower has no hook {hook!r}")
    acts = cache[hook]
    if acts.ndim != 3 or acts.shape[-1] != sae.d_in:
        raise ValueError(f"hook {hook!r} gives activations of shape {list(acts.shape)}; the SAE reads "
                         f"[batch, position, {sae.d_in}]")
    latents = sae.encode(acts.to(sae.W_dec.device)).float().cpu()
    if tower.modality == "text":
        own = torch.arange(latents.shape[1])[None] < tower.sequence_lengths(batch).cpu()[:, None]
        latents = latents * own[..., None]
    return latents


def _scores(tower, latents: Tensor, batch: Tensor, rank_by: str) -> Tensor:
    """Each input's score for each latent, [b, n_latents] (see the module's docstring)."""
    if rank_by == "max":
        return latents.amax(1)
    if tower.modality == "text":
        return latents[torch.arange(len(latents)), tower.pooled_positions(batch).cpu()]
    if tower.pools_class_token:
        return latents[:, 0]
    return latents[:, -tower.cfg.n_patches:].mean(1)


def _per_position(tower, latents: Tensor, latent: int, length: int) -> list:
    """One input's activations of one latent: the map over the patch grid `[grid_h][grid_w]` (vision)
    or one value per token up to EOT (text)."""
    if tower.modality == "text":
        return [round(float(v), 5) for v in latents[:length, latent]]
    gh, gw = tower.cfg.grid_size
    grid = latents[-gh * gw:, latent].reshape(gh, gw)
    return [[round(float(v), 5) for v in row] for row in grid]


# --- what is embedded -----------------------------------------------------------------------------
def _thumbnail(model: Any, pixels: Tensor) -> str:
    """The image the model saw (its normalisation undone), as a PNG data URI."""
    from PIL import Image

    mean = torch.as_tensor(model.preprocess_cfg["mean"]).view(3, 1, 1)
    std = torch.as_tensor(model.preprocess_cfg["std"]).view(3, 1, 1)
    rgb = (pixels.float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(rgb)
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _histogram(scores: np.ndarray) -> dict:
    """Bin edges and counts of the non-zero scores (empty for a latent that never fires)."""
    fired = scores[scores != 0]
    if not len(fired):
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(fired, bins=HISTOGRAM_BINS)
    return {"edges": [round(float(e), 5) for e in edges], "counts": [int(c) for c in counts]}


def _concepts(model: Any, sae, tower: str, concepts: Optional[Sequence[str]], top: int,
              template: str) -> list[list[dict]]:
    """Per latent, its `top` best-aligned concept names with their cosines (empty without concepts);
    each name is read as the text `template.format(name)`."""
    if not concepts:
        return [[] for _ in range(sae.n_latents)]
    concepts = list(concepts)
    cosines = latent_alignment(model, sae, tower, concepts, template=template).cpu()   # [latent, concept]
    values, order = cosines.topk(min(top, len(concepts)), dim=1)
    return [[{"concept": concepts[int(c)], "cosine": round(float(v), 4)} for v, c in zip(vs, cs)]
            for vs, cs in zip(values, order)]


def attributions_by_latent(attributions: Optional[pd.DataFrame], n_latents: int) -> list[list[dict]]:
    """Per latent, its mean attribution for each class it is relied on for (positive means only),
    largest first.

    `attributions`: the attribution study's `latent_attributions` table (instance, label, latent,
    attribution: the mean over a class is the sum over its rows divided by the class's instances
    in the table), its `reliance` table (class, latent, mean_attribution), or any table with
    latent, class (or label) and attribution (or mean_attribution) columns (rows averaged).
    """
    out: list[list[dict]] = [[] for _ in range(n_latents)]
    if attributions is None:
        return out
    frame = attributions.rename(columns={"label": "class"}) if "class" not in attributions else attributions
    value = "attribution" if "attribution" in frame else "mean_attribution"
    missing = [c for c in ("latent", "class", value) if c not in frame]
    if missing:
        raise ValueError(f"attributions lacks column(s) {', '.join(missing)}; it has {list(attributions.columns)} "
                         "(give latent, class or label, and attribution or mean_attribution)")
    latents = pd.to_numeric(frame["latent"], errors="coerce")
    bad = frame.index[latents.isna() | (latents < 0) | (latents >= n_latents) | (latents % 1 != 0)]
    if len(bad):
        raise ValueError(f"attributions row {bad[0]}: latent {frame.loc[bad[0], 'latent']!r} is not one of the "
                         f"SAE's latents 0..{n_latents - 1}")
    frame = frame.assign(latent=latents.astype(int))
    if "instance" in frame:
        sums = frame.groupby(["latent", "class"])[value].sum()
        instances = frame.groupby("class")["instance"].nunique()
        means = sums / instances.reindex(sums.index.get_level_values("class")).to_numpy()
    else:
        means = frame.groupby(["latent", "class"])[value].mean()
    for (latent, label), mean in means[means > 0].sort_values(ascending=False).items():
        out[int(latent)].append({"class": str(label), "attribution": round(float(mean), 6)})
    return out


# --- the data --------------------------------------------------------------------------------------
def _score_all(tower, sae, hook: str, inputs: Tensor, rank_by: str, batch_size: int, progress: bool) -> Tensor:
    """Every input's score for every latent, [n, n_latents] (kept in memory: n x n_latents floats)."""
    scores = []
    for i in tqdm(range(0, len(inputs), batch_size), desc="latents", disable=not progress):
        batch = inputs[i:i + batch_size]
        scores.append(_scores(tower, _latents(tower, sae, hook, batch), batch, rank_by))
    return torch.cat(scores)


def _top_entries(tower, sae, hook: str, inputs: Tensor, names: list[str], tops: list[list[int]], scores: Tensor,
                 batch_size: int) -> list[list[dict]]:
    """Per latent, one entry per top input: its index, name, score and per-position activations
    (the patch map, or the tokens and each token's activation), from a second pass over the top
    inputs only."""
    needed = sorted({i for top in tops for i in top})
    wanted = {i: [j for j, top in enumerate(tops) if i in top] for i in needed}
    entries: dict[tuple[int, int], dict] = {}
    lengths = tower.sequence_lengths(inputs).cpu() if tower.modality == "text" else None
    for start in range(0, len(needed), batch_size):
        chunk = needed[start:start + batch_size]
        latents = _latents(tower, sae, hook, inputs[chunk])
        for row, i in enumerate(chunk):
            length = int(lengths[i]) if lengths is not None else 0
            for j in wanted[i]:
                entry = {"input": i, "name": names[i], "activation": round(float(scores[i, j]), 5)}
                key = "token_activations" if tower.modality == "text" else "map"
                entry[key] = _per_position(tower, latents[row], j, length)
                entries[(i, j)] = entry
    return [[entries[(i, j)] for i in top] for j, top in enumerate(tops)]


def _input_table(model: Any, tower, inputs: Tensor, names: list[str], used: set[int]) -> dict[str, dict]:
    """The inputs some latent shows, by index: an image's thumbnail, or a text's tokens up to EOT."""
    table = {}
    for i in sorted(used):
        if tower.modality == "text":
            length = int(tower.sequence_lengths(inputs[i:i + 1])[0])
            table[str(i)] = {"name": names[i], "text": names[i], "tokens": tower.to_str_tokens(inputs[i])[:length]}
        else:
            table[str(i)] = {"name": names[i], "image": _thumbnail(model, inputs[i])}
    return table


def browser_data(model: Any, sae, inputs: Any, *, hook: Optional[str] = None, top: int = 9,
                 concepts: Optional[Sequence[str]] = None, attributions: Optional[pd.DataFrame] = None,
                 rank_by: str = "pooled", top_concepts: int = 5, concept_template: str = "a photo of a {}.",
                 batch_size: int = 32, progress: bool = True) -> dict:
    """The browser's data for every latent of `sae` over `inputs`, as a JSON-ready dict.

    Args:
        model: a HookedCLIP.
        sae: an SAE (`clip_lens.sae.SparseAutoencoder`) trained on `hook`.
        inputs: images (paths, PIL images) or pixels [n, 3, H, W]; or texts or tokens [n, pos].
        hook: the hook the SAE reads ("vision.blocks.2.hook_resid_post"); default `sae.hook`.
        top: inputs shown per latent (those with the largest scores, non-zero only).
        concepts: concept names to align latents with (`clip_lens.sae.alignment.latent_alignment`).
        concept_template: the text each concept name is read as, `{}` the name (default "a photo of
            a {}."; e.g. "There is a {}." for the tiny CLIP's captions).
        attributions: a table of latent attributions per class (see `attributions_by_latent`).
        rank_by: "pooled" (the pooled position's activation) or "max" (the largest at any position).

    Returns {"tower", "hook", "n_inputs", "n_latents", "rank_by", "inputs": {index: {"name", "image"
    (a PNG data URI) or "text" and "tokens"}}, "latents": [{"latent", "fire_rate", "max_activation",
    "histogram": {"edges", "counts"}, "top": [{"input", "name", "activation", "map" `[grid_h][grid_w]`
    or "token_activations" [tokens]}], "concepts": [{"concept", "cosine"}], "attributions":
    [{"class", "attribution"}]}]}.
    """
    if rank_by not in ("pooled", "max"):
        raise ValueError(f"rank_by={rank_by!r}: give 'pooled' or 'max'")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top={top!r}: give a positive integer")
    modality, local = _resolve_hook(model, sae, hook, inputs)
    tower, checked, names = _prepared_inputs(model, inputs)
    scores = _score_all(tower, sae, local, checked, rank_by, batch_size, progress)     # [n, latent]
    values, order = scores.topk(min(top, len(scores)), dim=0)                            # [top, latent]
    tops = [[int(i) for v, i in zip(values[:, j], order[:, j]) if v > 0] for j in range(sae.n_latents)]
    entries = _top_entries(tower, sae, local, checked, names, tops, scores, batch_size)
    aligned = _concepts(model, sae, modality, concepts, top_concepts, concept_template)
    relied = attributions_by_latent(attributions, sae.n_latents)
    column = scores.numpy()
    latents = [{"latent": j, "fire_rate": round(float((column[:, j] > 0).mean()), 6),
                "max_activation": round(float(column[:, j].max()), 5), "histogram": _histogram(column[:, j]),
                "top": entries[j], "concepts": aligned[j], "attributions": relied[j]} for j in range(sae.n_latents)]
    return {"tower": modality, "hook": f"{modality}.{local}", "n_inputs": len(checked), "n_latents": sae.n_latents,
            "rank_by": rank_by, "inputs": _input_table(model, tower, checked, names, {i for t in tops for i in t}),
            "latents": latents}


# --- the page --------------------------------------------------------------------------------------
def write_browser(data: dict, path: Union[str, Path], title: str = "SAE latents") -> Path:
    """One self-contained HTML page for `data` (from `browser_data`): search, a list of latents and
    a section per latent (anchor `#latent-<index>`); no network access (inline CSS, JS and data URIs),
    the data embedded as JSON in `<script type="application/json" id="latent-data">`. Written whole
    under a temporary name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")
    html = render_page(data, payload, title)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_browser_data(path: Union[str, Path]) -> dict:
    """The data embedded in a page written by `write_browser`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent browser page not found: {path}")
    match = DATA_TAG.search(path.read_text(encoding="utf-8"))
    if match is None:
        raise ValueError(f"{path} holds no latent data (no <script id=\"latent-data\"> block): not a latent browser page")
    return json.loads(match.group(1).replace("<\\!--", "<!--"))
