"""Per-tower configuration: what a hooked tower needs to know about its architecture.

One frozen dataclass per tower. They are built by `clip_lens.loading` from an open_clip model or a
Hugging Face `CLIPModel`, never by hand in normal use, and carry the fields TransformerLens's
utilities read from `model.cfg` (`n_layers`, `n_heads`, `d_head`, `device`, ...), so its patching
functions run on `model.text` and `model.vision` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Tuple

import torch

ActFn = Literal["gelu", "gelu_tanh", "quick_gelu"]


@dataclass(frozen=True, kw_only=True)
class TowerConfig:
    """Fields common to both towers.

    Attributes:
        n_layers: number of residual blocks L. "Layer l" in docs/methods.md#layer-numbering runs over 0..L.
        d_model: residual stream width.
        n_heads: attention heads per block.
        d_head: width of one head (d_model // n_heads).
        d_mlp: hidden width of the MLP.
        n_ctx: maximum sequence length (77 text slots; 1 + patches for vision).
        d_embed: width of the joint embedding space (output of the projection); None when the
            tower has no projection.
        act_fn: MLP non-linearity.
        eps: LayerNorm epsilon.
        causal: whether attention is masked causally (text towers of CLIP are).
        pooling: how the sequence is reduced to one vector ("argmax"/"eos"/"first"/"last" for
            text, "tok"/"avg" for vision).
        layer_scale: whether blocks scale their branch outputs by a learnt vector (LayerScale).
        proj_bias: whether the final projection has a bias.
        device: device of the weights; kept in step with the module by the tower.
        n_key_value_heads: always None (no grouped-query attention); read by TransformerLens.
        normalization_type, attn_only, final_rms: what TransformerLens's ActivationCache reads for
            residual decompositions and `apply_ln` (CLIP: pre-LayerNorm blocks with MLPs).
        dtype: dtype of the weights; kept in step with the module by the tower, like `device`.
        use_attn_result, use_split_qkv_input, use_attn_in, use_hook_mlp_in: which optional hook
            points fire; set them with the tower's `set_use_*` methods, as in TransformerLens.
        d_vocab: vocabulary size (text); -1 ("not set", TransformerLens's value) for vision.
        positional_embedding_type, gated_mlp, uses_rms_norm, n_devices: TransformerLens's names for
            facts fixed by CLIP's architecture (learnt absolute positions, plain MLPs, LayerNorm,
            one device).
        default_prepend_bos, tokenizer_prepends_bos, original_architecture, model_name: likewise (a
            start-of-text token always added by the tokenizer; the source architecture and name).
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_ctx: int
    d_embed: Optional[int]
    act_fn: ActFn = "gelu"
    eps: float = 1e-5
    causal: bool = False
    pooling: str = "tok"
    layer_scale: bool = False
    proj_bias: bool = False
    device: str = "cpu"
    n_key_value_heads: Optional[int] = None
    normalization_type: str = "LN"
    attn_only: bool = False
    final_rms: bool = False
    dtype: torch.dtype = torch.float32
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    d_vocab: int = -1
    positional_embedding_type: str = "standard"
    gated_mlp: bool = False
    uses_rms_norm: bool = False
    n_devices: int = 1
    default_prepend_bos: bool = True
    tokenizer_prepends_bos: bool = True
    original_architecture: str = "CLIP"
    model_name: str = "clip"

    def __post_init__(self) -> None:
        if self.d_head * self.n_heads != self.d_model:
            raise ValueError(
                f"d_head ({self.d_head}) x n_heads ({self.n_heads}) must equal d_model ({self.d_model})"
            )


@dataclass(frozen=True, kw_only=True)
class TextConfig(TowerConfig):
    """Text tower. `eot_token_id` is the token whose position is pooled when pooling == "eos"."""

    d_vocab: int
    causal: bool = True
    pooling: str = "argmax"
    eot_token_id: Optional[int] = None


@dataclass(frozen=True, kw_only=True)
class VisionConfig(TowerConfig):
    """Vision tower (ViT).

    Attributes:
        image_size: (height, width) of the input in pixels.
        patch_size: (height, width) of one patch.
        ln_pre: whether a LayerNorm is applied to the embeddings before block 0.
        final_ln_after_pool: apply `ln_post` to the pooled vector instead of every position.
    """

    image_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    ln_pre: bool = True
    final_ln_after_pool: bool = False

    @property
    def grid_size(self) -> Tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def n_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw


# TransformerLens's config fields whose value differs between CLIP's two towers: on the joint
# `HookedCLIP.cfg` they are refused with a pointer to the tower's own cfg.
PER_TOWER_FIELDS = frozenset(TowerConfig.__dataclass_fields__) | {"d_vocab", "image_size", "patch_size"}


@dataclass(frozen=True, kw_only=True)
class CLIPConfig:
    """`HookedCLIP.cfg`: the two towers' configs and what they share.

    Attributes:
        text, vision: each tower's own config (also `model.text.cfg`, `model.vision.cfg`).
        d_embed: width of the joint embedding space.
        device, dtype: where the towers' weights are and their precision (the logit scale and bias
            stay float32).
        model_name: the model's label.

    TransformerLens's per-model fields (`n_layers`, `d_model`, `n_heads`, ...) belong to one tower:
    reading one here raises an AttributeError naming `cfg.text.<field>` and `cfg.vision.<field>`.
    """

    text: TextConfig
    vision: VisionConfig
    d_embed: int
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    model_name: str = "clip"

    def __getattr__(self, name: str) -> Any:
        if name in PER_TOWER_FIELDS:
            raise AttributeError(
                f"HookedCLIP.cfg.{name}: CLIP has two towers, each with its own {name}; read "
                f"model.cfg.text.{name} or model.cfg.vision.{name} (or model.text.cfg.{name}), and run "
                "TransformerLens's tools on model.text / model.vision or on cache.text / cache.vision"
            )
        raise AttributeError(f"CLIPConfig has no field {name!r}")
