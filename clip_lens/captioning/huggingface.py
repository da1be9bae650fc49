"""A transformers `VisionEncoderDecoderModel` whose encoder is a CLIP vision model, with the
encoder rebuilt as a `HookedVisionTower` (the same weight table as `HookedCLIP.from_huggingface`).

The decoder (GPT-2 or any causal LM with cross-attention) reads the hooked tower's last block
output, exactly what Hugging Face's encoder hands it (`last_hidden_state`, before post_layernorm),
through the model's `enc_to_dec_proj` when the widths differ. Hooks on `captioner.vision` change
the generated text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from jaxtyping import Float, Int
from torch import Tensor

from clip_lens import loading
from clip_lens.captioning.base import Captioner
from clip_lens.captioning.decoding import NextLogits, Special
from clip_lens.images import ImageLike, build_transform, to_pixels
from clip_lens.towers import HookedVisionTower

CLIP_ENCODERS = ("clip_vision_model",)


class HuggingFaceCaptioner(Captioner):
    """Captions from every output token of a hooked CLIP vision tower (`reads = "tokens"`)."""

    reads = "tokens"
    reads_model = False  # its own encoder, rebuilt as `self.vision`: `model=` is refused

    def __init__(self, model: Any, tokenizer: Any = None, preprocess_cfg: Optional[dict] = None, name: str = ""):
        super().__init__()
        encoder_type = getattr(getattr(model.config, "encoder", None), "model_type", None)
        if type(model).__name__ != "VisionEncoderDecoderModel":
            raise loading.UnsupportedArchitecture(f"expected a transformers VisionEncoderDecoderModel, got {type(model).__name__}")
        if encoder_type not in CLIP_ENCODERS:
            raise loading.UnsupportedArchitecture(
                f"{name or 'this vision-encoder-decoder'} has a {encoder_type!r} encoder; clip_lens rebuilds CLIP vision "
                f"encoders only ({', '.join(CLIP_ENCODERS)})")
        cfg = loading.huggingface_vision_config(model.config.encoder, None)
        param = next(model.parameters())
        self.vision = HookedVisionTower(cfg).to(param.device, param.dtype)
        state = {k.removeprefix("encoder."): v.detach() for k, v in model.state_dict().items() if k.startswith("encoder.")}
        # a CLIPVisionModel's keys start with "vision_model." in some transformers versions, not in others
        src = "vision_model" if any(k.startswith("vision_model.") for k in state) else ""
        loading.apply_table(self.vision, state, loading.huggingface_vision_rows(cfg, dst="", src=src, projection=None))
        self.decoder = model.decoder
        # transformers projects the encoder states when the widths differ and the decoder does not
        # declare its own cross-attention width (VisionEncoderDecoderModel.forward)
        projected = (model.config.encoder.hidden_size != model.config.decoder.hidden_size
                     and getattr(model.config.decoder, "cross_attention_hidden_size", None) is None)
        self.enc_to_dec_proj = model.enc_to_dec_proj if projected else None
        self.special = _special_tokens(model, name)
        self.max_new_tokens = int(getattr(model.generation_config, "max_length", 20) or 20) - 1
        self.tokenizer = tokenizer
        self.preprocess_cfg = preprocess_cfg or loading.huggingface_preprocess_cfg(cfg.image_size)
        self._transform = None
        self.name = name or getattr(model.config, "_name_or_path", "") or "VisionEncoderDecoderModel"

    @classmethod
    def from_pretrained(cls, model_or_path: Any, tokenizer: Any = None) -> "HuggingFaceCaptioner":
        """From a `VisionEncoderDecoderModel` or a local directory written by `save_pretrained`
        (safetensors weights only; its tokenizer and preprocessor_config.json are used when present)."""
        if not isinstance(model_or_path, (str, os.PathLike)):
            return cls(model_or_path, tokenizer)
        from transformers import AutoConfig, VisionEncoderDecoderModel

        path = Path(model_or_path)
        loading.check_huggingface_directory(path, ("model.safetensors", "model.safetensors.index.json"))
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        encoder_type = getattr(getattr(config, "encoder", None), "model_type", None)
        if config.model_type != "vision-encoder-decoder" or encoder_type not in CLIP_ENCODERS:
            raise loading.UnsupportedArchitecture(
                f"{path} holds a {config.model_type!r} model with a {encoder_type!r} encoder; expected a "
                f"vision-encoder-decoder with a CLIP vision encoder ({', '.join(CLIP_ENCODERS)})")
        model = VisionEncoderDecoderModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
        if tokenizer is None and any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        preprocess = loading.huggingface_preprocess_cfg(loading.huggingface_vision_config(config.encoder, None).image_size, path)
        return cls(model, tokenizer, preprocess, name=str(path))

    def vision_tower(self, model=None) -> HookedVisionTower:
        self.check_model(model)
        return self.vision

    def to_pixels(self, images: Union[ImageLike, Sequence[ImageLike]], model=None) -> Float[Tensor, "batch 3 height width"]:
        self.check_model(model)
        if self._transform is None:
            self._transform = build_transform(self.preprocess_cfg)
        return to_pixels(images, self._transform, device=self.vision.W_pos.device)

    def encoder_states(self, features: Float[Tensor, "batch pos d_model"]) -> Tensor:
        """The tower's output as the decoder's cross-attention reads it."""
        return self.enc_to_dec_proj(features) if self.enc_to_dec_proj is not None else features

    def next_logits(self, features: Float[Tensor, "batch pos d_model"]) -> NextLogits:
        """The decoder's step with its own key/value cache (reordered to follow beams), so each step
        feeds one token and the encoder states' cross-attention keys and values are computed once."""
        states = self.encoder_states(features)
        cache_argument = _cache_argument(self.decoder)
        cache = None

        def step(tokens: Tensor, rows: Tensor, parents: Optional[Tensor]) -> Tensor:
            nonlocal cache
            if parents is None or cache is None:
                cache, inputs = None, tokens
            else:
                cache.reorder_cache(parents)
                inputs = tokens[:, -1:]
            out = self.decoder(input_ids=inputs, encoder_hidden_states=states[rows], use_cache=True,
                               **{cache_argument: cache})
            cache = out[cache_argument]
            return out.logits[:, -1]

        return step

    def decode(self, tokens: Int[Tensor, "batch length"]) -> list[str]:
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer to turn token ids into text: pass tokenizer=..., or use "
                             "captioner.generate(...) for the ids")
        return [text.strip() for text in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def _cache_argument(decoder: Any) -> str:
    """The decoder's name for its key/value cache: "cache" in transformers 5, "past_key_values" before."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _special_tokens(model: Any, name: str) -> Special:
    """Start, end and pad ids from the model's config, as transformers' `generate` takes them: the
    first given of generation_config.json's and config.json's fields, each an id in the decoder's
    vocabulary (a list gives its first id). A missing or malformed id is a ValueError naming it."""
    gen, config, dec = model.generation_config, model.config, model.config.decoder
    name = name or "the vision-encoder-decoder"
    vocab = int(dec.vocab_size)

    def first(role: str, *sources: tuple[str, Any, str]) -> Optional[int]:
        for file, holder, key in sources:
            value = getattr(holder, key, None)
            if value is not None:
                return _token_id(value, vocab, f"{name}: {role} token {key} in its {file}")
        return None

    start = first("start", ("generation_config.json", gen, "decoder_start_token_id"),
                  ("config.json", config, "decoder_start_token_id"), ("generation_config.json", gen, "bos_token_id"),
                  ("decoder's config", dec, "bos_token_id"))
    end = first("end", ("generation_config.json", gen, "eos_token_id"), ("config.json", config, "eos_token_id"),
                ("decoder's config", dec, "eos_token_id"))
    pad = first("pad", ("generation_config.json", gen, "pad_token_id"), ("config.json", config, "pad_token_id"),
                ("decoder's config", dec, "pad_token_id"))
    missing = [role for role, value in (("decoder start token", start), ("end token", end)) if value is None]
    if missing:
        raise ValueError(f"{name} names no {' and no '.join(missing)} in its config (set decoder_start_token_id and "
                         "eos_token_id in config.json or generation_config.json)")
    return Special(start=start, end=end, pad=end if pad is None else pad)


def _token_id(value: Any, vocab: int, what: str) -> int:
    """One token id (the first of a list) in 0..vocab-1, or a ValueError naming `what`."""
    first = value[0] if isinstance(value, (list, tuple)) and value else value
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first < vocab:
        raise ValueError(f"{what} is {value!r}: give a token id in 0..{vocab - 1} (the decoder's vocabulary)")
    return first
