"""Captions generated from a hooked vision tower, so that an intervention on the tower shows up in
the words (docs/captioning.md).

- `base`: the `Captioner` interface (features from the tower at call time, greedy or beam decoding);
- `decoding`: batched greedy and beam search over any next-token function;
- `huggingface`: a transformers VisionEncoderDecoderModel with its CLIP encoder rebuilt as a
  `HookedVisionTower`;
- `prefix`: a small ClipCap-style captioner on a CLIP's image embedding;
- `vocabulary`: the word-level vocabulary of small captioners;
- `train`: training and evaluating the prefix captioner on synthetic shape scenes (the shipped
  `clip_lens/tiny-shapes-captioner`).

    captioner = clip_lens.captioning.load_captioner("clip_lens/tiny-shapes-captioner")
    captioner.caption(images, model)                                   # the CLIP's own tower
    with model.vision.hooks([("blocks.1.attn.hook_pattern", clip_lens.value_only_attention)]):
        captioner.caption(images, model)                               # with attention cancelled
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from clip_lens import zoo
from clip_lens.captioning.base import Captioner
from clip_lens.captioning.decoding import Special, beam_search, greedy
from clip_lens.captioning.huggingface import HuggingFaceCaptioner
from clip_lens.captioning.prefix import PrefixCaptioner, PrefixConfig
from clip_lens.captioning.vocabulary import WordVocabulary

__all__ = ["Captioner", "HuggingFaceCaptioner", "PrefixCaptioner", "PrefixConfig", "Special", "WordVocabulary",
           "beam_search", "greedy", "load_captioner"]


def load_captioner(source: Union[str, os.PathLike, Any], device: Optional[Union[str, torch.device]] = None) -> Captioner:
    """A captioner from:
    - `"clip_lens/tiny-shapes-captioner"`: the prefix captioner shipped for the tiny CLIP;
    - a `.safetensors` file written by `PrefixCaptioner.save` (or `clip-lens train-captioner`);
    - a local directory with a transformers VisionEncoderDecoderModel (CLIP vision encoder), or
      such a model object.
    """
    if isinstance(source, Captioner):
        return source.to(device) if device is not None else source
    if not isinstance(source, (str, os.PathLike)):
        return HuggingFaceCaptioner.from_pretrained(source).to(device or "cpu")
    if str(source) == zoo.CAPTIONER_NAME:
        captioner = PrefixCaptioner.load(zoo.CAPTIONER_WEIGHTS, device=device)
        captioner.name = zoo.CAPTIONER_NAME
        return captioner
    path = Path(source)
    if path.is_dir():
        return HuggingFaceCaptioner.from_pretrained(path).to(device or "cpu")
    if path.suffix == ".safetensors" or path.is_file():
        return PrefixCaptioner.load(path, device=device)
    raise FileNotFoundError(f"no captioner at {source!r}: give {zoo.CAPTIONER_NAME!r}, a prefix captioner's .safetensors "
                            "file, or a Hugging Face vision-encoder-decoder directory")
