"""One evaluation table for any SAE on a HookedCLIP (docs/methods.md#evaluating-an-sae).

    table = evaluate_sae(model, sae, images=pixels, labels=labels, classes=["cat", "dog", ...])

Columns: the hook, architecture and sizes; on the hook's activations over the evaluation inputs
(every position a tower computes: up to EOT for texts), `explained_variance`, `l0` (mean active
latents per vector), `dead_fraction` (latents that never fire), `dense_fraction` (latents that fire
on more than `dense_above` of the vectors); and, with the reconstruction spliced in place of the
activation (`model.add_sae`, no error term) against the activation zero-ablated:
`S_recovered` = (S_recon - S_zero) / (S_clean - S_zero), S of each image with its label's prompt,
and `accuracy_recovered`, the same ratio for zero-shot accuracy over `classes` (NaN where clean
and zero-ablated agree). The SAE may read either tower: the images and the class prompts are both
encoded under each condition.
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from clip_lens.hooks import split_tower_prefix
from clip_lens.splicing import add_sae, remove_saes

CONDITIONS = ("clean", "reconstruction", "zero")
COLUMNS = ["hook", "architecture", "d_in", "n_latents", "vectors", "explained_variance", "l0", "dead_fraction",
           "dense_fraction", "S_clean", "S_reconstruction", "S_zero", "S_recovered", "accuracy_clean",
           "accuracy_reconstruction", "accuracy_zero", "accuracy_recovered"]


@torch.no_grad()
def evaluate_sae(model: Any, sae: Any, *, images: Tensor, labels: Sequence[int], classes: Sequence[str],
                 template: str = "a photo of a {}.", dense_above: float = 0.1, batch_size: int = 32) -> pd.DataFrame:
    """The one-row evaluation table of `sae` (its hook from `sae.hook`) on `images` [n, 3, H, W]
    labelled `labels` (indices into `classes`)."""
    hook = _checked(model, sae, images, labels, classes)
    tower, local = split_tower_prefix(hook)
    prompts = model.to_tokens([template.format(name) for name in classes])
    inputs = images if tower == "vision" else prompts
    row = {"hook": hook, "architecture": sae.architecture, "d_in": sae.d_in, "n_latents": sae.n_latents,
           **reconstruction_statistics(model, sae, inputs, tower, local, dense_above, batch_size)}
    labels = torch.as_tensor(list(labels), device=images.device)
    for condition in CONDITIONS:
        image_emb, class_emb = _embeddings(model, sae, images, prompts, condition, batch_size)
        scores = model.logit_scale.exp().float() * F.normalize(image_emb.float(), dim=-1) \
            @ F.normalize(class_emb.float(), dim=-1).T                                            # [n, classes]
        row[f"S_{condition}"] = float(scores[torch.arange(len(labels)), labels].mean())
        row[f"accuracy_{condition}"] = float((scores.argmax(-1) == labels).float().mean())
    for measure in ("S", "accuracy"):
        clean, recon, zero = (row[f"{measure}_{c}"] for c in CONDITIONS)
        row[f"{measure}_recovered"] = (recon - zero) / (clean - zero) if clean != zero else float("nan")
    return pd.DataFrame([row])[COLUMNS]


def _checked(model: Any, sae: Any, images: Tensor, labels: Sequence[int], classes: Sequence[str]) -> str:
    hook = getattr(sae, "hook", None)
    if hook is None or split_tower_prefix(hook)[0] is None:
        raise ValueError(f"the SAE's hook {hook!r} does not name a tower's hook point; set sae.hook, e.g. "
                         "'vision.blocks.11.hook_resid_post'")
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images; give one label per image")
    bad = [label for label in labels if not 0 <= int(label) < len(classes)]
    if bad:
        raise ValueError(f"label {bad[0]!r} is not an index into the {len(classes)} classes")
    return hook


def reconstruction_statistics(model: Any, sae: Any, inputs: Tensor, tower: str, local: str, dense_above: float,
                              batch_size: int) -> dict:
    """Explained variance, L0, dead and dense fractions of `sae` on the activations at `local` of
    `tower` over `inputs` (every position the tower computes; texts up to EOT)."""
    tower_module = getattr(model, tower)
    residual = active = 0.0
    count, sums, squares = 0, 0.0, 0.0
    fires = torch.zeros(sae.n_latents, device=tower_module.device)
    for lo in range(0, len(inputs), batch_size):
        batch = inputs[lo : lo + batch_size]
        _, cache = tower_module.run_with_cache(batch, names_filter=local)
        acts = _own_positions(tower_module, batch, cache[local]).float()                           # [vectors, d]
        recon, latents = sae(acts)
        residual += float((acts - recon.float()).pow(2).sum())
        sums, squares = sums + acts.sum(0), squares + acts.pow(2).sum(0)
        count += len(acts)
        fires += (latents > 0).float().sum(0)
        active += float((latents > 0).sum())
    total = float((squares - sums.pow(2) / count).sum())                                            # sum of squared deviations
    rate = fires / count
    return {"vectors": count, "explained_variance": 1 - residual / total, "l0": active / count,
            "dead_fraction": float((rate == 0).float().mean()), "dense_fraction": float((rate > dense_above).float().mean())}


def _own_positions(tower: Any, inputs: Tensor, acts: Tensor) -> Tensor:
    """[vectors, d]: the activations [batch, pos, d] at each input's own positions (texts: up to EOT)."""
    if acts.ndim == 2:
        return acts
    if tower.modality != "text":
        return acts.reshape(-1, acts.shape[-1])
    lengths = tower.sequence_lengths(inputs)
    keep = torch.arange(acts.shape[1], device=acts.device)[None] < lengths[:, None]
    return acts[keep]


def _embeddings(model: Any, sae: Any, images: Tensor, prompts: Tensor, condition: str,
                batch_size: int) -> tuple[Tensor, Tensor]:
    """(image embeddings [n, d_embed], class-prompt embeddings [classes, d_embed]) with the hook's
    activation as it is, replaced by the SAE's reconstruction, or zero."""
    tower, local = split_tower_prefix(sae.hook)
    hooks = {"vision": [], "text": []}
    if condition == "zero":
        hooks[tower] = [(local, lambda act, hook: torch.zeros_like(act))]
    if condition == "reconstruction":
        add_sae(model, sae, use_error_term=False)
    try:
        image_emb = torch.cat([model.vision.run_with_hooks(images[lo : lo + batch_size], fwd_hooks=hooks["vision"])
                               for lo in range(0, len(images), batch_size)])
        class_emb = model.text.run_with_hooks(prompts, fwd_hooks=hooks["text"])
    finally:
        if condition == "reconstruction":
            remove_saes(model, sae.hook)
    return image_emb, class_emb


@torch.no_grad()
def evaluate_reconstruction(model: Any, sae: Any, inputs: Tensor, *, dense_above: float = 0.1,
                            batch_size: int = 32) -> pd.DataFrame:
    """The evaluation table of `sae` without a labelled image set: the reconstruction columns on its
    tower's `inputs` (tokens or pixels), the S and accuracy columns NaN."""
    hook = getattr(sae, "hook", None)
    tower, local = split_tower_prefix(hook) if isinstance(hook, str) else (None, None)
    if tower is None:
        raise ValueError(f"the SAE's hook {hook!r} does not name a tower's hook point; set sae.hook")
    row = {"hook": hook, "architecture": sae.architecture, "d_in": sae.d_in, "n_latents": sae.n_latents,
           **reconstruction_statistics(model, sae, inputs, tower, local, dense_above, batch_size)}
    return pd.DataFrame([row]).reindex(columns=COLUMNS)
