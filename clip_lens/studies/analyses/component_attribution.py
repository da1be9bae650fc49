"""Attributing a CLIP score to latent components, and the faithfulness of the rankings (docs/methods.md#attribution-and-latent-components).

Attributions (all from attribution patching through `clip_lens.patch`, one forward and one backward
pass per chunk of instances): the estimated drop of S when a component is zeroed, i.e. a . dS/da,
per attention head, MLP neuron, position, or sparse-autoencoder latent. Positive: the component
supports the score. Latents are read against concept names (semantic alignment) and latents the
score relies on but that do not mean the instance's class are listed ("unexpected reliance").

Faithfulness: three rankings of the heads of one tower, per instance:
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
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from clip_lens.checkpoints import Checkpoints, concatenate
from clip_lens.hooks import split_tower_prefix
from clip_lens.model import HookedCLIP
from clip_lens.patching import hook_name, hook_site, patch
from clip_lens.plot import PALETTE, layer_axis, style
from clip_lens.sae.alignment import latent_alignment  # noqa: F401 (read here by the attribution study)
from clip_lens.scores import score as clip_score

METHODS = ("attribution patching", "logit lens", "random")


def _tower(model: HookedCLIP, inputs: Tensor):
    return model.tower_input(inputs, name="inputs")[0]


def _other_kind(model: HookedCLIP, inputs: Tensor) -> str:
    """The keyword `patch` takes the other modality by: "image" for texts, "text" for images."""
    return "image" if _tower(model, inputs).modality == "text" else "text"


def _zero_attribution(model: HookedCLIP, inputs: Tensor, other: Tensor, progress: bool = False, **grid) -> Tensor:
    """The attribution-patching estimate of the drop of S when each component of `grid` is zeroed."""
    res = patch(model, target=inputs, intervention="zero", method="attribution", progress=progress,
                **{_other_kind(model, inputs): other.detach()}, **grid)
    return -res.changes()


def attribution_scores(model: HookedCLIP, inputs: Tensor, other: Tensor) -> Float[Tensor, "n layer head"]:
    """Per head: estimated drop of S when the head is zeroed at every position (attribution patching)."""
    return _zero_attribution(model, inputs, other, hook="z", positions="sequence")


def neuron_attributions(model: HookedCLIP, inputs: Tensor, other: Tensor, layers="all",
                        progress: bool = False) -> Float[Tensor, "n layer neuron"]:
    """Per MLP neuron (all positions together): estimated drop of S when the neuron is zeroed."""
    return _zero_attribution(model, inputs, other, hook="mlp_post", layers=layers, positions="sequence",
                             progress=progress)


def position_attributions(model: HookedCLIP, inputs: Tensor, other: Tensor, hook: str = "resid", layers=(0,),
                          progress: bool = False) -> Float[Tensor, "n layer pos"]:
    """Per position: estimated drop of S when `hook` is zeroed at that one position. With the
    default (the residual at layer 0, the embedded tokens or patches) this is input x gradient per
    token / patch. NaN beyond a text's EOT."""
    return _zero_attribution(model, inputs, other, hook=hook, layers=list(layers), positions="all", progress=progress)


def latent_attributions(model: HookedCLIP, sae, hook_name: str, inputs: Tensor, other: Tensor,
                        position: Union[str, int] = "pooled", progress: bool = False) -> Float[Tensor, "n latent"]:
    """Per SAE latent: estimated drop of S when the latent is removed from the activation at
    `hook_name` (-c_j W_dec[j] added, the SAE's error term kept): c_j (W_dec[j] . dS/da).

    Args:
        sae: an SAE trained on this hook (`clip_lens.sae.TopKSAE` or any object with encode / W_dec).
        hook_name: a tower hook name ("blocks.11.hook_resid_post"; a "vision." / "text." prefix is
            accepted).
        position: "pooled" (the class token, or each text's EOT), "sequence" (every position
            together) or a position.
    """
    tower, checked = model.tower_input(inputs, name="inputs")
    kind, layer = hook_site(split_tower_prefix(hook_name)[1], tower.cfg.n_layers)
    if isinstance(position, str) and position == "pooled" and tower.modality == "text":
        inputs = checked
        eot = tower.pooled_positions(inputs)
        per_position = _zero_attribution(model, inputs, other, hook=kind, layers=[layer], positions="all", sae=sae,
                                         progress=progress)[:, 0]                          # [n, pos, latent]
        return per_position[torch.arange(len(inputs), device="cpu"), eot.cpu()]  # results live on the CPU
    positions = [0] if position == "pooled" else position
    attr = _zero_attribution(model, inputs, other, hook=kind, layers=[layer], positions=positions, sae=sae,
                             progress=progress)
    return attr[:, 0] if positions == "sequence" else attr[:, 0, 0]


