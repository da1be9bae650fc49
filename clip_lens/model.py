"""HookedCLIP: both towers and the logit scale, with one hook namespace and one ActivationCache."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from clip_lens import loading, splicing, weight_processing
from clip_lens.caches import CLIPActivationCache
from clip_lens.config import CLIPConfig
from clip_lens.hooks import TOWER_PREFIXES, HookContext, HookedModule
from clip_lens.images import ImageLike, build_transform, default_preprocess_cfg, to_pixels
from clip_lens.towers import HookedTextTower, HookedTower, HookedVisionTower

Device = Optional[Union[str, torch.device]]


# the precisions a model can be loaded in, by name (the CLI's --dtype, a sweep model's dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DtypeLike = Optional[Union[str, torch.dtype]]


def as_dtype(value: DtypeLike, name: str = "dtype", allow_none: bool = True) -> Optional[torch.dtype]:
    """The torch dtype `value` names: a key of `DTYPES` ("float32", "bfloat16", "float16") or one of
    those torch dtypes; None stays None (the source's dtype) where `allow_none`. Anything else is a
    ValueError naming the argument `name` and the allowed values."""
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    allowed = ", ".join(f"{key!r} or torch.{key}" for key in DTYPES)
    raise ValueError(f"{name}={value!r}: use one of {allowed}")


class HookedCLIP(HookedModule):
    """CLIP with TransformerLens hooks in both towers.

    Every hook of a tower is reachable here with the tower's prefix, e.g.
    `text.blocks.4.attn.hook_pattern` or `vision.hook_embedding`; `model.text` and `model.vision`
    are full hooked models of their own (unprefixed names).

    Example:
        >>> model = HookedCLIP.from_open_clip(open_clip_model)
        >>> tokens = model.to_tokens(["There are no giraffes."])      # [batch, pos], trimmed to EOT
        >>> logits, cache = model.run_with_cache(text=tokens, image=pixels)
        >>> cache["text.blocks.4.attn.hook_pattern"].shape            # [batch, head, pos, pos]
    """

    def __init__(
        self,
        text: HookedTextTower,
        vision: HookedVisionTower,
        logit_scale: float = 4.6052,
        logit_bias: Optional[float] = None,
        preprocess_cfg: Optional[dict] = None,
        name: Optional[str] = None,
    ):
        super().__init__()
        if text.cfg.d_embed != vision.cfg.d_embed:
            raise ValueError(f"text and vision towers embed into different widths ({text.cfg.d_embed} vs {vision.cfg.d_embed})")
        self.text = text
        self.vision = vision
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias))) if logit_bias is not None else None
        self.preprocess_cfg = preprocess_cfg or default_preprocess_cfg(vision.cfg.image_size)
        self._transform = None
        self.name = name
        context = HookContext()
        for module in (self, text, vision):
            module.share_context(context)
        self.setup()

    # HookedRootModule.setup would rename the towers' hook points; we index them under prefixed
    # names instead, so the towers keep working on their own.
    def setup(self) -> None:
        self.mod_dict, self.hook_dict = {}, {}
        for prefix, tower in zip(TOWER_PREFIXES, (self.text, self.vision)):
            for name, module in tower.mod_dict.items():
                self.mod_dict[f"{prefix}.{name}"] = module
            for name, hook_point in tower.hook_dict.items():
                self.hook_dict[f"{prefix}.{name}"] = hook_point

    cache_class = CLIPActivationCache

    @property
    def dtype(self) -> torch.dtype:
        """The towers' dtype (the logit scale and bias stay in float32, see `_apply`)."""
        return self.text.dtype

    @property
    def cfg(self) -> CLIPConfig:
        """Both towers' configs (`cfg.text`, `cfg.vision`) and what they share; TransformerLens's
        per-model fields are read on a tower (`model.text.cfg.n_layers`)."""
        return CLIPConfig(text=self.text.cfg, vision=self.vision.cfg, d_embed=self.text.cfg.d_embed,
                          device=str(self.device), dtype=self.dtype, model_name=self.name or "clip")

    def make_cache(self, cache_dict: dict, model_args: tuple, kwargs: dict) -> CLIPActivationCache:
        cache = super().make_cache(cache_dict, model_args, kwargs)
        text = model_args[0] if model_args else kwargs.get("text")
        cache.text_inputs = None if text is None else self.tower_input(text, name="text")[1]
        return cache

    # The logit scale and bias stay in float32 when the towers move to half precision: in bfloat16,
    # log(100) = 4.6052 rounds to 4.59375 and every score would be 1.1% too small.
    def _apply(self, fn, recurse=True):
        kept = {name: param.data for name, param in self.named_parameters(recurse=False)}
        out = super()._apply(fn, recurse)
        for name, before in kept.items():
            param = getattr(self, name)
            if param.dtype != before.dtype:
                param.data = before.to(device=param.device)
        return out

    # loading (the parts come from clip_lens.loading) ---------------------------------------------
    @classmethod
    def from_parts(cls, parts: loading.Parts, device: Device = None, dtype: DtypeLike = None, *,
                   fold_ln: bool = False, center_writing_weights: bool = False,
                   fold_value_biases: bool = False) -> "HookedCLIP":
        """A HookedCLIP from its towers and the source's weights mapped into them, on `device` in
        `dtype` (default: the source's), its weights processed as asked (see `process_weights_`;
        done in the source's precision, before the conversion to `dtype`)."""
        dtype = as_dtype(dtype)
        hooked = cls(parts.text, parts.vision, **parts.kwargs)
        loading.apply_table(hooked, parts.state_dict, parts.table)
        hooked.process_weights_(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                fold_value_biases=fold_value_biases)
        return hooked.to(device=device or parts.device, dtype=dtype or parts.dtype).eval()

    @classmethod
    def from_open_clip(cls, model: nn.Module, tokenizer: Any = None, preprocess_cfg: Optional[dict] = None,
                       name: Optional[str] = None, device: Device = None, dtype: DtypeLike = None, *,
                       fold_ln: bool = False, center_writing_weights: bool = False,
                       fold_value_biases: bool = False) -> "HookedCLIP":
        """From an open_clip `CLIP` / `CustomTextCLIP` object (weights copied; `model` unchanged).

        Args:
            device, dtype: where and in what precision the hooked model lives (default: the
                source's); dtype "float32", "bfloat16", "float16" or the torch dtype. Scores (S, d,
                patching metrics) are computed in float32 whatever `dtype`.
            tokenizer: an open_clip tokenizer or a `clip_lens.Tokenizer`; default: open_clip's BPE
                tokenizer with the model's context length.
            preprocess_cfg: image preprocessing; default: the model's own (`model.visual.preprocess_cfg`).
            fold_ln, center_writing_weights, fold_value_biases: TransformerLens's weight processing
                (default off; see `process_weights_`).
        """
        dtype = as_dtype(dtype)
        return cls.from_parts(loading.open_clip_parts(model, tokenizer, preprocess_cfg, name), device, dtype,
                              fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                              fold_value_biases=fold_value_biases)

    @classmethod
    def from_pretrained(cls, name: str, pretrained: Optional[str] = None, cache_dir: Optional[str] = None,
                        device: Union[str, torch.device] = "cpu", dtype: DtypeLike = None, *,
                        fold_ln: bool = False, center_writing_weights: bool = False,
                        fold_value_biases: bool = False, **open_clip_kwargs: Any) -> "HookedCLIP":
        """From an open_clip architecture name (e.g. "ViT-B-32") or a model that ships with
        clip_lens ("clip_lens/tiny-shapes", its weights by default).

        Args:
            pretrained: an open_clip pretrained tag ("openai", "laion2b_s34b_b79k", ...), the path of
                a checkpoint file (an open_clip state dict, .pt/.bin/.safetensors), or None for random
                weights. A tag whose weights are not cached fails at once when the hub is
                unreachable, with the ways to provide the weights.
            cache_dir: where open_clip / huggingface_hub look for and keep downloaded weights.
            device, dtype: where the model lives, and its precision (default float32; "bfloat16",
                "float16" or the torch dtype). The weights are read in float32 and converted once.
            fold_ln, center_writing_weights, fold_value_biases: TransformerLens's weight processing,
                done by clip_lens in float32 before the conversion (default off, unlike
                TransformerLens; see `process_weights_`).
            open_clip_kwargs: passed to `open_clip.create_model` (e.g. force_quick_gelu=True).
        """
        dtype = as_dtype(dtype)
        weight_processing.check_loading_kwargs(open_clip_kwargs)
        # open_clip's model is read on the host and discarded: the hooked model alone goes to `device`, once
        oc_model, tokenizer, label = loading.create_open_clip(name, pretrained, cache_dir, "cpu", **open_clip_kwargs)
        return cls.from_open_clip(oc_model, tokenizer=tokenizer, name=label, device=device, dtype=dtype,
                                  fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                  fold_value_biases=fold_value_biases)

    @classmethod
    def from_huggingface(cls, model_or_path: Any, tokenizer: Any = None, device: Device = None,
                         dtype: DtypeLike = None, *, fold_ln: bool = False, center_writing_weights: bool = False,
                         fold_value_biases: bool = False) -> "HookedCLIP":
        """From a `transformers` `CLIPModel` or a local directory holding one (as written by
        `save_pretrained`; its tokenizer is used when the directory has one), on `device` in
        `dtype` (default: the source's; "float32", "bfloat16", "float16" or the torch dtype), its
        weights processed as asked (see `process_weights_`)."""
        dtype = as_dtype(dtype)
        return cls.from_parts(loading.huggingface_parts(model_or_path, tokenizer), device, dtype, fold_ln=fold_ln,
                              center_writing_weights=center_writing_weights, fold_value_biases=fold_value_biases)

    def process_weights_(self, fold_ln: bool = False, center_writing_weights: bool = False,
                         fold_value_biases: bool = False) -> "HookedCLIP":
        """TransformerLens's weight processing on both towers, in place (returns the model).
        Each tower's embedding, and so the logits, are unchanged up to float rounding; what some
        hooks hold changes. See `clip_lens.weight_processing`:

            fold_ln: each LayerNorm's gain and bias folded into the map that reads it (q/k/v, MLP
                input, the projection); the vision ln_pre is left (its output is the residual stream).
            center_writing_weights: weights writing into the residual stream lose their mean over
                d_model (LayerScale folded into the output weights first).
            fold_value_biases: each block's value biases moved into its attention output bias.
        """
        weight_processing.process_towers_((self.text, self.vision), fold_ln=fold_ln,
                                          center_writing_weights=center_writing_weights,
                                          fold_value_biases=fold_value_biases)
        return self

    # inputs ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.text.tokenizer

    def to_tokens(self, texts: Union[str, Sequence[str]], trim: bool = True) -> Int[Tensor, "batch pos"]:
        """Token ids [batch, pos], trimmed after the longest EOT of the batch by default."""
        return self.text.to_tokens(texts, trim=trim)

    def to_str_tokens(self, input: Union[str, Sequence[str], Tensor]) -> Union[list[str], list[list[str]]]:
        """See `HookedTextTower.to_str_tokens`."""
        return self.text.to_str_tokens(input)

    def to_string(self, tokens: Union[Sequence[int], Tensor]) -> Union[str, list[str]]:
        """See `HookedTextTower.to_string`."""
        return self.text.to_string(tokens)

    def to_single_token(self, string: str) -> int:
        """See `HookedTextTower.to_single_token`."""
        return self.text.to_single_token(string)

    def get_token_position(self, single_token: Union[str, int], input: Union[str, Tensor], mode: str = "first") -> int:
        """See `HookedTextTower.get_token_position`."""
        return self.text.get_token_position(single_token, input, mode)

    def to_pixels(self, images: Union[ImageLike, Sequence[ImageLike]]) -> Float[Tensor, "batch 3 height width"]:
        """Preprocess PIL images, image paths or raw image tensors [3, H, W] with the model's own
        transform (resize, crop, normalise) into [batch, 3, H, W]."""
        if self._transform is None:
            self._transform = build_transform(self.preprocess_cfg)
        return to_pixels(images, self._transform, device=self.device)

    # -- sparse autoencoders spliced in (clip_lens.splicing) -----------------------------------
    def add_sae(self, sae: Any, *, hook: Optional[str] = None, use_error_term: bool = False) -> Any:
        """Splice `sae` in at `hook` (default `sae.hook`): the activation there becomes the SAE's
        reconstruction (with `use_error_term`, stays as it is unless a latent is edited), and the
        latents become hook points, e.g. "vision.blocks.2.hook_resid_post.hook_sae_acts_post"."""
        return splicing.add_sae(self, sae, hook=hook, use_error_term=use_error_term)

    def remove_saes(self, hook: Optional[str] = None) -> None:
        """Remove the SAE spliced at `hook`, or all of them."""
        splicing.remove_saes(self, hook)

    def tower_input(self, value: Any, *, name: str = "input") -> tuple[HookedTower, Tensor]:
        """The tower an input belongs to, and the input ready for it: texts or tokens [batch, pos]
        (trimmed to the longest EOT) for the text tower, images or pixels [batch, 3, H, W] for the
        vision tower. `name` is the argument named in the error for anything else."""
        if isinstance(value, (list, tuple)) and not value:
            raise ValueError(f"{name} is empty: give at least one text or image")
        if isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value):
            if not all(isinstance(v, str) for v in value):
                i = next(i for i, v in enumerate(value) if not isinstance(v, str))
                raise TypeError(f"{name}[{i}] is {type(value[i]).__name__} ({value[i]!r}); {name} mixes texts with "
                                "something else")
            return self.text, self.to_tokens(value)
        if isinstance(value, str):
            return self.text, self.to_tokens(value)
        if isinstance(value, Tensor) and value.dtype in (torch.long, torch.int):
            return self.text, self.text.check_input(value.to(self.device))
        if isinstance(value, Tensor) and value.ndim == 4:
            return self.vision, self.vision.check_input(value.to(self.device))
        if isinstance(value, (list, tuple)):
            return self.vision, self.to_pixels(value)
        raise ValueError(f"{name}: expected texts, tokens [batch, pos], images or pixels [batch, 3, H, W]; "
                         f"got {type(value).__name__}")

    # forward ---------------------------------------------------------------------------------
    def encode_text(self, tokens: Int[Tensor, "batch pos"], normalize: bool = False) -> Float[Tensor, "batch d_embed"]:
        emb = self.text(tokens)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image(self, pixels: Float[Tensor, "batch 3 height width"], normalize: bool = False) -> Float[Tensor, "batch d_embed"]:
        emb = self.vision(pixels)
        return F.normalize(emb, dim=-1) if normalize else emb

    def logits_from_embeddings(self, image_emb: Float[Tensor, "n_images d_embed"],
                               text_emb: Float[Tensor, "n_texts d_embed"]) -> Float[Tensor, "n_images n_texts"]:
        """CLIP's logits: logit_scale.exp() * cos(image, text) (+ logit_bias), as open_clip's `get_logits`;
        in float32 whatever the towers' dtype."""
        logits = self.logit_scale.exp() * F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def _input_of(self, tower: HookedTower, value: Any, name: str) -> Tensor:
        found, inputs = self.tower_input(value, name=name)
        if found is not tower:
            raise ValueError(f"{name}= takes {'texts or tokens' if tower is self.text else 'images or pixels'}; "
                             f"got {found.modality} inputs")
        return inputs

    def forward(self, text: Any = None, image: Any = None) -> Tensor:
        """Logits [n_images, n_texts] when both are given (open_clip's image logits); the
        embeddings of the one given otherwise ([batch, d_embed], unnormalised).

        `text` is tokens [batch, pos] or texts; `image` is pixels [batch, 3, H, W] or images (PIL
        images, paths, raw tensors), preprocessed with the model's own transform."""
        if text is None and image is None:
            raise ValueError("HookedCLIP needs text=tokens, image=pixels, or both")
        text_emb = self.encode_text(self._input_of(self.text, text, "text")) if text is not None else None
        image_emb = self.encode_image(self._input_of(self.vision, image, "image")) if image is not None else None
        if text_emb is None:
            return image_emb
        if image_emb is None:
            return text_emb
        return self.logits_from_embeddings(image_emb, text_emb)


def random_model_pair(name: str, seed: int = 0, scale: float = 0.1) -> tuple[nn.Module, HookedCLIP]:
    """(open_clip model, HookedCLIP) of architecture `name` with random weights, every LayerNorm,
    bias, embedding and the logit scale moved off its initial value by N(0, scale) noise, so that a
    wrong weight mapping shows. For parity checks and timings without pretrained weights."""
    import open_clip

    torch.manual_seed(seed)
    oc = open_clip.create_model(name).eval()
    with torch.no_grad():
        for param_name, param in oc.named_parameters():
            if param.ndim <= 1 or "embedding" in param_name or "logit_scale" in param_name:
                param.add_(torch.randn_like(param) * scale)
    return oc, HookedCLIP.from_open_clip(oc, tokenizer=open_clip.get_tokenizer(name), name=name)
