"""Caption-foil scores of CLIP and the segments every negation result is reported by (docs/methods.md#scores-and-segments).

S(t, i) = logit_scale.exp() * cos(text_embedding(t), image_embedding(i)); d = S(c, i) - S(f, i);
correct d > 1, ambiguous -1 < d <= 1, incorrect d <= -1.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.model import HookedCLIP

SEGMENTS = ("correct", "ambiguous", "incorrect")
SEGMENT_COLOURS = {"correct": "#2a9d8f", "ambiguous": "#e9c46a", "incorrect": "#e76f51"}


def segment_of(d: Union[float, Sequence[float], np.ndarray, Tensor]) -> np.ndarray:
    """The segment of each score difference d: "correct" (d > 1), "ambiguous" (-1 < d <= 1) or
    "incorrect" (d <= -1)."""
    d = np.asarray(d.detach().cpu() if isinstance(d, Tensor) else d, dtype=float)
    return np.where(d > 1, "correct", np.where(d > -1, "ambiguous", "incorrect"))


def score(model: HookedCLIP, text_emb: Float[Tensor, "n d_embed"], image_emb: Float[Tensor, "n d_embed"]) -> Float[Tensor, " n"]:
    """S for matched rows of text and image embeddings, in float32 whatever the model's dtype."""
    return model.logit_scale.float().exp() * F.cosine_similarity(text_emb.float(), image_emb.float(), dim=-1)


def difference_metric(model: HookedCLIP) -> Callable[[Tensor, Tensor], Tensor]:
    """A `patch` metric for d: with other = normalize(c) - normalize(f) (text embeddings),
    scale * <normalize(i), other> = S(c, i) - S(f, i), in one dot product per image."""
    def d(image_emb: Float[Tensor, "batch d_embed"], other: Float[Tensor, "batch d_embed"]) -> Float[Tensor, " batch"]:
        return model.logit_scale.float().exp() * (F.normalize(image_emb.float(), dim=-1) * other.float()).sum(dim=-1)
    return d


@torch.no_grad()
def encode_images(model: HookedCLIP, images: Sequence, batch_size: int = 32, progress: bool = True) -> Float[Tensor, "n d_embed"]:
    """Image embeddings of paths / PIL images / pixel batches, preprocessed and encoded in batches
    (`HookedTower.pooled_embedding`: the last block at the class token only, unless a hook is attached)."""
    if isinstance(images, Tensor) and images.ndim == 4:
        batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    else:
        images = list(images)
        batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    out = []
    for batch in tqdm(batches, desc="encoding images", disable=not progress or len(batches) < 2):
        pixels = batch if isinstance(batch, Tensor) else model.to_pixels(batch)
        out.append(model.vision.pooled_embedding(pixels))  # the last block at the class token only
    return torch.cat(out) if out else torch.empty(0, model.vision.cfg.d_embed, device=model.device, dtype=model.dtype)


@torch.no_grad()
def encode_texts(model: HookedCLIP, texts: Sequence[str], batch_size: int = 256) -> Float[Tensor, "n d_embed"]:
    """Text embeddings, in batches (each trimmed to its own longest EOT; `HookedTower.pooled_embedding`:
    the last block at EOT only, unless a hook is attached)."""
    texts = list(texts)
    out = [model.text.pooled_embedding(model.to_tokens(texts[i:i + batch_size]))  # the last block at EOT only
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.text.cfg.d_embed, device=model.device, dtype=model.dtype)


@torch.no_grad()
def pair_scores(model: HookedCLIP, captions: Union[Sequence[str], Tensor], foils: Union[Sequence[str], Tensor],
                image_emb: Float[Tensor, "n d_embed"]) -> pd.DataFrame:
    """One row per instance: S_caption, S_foil, d = S_caption - S_foil, segment, correct.
    Captions and foils are texts or their embeddings [n, d_embed]."""
    s_c = score(model, captions if isinstance(captions, Tensor) else encode_texts(model, captions), image_emb)
    s_f = score(model, foils if isinstance(foils, Tensor) else encode_texts(model, foils), image_emb)
    d = (s_c - s_f).cpu().numpy()
    return pd.DataFrame({"S_caption": s_c.cpu().numpy(), "S_foil": s_f.cpu().numpy(), "d": d,
                         "segment": segment_of(d), "correct": d > 0})