def components_frame(values: Float[Tensor, "n layer unit"], unit: str, instances: Optional[Sequence] = None,
                     top: Optional[int] = None) -> pd.DataFrame:
    """Long table of per-instance attributions: instance, layer, <unit>, attribution; with `top`,
    only the `top` units with the largest mean |attribution| over instances (and their mean)."""
    n, n_layers, n_units = values.shape
    if top is not None:
        mean = values.nan_to_num().mean(0)                                     # [layer, unit]
        order = mean.abs().flatten().argsort(descending=True)[:top]
        rows = [dict(layer=int(i // n_units), **{unit: int(i % n_units)}, mean_attribution=float(mean.flatten()[i]),
                     share_positive=float((values[:, i // n_units, i % n_units] > 0).float().mean())) for i in order]
        return pd.DataFrame(rows)
    index = pd.MultiIndex.from_product([list(instances) if instances is not None else range(n), range(n_layers),
                                        range(n_units)], names=["instance", "layer", unit])
    return pd.DataFrame({"attribution": values.detach().reshape(-1).float().cpu().numpy()}, index=index).reset_index()


# ---------------------------------------------------------------------------------------------
# what latents mean: alignment with concept names, and unexpected reliance
# ---------------------------------------------------------------------------------------------
def unexpected_reliance(attributions: Float[Tensor, "n latent"], labels: Sequence[str],
                        alignment: Float[Tensor, "latent concept"], concepts: Sequence[str], top: int = 5,
                        threshold: float = 0.5) -> pd.DataFrame:
    """Per class: the `top` latents with the largest mean attribution over the class's instances, how
    well each aligns with the class's own concept, and a flag when it relies on a latent that does
    not mean the class.

    Alignment percentile: the share of all latents less aligned with the class's concept than this
    one (1 = the most aligned latent). Flagged ("unexpected") when the percentile is below
    `threshold` (default: less aligned than the median latent).

    Columns: class, rank, latent, mean_attribution, alignment, alignment_percentile, best_concept,
    best_alignment, unexpected.
    """
    labels = list(labels)
    concept_index = {c: i for i, c in enumerate(concepts)}
    rows = []
    for label in dict.fromkeys(labels):
        if label not in concept_index:
            raise ValueError(f"class {label!r} has no concept name (concepts: {list(concepts)})")
        members = torch.tensor([i for i, l in enumerate(labels) if l == label])
        mean = attributions[members].mean(0)
        column = alignment[:, concept_index[label]]
        for rank, latent in enumerate(mean.argsort(descending=True)[:top].tolist(), start=1):
            if mean[latent] <= 0:
                break  # only latents the score relies on
            percentile = float((column < column[latent]).float().mean())
            best = int(alignment[latent].argmax())
            rows.append(dict(**{"class": label}, rank=rank, latent=latent, mean_attribution=float(mean[latent]),
                             alignment=float(column[latent]), alignment_percentile=percentile,
                             best_concept=concepts[best], best_alignment=float(alignment[latent, best]),
                             unexpected=percentile < threshold))
    return pd.DataFrame(rows, columns=["class", "rank", "latent", "mean_attribution", "alignment", "alignment_percentile",
                                       "best_concept", "best_alignment", "unexpected"])


@torch.no_grad()
def logit_lens_scores(model: HookedCLIP, inputs: Tensor, other: Tensor) -> Float[Tensor, "n layer head"]:
    """Drop of S when one head's output at the pooled position is removed from the final residual."""
    tower = _tower(model, inputs)
    L = tower.cfg.n_layers
    names = [hook_name("z", l, L) for l in range(L)] + [hook_name("resid", L, L)]
    _, cache = tower.run_with_cache(inputs, names_filter=names)
    rows = torch.arange(len(inputs), device=tower.device)
    pooled = tower.pooled_positions(inputs)
    final = cache[names[-1]][rows, pooled]                                   # [n, d_model]

    def score(resid):
        emb = tower.pool_rows(resid)
        return clip_score(model, emb, other.expand_as(emb))

    clean = score(final)
    out = torch.zeros(len(inputs), L, tower.cfg.n_heads, device=tower.device)  # float32, as `clip_score`
    for l, block in enumerate(tower.blocks):
        z = cache[names[l]][rows, pooled]                                    # [n, head, d_head]
        per_head = torch.einsum("nhe,hed->nhd", z, block.attn.W_O)           # [n, head, d_model]
        if block.ls1 is not None:
            per_head = per_head * block.ls1
        for h in range(tower.cfg.n_heads):
            out[:, l, h] = clean - score(final - per_head[:, h])
    return out.cpu()


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
    kind = _other_kind(model, inputs)
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
                 seed: int = 0, checkpoints: Optional[Checkpoints] = None, chunk: int = 8) -> Faithfulness:
    """Deletion curves of attribution patching, Logit Lens and a random ranking, and their areas;
    the curves `chunk` instances at a time, each chunk saved to `checkpoints` as it finishes (and
    read from there by a resumed run)."""
    tower = _tower(model, inputs)
    other = other.detach()
    scores = {"attribution patching": attribution_scores(model, inputs, other),
              "logit lens": logit_lens_scores(model, inputs, other),
              "random": torch.rand(len(inputs), tower.cfg.n_layers, tower.cfg.n_heads,
                                   generator=torch.Generator().manual_seed(seed), device="cpu")}
    rows, areas = [], []
    for method, ranking in scores.items():
        curve = concatenate((checkpoints or Checkpoints(None)).chunks(
            f"deletion_curve_{method.replace(' ', '_')}", len(inputs), chunk, progress=False,
            compute=lambda lo, hi: {"curve": deletion_curve(model, inputs[lo:hi], other[lo:hi], ranking[lo:hi], ks)}),  # noqa: B023
            "curve")                                                        # [n, k]
        mean = curve.mean(0)
        for j, k in enumerate(ks):
            rows.append(dict(method=method, k=k, score=mean[j], change=mean[j] - mean[0]))
        # area under the mean score curve, per unit of k: smaller = the score falls faster
        areas.append(dict(method=method, area=float(np.trapezoid(mean, ks) / (ks[-1] - ks[0])), clean=float(mean[0])))
    return Faithfulness(pd.DataFrame(rows), pd.DataFrame(areas), scores)


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------
def logit_lens_figure(scores: Float[Tensor, "n layer"], names: Sequence[str], final: Float[Tensor, " n"]) -> go.Figure:
    """Logit Lens score per layer: one faint line per instance, the mean in bold, and the model's
    own score (which the last layer reproduces) as a dashed line."""
    fig = go.Figure()
    layers = list(range(scores.shape[1]))
    for i, name in enumerate(names):
        fig.add_trace(go.Scatter(x=layers, y=scores[i].tolist(), mode="lines", line=dict(color="#bbb", width=1),
                                 name=str(name), showlegend=False, hovertemplate=f"{name}<br>layer %{{x}}: %{{y:.3f}}<extra></extra>"))
    fig.add_trace(go.Scatter(x=layers, y=scores.mean(0).tolist(), mode="lines+markers", line=dict(color="#2a9d8f", width=3),
                             name="mean over instances"))
    fig.add_hline(y=float(final.mean()), line_dash="dash", line_color="#e76f51",
                  annotation_text="mean score of the model", annotation_position="bottom right")
    fig.update_xaxes(title_text="layer (0 = embeddings)")
    layer_axis(fig, "x", len(layers))
    fig.update_yaxes(title_text="S of the residual read out through the final norm and projection")
    return style(fig, "Logit Lens: the score read out of every layer's residual stream", height=420)


def position_map_figure(images: Sequence[np.ndarray], maps: Float[Tensor, "n gh gw"], titles: Sequence[str],
                        cols: int = 3) -> go.Figure:
    """Each image with its per-patch attribution drawn over it on a diverging scale (red supports
    the score, blue works against it)."""
    n = len(images)
    rows = (n + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(titles), horizontal_spacing=0.02, vertical_spacing=0.08)
    bound = float(maps.abs().max().clamp_min(1e-9))
    for i, image in enumerate(images):
        r, c = i // cols + 1, i % cols + 1
        h_px, w_px = image.shape[:2]
        gh, gw = maps.shape[1:]
        fig.add_trace(go.Image(z=image), row=r, col=c)
        fig.add_trace(go.Heatmap(z=maps[i].detach().float().cpu().numpy(), x0=w_px / gw / 2, dx=w_px / gw, y0=h_px / gh / 2, dy=h_px / gh,
                                 zmin=-bound, zmax=bound, colorscale="RdBu_r", opacity=0.6, showscale=i == 0,
                                 colorbar=dict(title="attribution"), hovertemplate="%{z:.4f}<extra></extra>"), row=r, col=c)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return style(fig, "Which patches the score relies on (input x gradient per patch, layer 0)", height=300 * rows + 80)


def reliance_figure(table: pd.DataFrame) -> go.Figure:
    """Relied-on latents per class: mean attribution against how well the latent aligns with the
    class (percentile among all latents); a colour per class, unexpected reliance as diamonds."""
    frame = table.assign(kind=np.where(table["unexpected"], "unexpected (low alignment)", "aligned with its class"))
    # a colour per class (up to 24 distinct), a symbol per kind: two symbols stay readable, twelve do not
    fig = px.scatter(frame, x="alignment_percentile", y="mean_attribution", color="class", symbol="kind",
                     hover_data=["class", "latent", "alignment", "best_concept"], color_discrete_sequence=PALETTE,
                     symbol_map={"aligned with its class": "circle", "unexpected (low alignment)": "diamond"})
    fig.update_traces(marker=dict(size=11, line=dict(width=1, color="white")))
    fig.update_xaxes(title_text="alignment with the class's concept (percentile among latents)", range=[-0.03, 1.03])
    fig.update_yaxes(title_text="mean attribution to S")
    return style(fig, "Latents each class relies on, and whether they mean the class", height=440)
