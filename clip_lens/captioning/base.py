"""What every captioner does: read features from a hooked vision tower, then decode text.

A captioner's features come from a `HookedVisionTower` run at call time, so every hook attached to
that tower (attention cancellation, ablation, patching, an SAE splice) changes the words it
generates. A captioner reads either the pooled embedding (`reads = "embedding"`: a prefix
captioner on a CLIP's image embedding) or every output token (`reads = "tokens"`: a
vision-encoder-decoder's cross-attention input).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from clip_lens.captioning.decoding import NextLogits, Special, beam_search, check_limits, greedy
from clip_lens.images import ImageLike
from clip_lens.towers import HookedVisionTower

READS = ("embedding", "tokens")


class Captioner(nn.Module):
    """Image features from a hooked vision tower in, text out (greedy or beam decoding, batched).

    Subclasses set `reads` and `special`, and define `vision_tower`, `to_pixels`, `next_logits`
    and `decode`.
    """

    reads: str
    special: Special
    max_new_tokens: int = 20
    reads_model: bool = True  # it reads the studied CLIP's vision tower (model= required); False: its own tower

    def vision_tower(self, model=None) -> HookedVisionTower:
        """The tower whose output this captioner reads (hooks go on it). `model` is the HookedCLIP
        studied, for captioners that read a CLIP's own tower (`reads_model`); a captioner with its
        own tower refuses it (`check_model`)."""
        raise NotImplementedError

    def check_model(self, model) -> None:
        """`model` as this captioner can use it: required when it reads the CLIP's tower, refused
        when it reads its own (hooks on `model.vision` would not reach it: a silent no-op)."""
        name = getattr(self, "name", "") or type(self).__name__
        if self.reads_model and model is None:
            raise ValueError(f"{name} reads a CLIP's vision tower: pass the HookedCLIP (model=...)")
        if not self.reads_model and model is not None:
            raise ValueError(f"model= is not read by {name}: it captions from its own vision tower "
                             "(captioner.vision), so hooks on model.vision would not change its captions; leave "
                             "model out and put hooks on captioner.vision_tower()")

    def to_pixels(self, images: Union[ImageLike, Sequence[ImageLike]], model=None) -> Float[Tensor, "batch 3 height width"]:
        """Images preprocessed for `vision_tower(model)`."""
        raise NotImplementedError

    def next_logits(self, features: Tensor) -> NextLogits:
        """The decoder's next-token function for these features (see `decoding`)."""
        raise NotImplementedError

    def decode(self, tokens: Int[Tensor, "batch length"]) -> list[str]:
        """Token ids (the start token first) -> captions."""
        raise NotImplementedError

    def features(self, pixels: Float[Tensor, "batch 3 height width"], model=None) -> Tensor:
        """Run the vision tower (with whatever hooks are attached to it): the pooled embedding
        [batch, d_embed] or the last block's output [batch, pos, d_model] (before ln_post)."""
        tower = self.vision_tower(model)
        pixels = pixels.to(tower.W_pos.device)
        with torch.no_grad():
            if self.reads == "embedding":
                return tower(pixels)
            return tower(pixels, stop_at_layer=tower.cfg.n_layers)

    def generate(self, features: Tensor, *, max_new_tokens: Optional[int] = None, beams: int = 1,
                 length_penalty: float = 1.0) -> Int[Tensor, "batch length"]:
        """Token ids for a batch of features: greedy with `beams=1`, else beam search."""
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        check_limits(max_new_tokens, beams)
        step, n, device = self.next_logits(features), features.shape[0], features.device
        if beams == 1:
            return greedy(step, n, self.special, max_new_tokens, device=device)
        return beam_search(step, n, self.special, max_new_tokens, beams, length_penalty, device=device)

    def caption(self, images: Union[ImageLike, Sequence[ImageLike], Tensor], model=None, *, max_new_tokens: Optional[int] = None,
                beams: int = 1, batch_size: int = 64) -> list[str]:
        """Captions for images (paths, PIL images, or pixels already preprocessed for the tower).

        Hooks attached to `vision_tower(model)` apply, e.g.
        `with model.vision.hooks([(hook_name, value_only_attention)]): captioner.caption(pixels, model)`.
        """
        if isinstance(images, Tensor) and images.ndim == 4:
            pixels = images
        else:
            pixels = self.to_pixels(images, model)
        captions: list[str] = []
        for lo in range(0, pixels.shape[0], batch_size):
            features = self.features(pixels[lo : lo + batch_size], model)
            captions += self.decode(self.generate(features, max_new_tokens=max_new_tokens, beams=beams))
        return captions
