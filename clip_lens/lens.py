"""Logit Lens for CLIP (docs/methods.md#logit-lens): each layer's residual stream, at the pooled position (EOT for
text, the class token for images), passed through the tower's final norm and projection into the
joint space and scored against the other modality's embedding."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.model import HookedCLIP
from clip_lens.patching.sites import hook_name
from clip_lens.scores import score


def residual_names(n_layers: int) -> list[str]:
    """Hook names of the residual stream at layers 0..L (docs/methods.md#layer-numbering)."""
    return [hook_name("resid", layer, n_layers) for layer in range(n_layers + 1)]


@torch.no_grad()
def logit_lens(model: HookedCLIP, inputs: Tensor, other: Float[Tensor, "n d_embed"],
               layers: Union[str, Sequence[int]] = "all") -> Float[Tensor, "n layer"]:
    """S(layer) = logit_scale.exp() * cos(final_norm_and_projection(resid_l[pooled]), other).

    Args:
        inputs: tokens [n, pos] (text tower) or pixels [n, 3, H, W] (vision tower).
        other: the other modality's embeddings, [n, d_embed] or [1, d_embed].
        layers: "all" (0..L) or a list.
    Returns:
        [n, len(layers)]; at layer L it equals the model's own score.
    """
    tower, inputs = model.tower_input(inputs, name="inputs")
    n_layers = tower.cfg.n_layers
    chosen = list(range(n_layers + 1)) if layers == "all" else [tower.check_layer(l) for l in layers]
    names = residual_names(n_layers)
    _, cache = tower.run_with_cache(inputs, names_filter=[names[l] for l in chosen])
    scores = []
    for layer in chosen:
        resid = cache[names[layer]]
        emb = tower.pool_residual(resid, inputs)
        scores.append(score(model, emb, other.expand_as(emb)))
    return torch.stack(scores, dim=1)


def joint_space_directions(tower, directions: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_embed"]:
    """Residual-stream directions carried into the joint embedding space by the linear part of the
    tower's final norm (centring and gain; the input-dependent scale and the bias left out) and its
    projection: W_proj^T (gamma * (d - mean(d))). Used to read what a direction (an SAE decoder row,
    a neuron's output weights) means in terms of the other modality's embeddings. In float32, on
    the tower's device, whatever the directions' and the tower's dtypes."""
    norm = tower.final_norm
    directions = directions.to(device=norm.w.device, dtype=torch.float32)
    centred = directions - directions.mean(-1, keepdim=True)
    carried = centred * norm.w.float()
    return carried @ tower.proj.W.float() if tower.proj is not None else carried
