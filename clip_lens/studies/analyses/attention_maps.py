"""Attention maps of the vision tower: where the class token looks, and how far each head reaches.

- `class_token_attention`: a head's attention from the class token over the patches, as a grid.
- `mean_attention_distance`: per head, the attention-weighted distance (in patches) between a
  query patch and the patches it attends to, averaged over query patches and images; the class
  token is left out as a query and as a key (the weights over patch keys are renormalised).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from clip_lens.hooks import stacked_activations
from clip_lens.model import HookedCLIP
from clip_lens.patching import hook_name
from clip_lens.plot import style


def patterns(model: HookedCLIP, pixels: Float[Tensor, "batch 3 H W"], layers: Sequence[int],
             batch_size: int = 16) -> Float[Tensor, "batch layer head query key"]:
    """Attention patterns of the vision tower for the given layers (0-based)."""
    n_layers = model.vision.cfg.n_layers
    return stacked_activations(model.vision, pixels, [hook_name("pattern", l, n_layers) for l in layers], batch_size)


def class_token_attention(pattern: Float[Tensor, "... query key"], grid: tuple[int, int]) -> Float[Tensor, "... gh gw"]:
    """The class token's attention over the patches, as a [grid_h, grid_w] map per leading index."""
    return pattern[..., 0, 1:].reshape(*pattern.shape[:-2], *grid)


def attention_distance(pattern: Float[Tensor, "... query key"], grid: tuple[int, int]) -> Float[Tensor, "..."]:
    """Mean over query patches of the attention-weighted Euclidean distance (in patches) to the key
    patches; the class token (position 0) excluded as query and key, weights renormalised."""
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, device=pattern.device), torch.arange(gw, device=pattern.device), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=-1).to(pattern.dtype)
    distance = torch.cdist(coords, coords)  # [patches, patches]
    weights = pattern[..., 1:, 1:]
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return (weights * distance).sum(dim=-1).mean(dim=-1)


def mean_attention_distance(model: HookedCLIP, pixels: Tensor, batch_size: int = 16) -> pd.DataFrame:
    """layer, head, distance (mean over images), std over images."""
    n_layers = model.vision.cfg.n_layers
    grid = model.vision.cfg.grid_size
    per_image = attention_distance(patterns(model, pixels, range(n_layers), batch_size), grid)  # [batch, layer, head]
    mean, std = per_image.mean(0), per_image.std(0) if len(per_image) > 1 else torch.zeros_like(per_image[0])
    rows = [(l, h, float(mean[l, h]), float(std[l, h])) for l in range(n_layers) for h in range(mean.shape[1])]
    return pd.DataFrame(rows, columns=["layer", "head", "distance", "std"])


def distance_figure(table: pd.DataFrame, title: str = "Mean attention distance per head") -> go.Figure:
    """One dot per head: mean attention distance against layer."""
    fig = px.strip(table, x="layer", y="distance", hover_data=["head", "std"], color_discrete_sequence=["#264653"])
    fig.update_xaxes(type="category", title_text="layer")
    fig.update_yaxes(title_text="mean attention distance (patches)")
    return style(fig, title, height=400)


def attention_map_figure(image: np.ndarray, maps: Float[Tensor, "head gh gw"], title: str, cols: int = 4) -> go.Figure:
    """The image with each head's class-token attention drawn over it (one panel per head).

    Args:
        image: [H, W, 3] uint8, the image as the model saw it (after resize and crop).
        maps: [head, grid_h, grid_w] attention of the class token over patches.
    """
    heads = maps.shape[0]
    rows = (heads + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {h}" for h in range(heads)],
                        horizontal_spacing=0.02, vertical_spacing=0.06)
    h_px, w_px = image.shape[:2]
    gh, gw = maps.shape[1:]
    for h in range(heads):
        r, c = h // cols + 1, h % cols + 1
        fig.add_trace(go.Image(z=image), row=r, col=c)
        fig.add_trace(go.Heatmap(z=maps[h].detach().float().cpu().numpy(), x0=w_px / gw / 2, dx=w_px / gw, y0=h_px / gh / 2, dy=h_px / gh,
                                 colorscale="Inferno", opacity=0.55, showscale=False,
                                 hovertemplate="attention %{z:.3f}<extra></extra>"), row=r, col=c)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return style(fig, title, height=260 * rows + 80)


def model_view(model: HookedCLIP, pixels: Float[Tensor, "3 H W"]) -> np.ndarray:
    """The preprocessed image [H, W, 3] uint8, normalisation undone, for drawing maps on."""
    pixels = pixels.detach().float().cpu()  # drawn on the host, whatever the model's device and dtype
    mean = torch.tensor(model.preprocess_cfg["mean"], device="cpu").view(3, 1, 1)
    std = torch.tensor(model.preprocess_cfg["std"], device="cpu").view(3, 1, 1)
    return ((pixels * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def class_token_table(model: HookedCLIP, pixels: Float[Tensor, "batch 3 H W"], images: Sequence[str], layer: int) -> pd.DataFrame:
    """The class token's attention over the patches at `layer` (0-based) for each image, long:
    image (path), layer, head, row, col, attention, and the model's input size (height, width),
    what `attention_map_figure` is drawn from (with `view_of_file`)."""
    cfg = model.vision.cfg
    if len(pixels) == 0:
        return pd.DataFrame(columns=["image", "layer", "head", "row", "col", "attention", "height", "width"])
    maps = class_token_attention(patterns(model, pixels, [layer])[:, 0], cfg.grid_size)  # [image, head, gh, gw]
    n, heads, gh, gw = maps.shape
    i, h, r, c = np.meshgrid(range(n), range(heads), range(gh), range(gw), indexing="ij")
    return pd.DataFrame({"image": np.asarray([str(p) for p in images], dtype=object)[i.ravel()], "layer": layer,
                         "head": h.ravel(), "row": r.ravel(), "col": c.ravel(),
                         "attention": maps.detach().float().cpu().numpy().ravel(),
                         "height": cfg.image_size[0], "width": cfg.image_size[1]})


def maps_of(table: pd.DataFrame) -> Float[Tensor, "head gh gw"]:
    """One image's rows of `class_token_table` back as [head, grid_h, grid_w]."""
    heads, gh, gw = table["head"].max() + 1, table["row"].max() + 1, table["col"].max() + 1
    ordered = table.sort_values(["head", "row", "col"])
    return torch.tensor(ordered["attention"].to_numpy().reshape(heads, gh, gw))


def view_of_file(path: str, size: tuple[int, int]) -> np.ndarray:
    """An image file resized and centre-cropped to `size` (open_clip's default evaluation
    transform) as [H, W, 3] uint8: the image about as the model saw it, to draw maps on."""
    from clip_lens.images import build_transform, default_preprocess_cfg, load_image

    cfg = default_preprocess_cfg(size)
    pixels = build_transform(cfg)(load_image(path))
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    return ((pixels * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
