"""Causal tracing in the vision encoder against the subject-removed image
(docs/methods.md#image-causal-tracing).

The run on the image without its subject is the target; the original image's residual at one
(layer, position) is restored into it, and the change of d is read as a share of what the subject
adds to d altogether. Positions are the class token and the patches, the patches split into those
the subject covers (any pixel differs between the two images) and the background.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from clip_lens.checkpoints import Checkpoints, concatenate
from clip_lens.images import ImageLike
from clip_lens.model import HookedCLIP
from clip_lens.patching import patch
from clip_lens.scores import difference_metric
from clip_lens.studies.analyses.existence import ExistenceInstances
from clip_lens.studies.analyses.image_ablation import baseline_source

REGIONS = ("class token", "subject", "background")
STUDY = "image_tracing"
CELL_COLUMNS = ["id", "layer", "position", "region", "change", "total"]


def subject_positions(pixels: Tensor, baseline: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """[n, 1 + n_patches] bool: the patches (row-major, after the class token at 0) in which any
    pixel of `pixels` [n, 3, H, W] differs from `baseline`: where the subject was."""
    differs = (pixels != baseline).any(dim=1).float()                                        # [n, H, W]
    per_patch = F.max_pool2d(differs[:, None], kernel_size=patch_size, stride=patch_size) > 0  # [n, 1, gh, gw]
    cls = torch.zeros(len(pixels), 1, dtype=torch.bool, device=pixels.device)
    return torch.cat([cls, per_patch.flatten(1)], dim=1)


def run(model: HookedCLIP, instances: ExistenceInstances, baseline: Union[Tensor, Sequence[ImageLike]], *,
        pixels: Optional[Tensor] = None, layers="all", checkpoints: Optional[Checkpoints] = None,
        progress: bool = True, pair_chunk: int = 16) -> pd.DataFrame:
    """One row per instance whose baseline differs from its image x layer x position: `change` =
    d(restored) - d(baseline image) and `total` = d(image) - d(baseline image), the subject's
    whole effect on d; `region` is "class token", "subject" or "background".

    Args:
        baseline: the subject-removed images, one per instance ([n, 3, H, W] model inputs, or
            images), row-aligned with the instances; instances whose baseline equals their own
            pixels (no subject in the image) are left out.
        pixels: the instances' model inputs (default: read from their image paths).
        layers: "all" (0..L, docs/methods.md#layer-numbering) or a list.
        checkpoints: chunks of `pair_chunk` instances saved as they finish and read back by a resumed run.
    """
    frame = instances.frame
    if pixels is None and "image_path" not in frame:
        raise ValueError("give pixels, or instances prepared from an image folder")
    source = baseline_source(model, instances, baseline, STUDY)
    caption_emb, foil_emb = instances.text_embeddings(model)
    difference = F.normalize(caption_emb.float(), dim=-1) - F.normalize(foil_emb.float(), dim=-1)
    patch_size = model.vision.cfg.patch_size

    def chunk(lo: int, hi: int) -> dict:
        image = pixels[lo:hi] if pixels is not None else model.to_pixels(list(frame["image_path"][lo:hi]))
        removed = source.pixels(lo, hi, image)
        result = patch(model, target=removed, source=image, text=difference[lo:hi], hook="resid", layers=layers,
                       positions="all", metric=difference_metric(model), progress=False)
        return {"d_restored": result.effects.numpy(), "d_removed": result.baseline.numpy(),
                "d_image": result.source_baseline.numpy(), "layers": np.asarray(result.layers),
                "subject": subject_positions(image, removed, patch_size).cpu().numpy(),
                "same": (image == removed).flatten(1).all(dim=1).cpu().numpy()}

    chunks = (checkpoints or Checkpoints(None)).chunks(STUDY, len(frame), pair_chunk, chunk, progress,
                                                        ids=list(frame["id"]))
    arrays = {name: concatenate(chunks, name) for name in ("d_restored", "d_removed", "d_image", "subject", "same")}
    return _cells(frame["id"].to_numpy(), arrays, chunks[0]["layers"].tolist())


def _cells(ids: np.ndarray, arrays: dict, layers: list) -> pd.DataFrame:
    """The long table of `run` from its arrays ([n, layers, positions] d_restored, [n] d_removed,
    d_image and same, [n, positions] subject)."""
    keep = ~arrays["same"].astype(bool)
    restored, removed, image = arrays["d_restored"][keep], arrays["d_removed"][keep], arrays["d_image"][keep]
    subject = arrays["subject"][keep].astype(bool)
    n, n_layers, n_positions = restored.shape
    region = np.where(subject, REGIONS[1], REGIONS[2]).astype(object)  # object: no fixed-width truncation
    region[:, 0] = REGIONS[0]
    index = np.indices((n, n_layers, n_positions)).reshape(3, -1)          # instance, layer, position per cell
    instance, layer, position = index
    return pd.DataFrame({"id": ids[keep][instance], "layer": np.asarray(layers)[layer], "position": position,
                         "region": region[instance, position],
                         "change": (restored - removed[:, None, None]).reshape(-1),
                         "total": (image - removed)[instance]})[CELL_COLUMNS]


def region_shares(cells: pd.DataFrame) -> pd.DataFrame:
    """Per layer and region: the restored share of the subject's effect on d, sum(change) /
    sum(total) over the region's cells (each instance weighted by its own total), and the cells."""
    sums = cells.groupby(["layer", "region"], sort=False).agg(change=("change", "sum"), total=("total", "sum"),
                                                              cells=("change", "size"))
    out = sums.assign(share=sums["change"] / sums["total"]).reset_index()
    out["region"] = pd.Categorical(out["region"], categories=REGIONS, ordered=True)
    return out.sort_values(["layer", "region"])[["layer", "region", "share", "cells"]].reset_index(drop=True)
