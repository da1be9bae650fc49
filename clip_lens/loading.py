"""The parts a HookedCLIP is built from (tower configs, towers, mapped weights), read from
open_clip models, open_clip names (tags or checkpoint files) and Hugging Face `transformers` CLIP
models. `HookedCLIP.from_open_clip` / `from_pretrained` / `from_huggingface` assemble them; this
module does not import the model class.

Each source has one weight-mapping table: rows of (our parameter, source keys, transform). The
table is applied by one function that checks every shape and that every parameter of the hooked
model is written exactly once, so a gap or a mistake in a table fails loudly instead of leaving
random weights behind.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from clip_lens import zoo
from clip_lens.config import TextConfig, VisionConfig
from clip_lens.tokenization import Tokenizer
from clip_lens.towers import HookedTextTower, HookedVisionTower

Row = tuple[str, Sequence[str], Callable[..., Tensor]]
logger = logging.getLogger(__name__)


@dataclass
class Parts:
    """What a HookedCLIP is built from: its towers, its other constructor arguments (`kwargs`:
    logit_bias, preprocess_cfg, name), and the source's weights with the table that maps them
    (`apply_table`), to be moved to the source's device and dtype."""

    text: HookedTextTower
    vision: HookedVisionTower
    kwargs: dict
    state_dict: dict[str, Tensor]
    table: list[Row]
    device: torch.device
    dtype: torch.dtype


def _same(x: Tensor) -> Tensor:
    return x


def _transpose(x: Tensor) -> Tensor:
    return x.T


def _scalar(x: Tensor) -> Tensor:
    return x.reshape(())


def _concat(*xs: Tensor) -> Tensor:
    return torch.cat(xs, dim=0)


class UnsupportedArchitecture(ValueError):
    """The model has a part clip_lens does not rebuild (named in the message)."""


# ---------------------------------------------------------------------------------------------
# mapping tables
# ---------------------------------------------------------------------------------------------
def _block_rows(dst: str, src: str, layer_scale: bool, style: str) -> list[Row]:
    """Rows for one residual block. `style` is "open_clip" or "hf"."""
    if style == "open_clip":
        rows: list[Row] = [
            (f"{dst}.ln1.w", [f"{src}.ln_1.weight"], _same),
            (f"{dst}.ln1.b", [f"{src}.ln_1.bias"], _same),
            (f"{dst}.attn.qkv_weight", [f"{src}.attn.in_proj_weight"], _same),
            (f"{dst}.attn.qkv_bias", [f"{src}.attn.in_proj_bias"], _same),
            (f"{dst}.attn.out_weight", [f"{src}.attn.out_proj.weight"], _same),
            (f"{dst}.attn.out_bias", [f"{src}.attn.out_proj.bias"], _same),
            (f"{dst}.ln2.w", [f"{src}.ln_2.weight"], _same),
            (f"{dst}.ln2.b", [f"{src}.ln_2.bias"], _same),
            (f"{dst}.mlp.in_weight", [f"{src}.mlp.c_fc.weight"], _same),
            (f"{dst}.mlp.in_bias", [f"{src}.mlp.c_fc.bias"], _same),
            (f"{dst}.mlp.out_weight", [f"{src}.mlp.c_proj.weight"], _same),
            (f"{dst}.mlp.out_bias", [f"{src}.mlp.c_proj.bias"], _same),
        ]
        if layer_scale:
            rows += [(f"{dst}.ls1", [f"{src}.ls_1.gamma"], _same), (f"{dst}.ls2", [f"{src}.ls_2.gamma"], _same)]
        return rows
    attn = f"{src}.self_attn"
    return [
        (f"{dst}.ln1.w", [f"{src}.layer_norm1.weight"], _same),
        (f"{dst}.ln1.b", [f"{src}.layer_norm1.bias"], _same),
        (f"{dst}.attn.qkv_weight", [f"{attn}.{p}_proj.weight" for p in "qkv"], _concat),
        (f"{dst}.attn.qkv_bias", [f"{attn}.{p}_proj.bias" for p in "qkv"], _concat),
        (f"{dst}.attn.out_weight", [f"{attn}.out_proj.weight"], _same),
        (f"{dst}.attn.out_bias", [f"{attn}.out_proj.bias"], _same),
        (f"{dst}.ln2.w", [f"{src}.layer_norm2.weight"], _same),
        (f"{dst}.ln2.b", [f"{src}.layer_norm2.bias"], _same),
        (f"{dst}.mlp.in_weight", [f"{src}.mlp.fc1.weight"], _same),
        (f"{dst}.mlp.in_bias", [f"{src}.mlp.fc1.bias"], _same),
        (f"{dst}.mlp.out_weight", [f"{src}.mlp.fc2.weight"], _same),
        (f"{dst}.mlp.out_bias", [f"{src}.mlp.fc2.bias"], _same),
    ]


def _ln_rows(dst: str, src: str) -> list[Row]:
    return [(f"{dst}.w", [f"{src}.weight"], _same), (f"{dst}.b", [f"{src}.bias"], _same)]


def open_clip_table(text: TextConfig, vision: VisionConfig, text_prefix: str, text_proj: str,
                    has_logit_bias: bool) -> list[Row]:
    """open_clip state-dict keys -> HookedCLIP parameters.

    `text_prefix` is "" for `CLIP` (text tower flattened into the model) or "text." for
    `CustomTextCLIP`; `text_proj` is "param", "linear" or "none".
    """
    t = text_prefix
    rows: list[Row] = [
        ("text.embed.W_E", [f"{t}token_embedding.weight"], _same),
        ("text.W_pos", [f"{t}positional_embedding"], _same),
        *_ln_rows("text.ln_final", f"{t}ln_final"),
        ("vision.patch_embed.weight", ["visual.conv1.weight"], _same),
        ("vision.class_embedding", ["visual.class_embedding"], _same),
        ("vision.W_pos", ["visual.positional_embedding"], _same),
        *_ln_rows("vision.ln_post", "visual.ln_post"),
        ("logit_scale", ["logit_scale"], _scalar),
    ]
    for layer in range(text.n_layers):
        rows += _block_rows(f"text.blocks.{layer}", f"{t}transformer.resblocks.{layer}", text.layer_scale, "open_clip")
    for layer in range(vision.n_layers):
        rows += _block_rows(f"vision.blocks.{layer}", f"visual.transformer.resblocks.{layer}", vision.layer_scale, "open_clip")
    if text_proj == "param":
        rows.append(("text.proj.W", [f"{t}text_projection"], _same))
    elif text_proj == "linear":
        rows += [("text.proj.W", [f"{t}text_projection.weight"], _transpose),
                 ("text.proj.b", [f"{t}text_projection.bias"], _same)]
    if vision.d_embed:
        rows.append(("vision.proj.W", ["visual.proj"], _same))
    if vision.ln_pre:
        rows += _ln_rows("vision.ln_pre", "visual.ln_pre")
    if has_logit_bias:
        rows.append(("logit_bias", ["logit_bias"], _scalar))
    return rows


def huggingface_vision_rows(vision: VisionConfig, dst: str = "vision", src: str = "vision_model",
                            projection: Optional[str] = "visual_projection.weight") -> list[Row]:
    """transformers `CLIPVisionTransformer` keys under `src` -> the vision tower's parameters under
    `dst` ("" for a bare tower); `projection` is the key of the joint-space projection, if any."""
    at, frm = (f"{dst}." if dst else ""), (f"{src}." if src else "")
    rows: list[Row] = [
        (f"{at}patch_embed.weight", [f"{frm}embeddings.patch_embedding.weight"], _same),
        (f"{at}class_embedding", [f"{frm}embeddings.class_embedding"], _same),
        (f"{at}W_pos", [f"{frm}embeddings.position_embedding.weight"], _same),
        *_ln_rows(f"{at}ln_pre", f"{frm}pre_layrnorm"),
        *_ln_rows(f"{at}ln_post", f"{frm}post_layernorm"),
    ]
    if projection is not None:
        rows.append((f"{at}proj.W", [projection], _transpose))
    for layer in range(vision.n_layers):
        rows += _block_rows(f"{at}blocks.{layer}", f"{frm}encoder.layers.{layer}", False, "hf")
    return rows


def huggingface_table(text: TextConfig, vision: VisionConfig) -> list[Row]:
    """transformers `CLIPModel` state-dict keys -> HookedCLIP parameters."""
    rows: list[Row] = [
        ("text.embed.W_E", ["text_model.embeddings.token_embedding.weight"], _same),
        ("text.W_pos", ["text_model.embeddings.position_embedding.weight"], _same),
        *_ln_rows("text.ln_final", "text_model.final_layer_norm"),
        ("text.proj.W", ["text_projection.weight"], _transpose),
        ("logit_scale", ["logit_scale"], _scalar),
        *huggingface_vision_rows(vision),
    ]
    for layer in range(text.n_layers):
        rows += _block_rows(f"text.blocks.{layer}", f"text_model.encoder.layers.{layer}", False, "hf")
    return rows


def apply_table(model: nn.Module, state_dict: dict[str, Tensor], rows: list[Row]) -> None:
    """Write every row's source tensors into `model`; every parameter must be written once."""
    params = dict(model.named_parameters())
    written: set[str] = set()
    for dst, srcs, transform in rows:
        missing = [k for k in srcs if k not in state_dict]
        if missing:
            raise KeyError(f"Checkpoint has no {missing[0]!r} (needed for {dst!r})")
        if dst not in params:
            raise KeyError(f"Mapping row writes {dst!r}, which the hooked model does not have")
        value = transform(*(state_dict[k] for k in srcs))
        if tuple(value.shape) != tuple(params[dst].shape):
            raise ValueError(f"Shape mismatch for {dst!r} <- {list(srcs)}: {tuple(value.shape)} vs {tuple(params[dst].shape)}")
        with torch.no_grad():
            params[dst].copy_(value.to(params[dst].dtype))
        written.add(dst)
    unwritten = sorted(set(params) - written)
    if unwritten:
        raise KeyError(f"No weights mapped to {unwritten[:5]}{' ...' if len(unwritten) > 5 else ''}")


# ---------------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------------
def _act_name(act_module: nn.Module, where: str) -> str:
    from open_clip.transformer import QuickGELU

    if isinstance(act_module, QuickGELU):
        return "quick_gelu"
    if isinstance(act_module, nn.GELU):
        return "gelu" if act_module.approximate == "none" else "gelu_tanh"
    raise UnsupportedArchitecture(f"{where}: activation {type(act_module).__name__} is not supported")


def _check_transformer(transformer: nn.Module, where: str) -> tuple[nn.Module, bool]:
    """The first block of an open_clip Transformer, after checking we can rebuild it."""
    from open_clip.transformer import LayerScale, ResidualAttentionBlock

    if getattr(transformer, "batch_first", True) is False:
        raise UnsupportedArchitecture(f"{where}: sequence-first transformers are not supported")
    block = transformer.resblocks[0]
    if not isinstance(block, ResidualAttentionBlock):
        raise UnsupportedArchitecture(
            f"{where}: custom attention blocks ({type(block).__name__}: qk-norm, scaled cosine "
            "attention, head scaling) are not supported"
        )
    if hasattr(block, "ln_1_kv"):
        raise UnsupportedArchitecture(f"{where}: cross-attention blocks are not supported")
    return block, isinstance(block.ls_1, LayerScale)


def open_clip_configs(model: nn.Module) -> tuple[TextConfig, VisionConfig, str, str]:
    """Configs of an open_clip model's towers, plus where its text tower lives and its projection
    kind. Raises UnsupportedArchitecture naming the feature for towers clip_lens cannot rebuild."""
    from open_clip.transformer import TextTransformer, VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__
        feature = {"ModifiedResNet": "ResNet image towers", "TimmModel": "timm image towers"}.get(kind, f"{kind} image towers")
        raise UnsupportedArchitecture(f"Image tower: {feature} are not supported; clip_lens rebuilds ViT towers")
    if visual.attn_pool is not None:
        raise UnsupportedArchitecture("Image tower: attentional poolers (CoCa-style) are not supported")
    if visual.pool_type not in ("tok", "avg"):
        raise UnsupportedArchitecture(f"Image tower: pool_type {visual.pool_type!r} is not supported")
    if visual.proj is None:
        raise UnsupportedArchitecture("Image tower: towers without a projection are not supported")

    if hasattr(model, "text"):  # CustomTextCLIP
        text_tower = model.text
        if not isinstance(text_tower, TextTransformer):
            raise UnsupportedArchitecture(
                f"Text tower: {type(text_tower).__name__} (Hugging Face text towers) are not supported"
            )
        if text_tower.cls_emb is not None:
            raise UnsupportedArchitecture("Text tower: appended class tokens (embed_cls, CoCa) are not supported")
        if text_tower.use_pad_mask:
            raise UnsupportedArchitecture("Text tower: padding masks are not supported")
        text_prefix, src = "text.", text_tower
        pool_type, eos_id = text_tower.pool_type, getattr(text_tower, "eos_id", None)
    else:  # CLIP: the text tower's parts are attributes of the model itself
        text_prefix, src = "", model
        pool_type, eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)

    t_block, t_ls = _check_transformer(src.transformer, "Text tower")
    v_block, v_ls = _check_transformer(visual.transformer, "Image tower")
    projection = src.text_projection
    text_proj = "none" if projection is None else ("linear" if isinstance(projection, nn.Linear) else "param")
    d_embed = (projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]) if projection is not None else None

    width = src.transformer.width
    heads = t_block.attn.num_heads
    text_cfg = TextConfig(
        n_layers=len(src.transformer.resblocks), d_model=width, n_heads=heads, d_head=width // heads,
        d_mlp=t_block.mlp.c_fc.out_features, n_ctx=src.positional_embedding.shape[0], d_embed=d_embed,
        act_fn=_act_name(t_block.mlp.gelu, "Text tower"), eps=t_block.ln_1.eps,
        causal=src.attn_mask is not None, pooling=pool_type, layer_scale=t_ls,
        proj_bias=text_proj == "linear" and projection.bias is not None,
        d_vocab=src.token_embedding.num_embeddings, eot_token_id=eos_id,
    )
    v_width = visual.transformer.width
    v_heads = v_block.attn.num_heads
    vision_cfg = VisionConfig(
        n_layers=len(visual.transformer.resblocks), d_model=v_width, n_heads=v_heads, d_head=v_width // v_heads,
        d_mlp=v_block.mlp.c_fc.out_features, n_ctx=visual.positional_embedding.shape[0],
        d_embed=visual.proj.shape[1], act_fn=_act_name(v_block.mlp.gelu, "Image tower"), eps=v_block.ln_1.eps,
        causal=False, pooling=visual.pool_type, layer_scale=v_ls,
        image_size=tuple(visual.image_size), patch_size=tuple(visual.patch_size),
        ln_pre=not isinstance(visual.ln_pre, nn.Identity), final_ln_after_pool=visual.final_ln_after_pool,
    )
    return text_cfg, vision_cfg, text_prefix, text_proj


def open_clip_parts(model: nn.Module, tokenizer: Any = None, preprocess_cfg: Optional[dict] = None,
                    name: Optional[str] = None) -> Parts:
    """The parts of a HookedCLIP with the weights of an open_clip `CLIP` or `CustomTextCLIP`.

    Args:
        model: the open_clip model (left unchanged).
        tokenizer: an open_clip tokenizer or a `clip_lens.Tokenizer`; default: open_clip's BPE
            tokenizer with the model's context length.
        preprocess_cfg: image preprocessing; default: the model's own (`model.visual.preprocess_cfg`).
    """
    text_cfg, vision_cfg, text_prefix, text_proj = open_clip_configs(model)
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_open_clip(tokenizer)
    preprocess_cfg = preprocess_cfg or dict(getattr(model.visual, "preprocess_cfg", {}) or {}) or None
    has_bias = getattr(model, "logit_bias", None) is not None
    param = next(model.parameters())
    return Parts(HookedTextTower(text_cfg, tokenizer=tokenizer), HookedVisionTower(vision_cfg),
                 dict(logit_bias=0.0 if has_bias else None, preprocess_cfg=preprocess_cfg, name=name),
                 {k: v.detach() for k, v in model.state_dict().items()},
                 open_clip_table(text_cfg, vision_cfg, text_prefix, text_proj, has_bias), param.device, param.dtype)


# ---------------------------------------------------------------------------------------------
# open_clip names, tags and checkpoint files
# ---------------------------------------------------------------------------------------------
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False at once under HF_HUB_OFFLINE=1)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_tag_weights(tag_cfg: dict, cache_dir: Optional[str]) -> Optional[str]:
    """A local copy of a pretrained tag's weights, if one is in the hub or URL cache."""
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)  # as open_clip: "org/model/" or "org/model/file"
        candidates = [filename] if filename else [
            "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.safetensors"]
        for candidate in candidates:
            found = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    url = tag_cfg.get("url", "")
    if url:
        path = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


def create_open_clip(name: str, pretrained: Optional[Union[str, os.PathLike]] = None,
                     cache_dir: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                     **open_clip_kwargs: Any) -> tuple[nn.Module, Any, str]:
    """(open_clip model, its tokenizer, the name to label it with) for an open_clip architecture
    `name` (e.g. "ViT-B-32"), or for a model that ships with clip_lens ("clip_lens/tiny-shapes",
    its weights by default).

    Args:
        pretrained: an open_clip pretrained tag ("openai", "laion2b_s34b_b79k", ...), the path of a
            checkpoint file (an open_clip state dict, .pt/.bin/.safetensors), or None for random
            weights. A tag whose weights are not cached fails at once when the hub is unreachable,
            with the ways to provide the weights.
        cache_dir: where open_clip / huggingface_hub look for and keep downloaded weights.
        open_clip_kwargs: passed to `open_clip.create_model` (e.g. force_quick_gelu=True).
    """
    import open_clip

    label = name
    if name == zoo.NAME:
        name = zoo.register()
        if pretrained is None:
            if not zoo.WEIGHTS.is_file():
                raise FileNotFoundError(f"the weights of {zoo.NAME} are missing ({zoo.WEIGHTS}); "
                                        "retrain them with `clip-lens train-tiny`")
            pretrained = zoo.WEIGHTS
    if name not in open_clip.list_models():
        raise ValueError(f"Unknown open_clip architecture {name!r}; see open_clip.list_models()")
    kwargs = dict(open_clip_kwargs, cache_dir=cache_dir, device=device)
    pretrained_arg = None if pretrained is None else os.fspath(pretrained)
    if pretrained_arg is not None and not os.path.isfile(pretrained_arg):
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained_arg)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(
                f"pretrained={pretrained_arg!r} is neither a checkpoint file nor a known tag for {name!r}. "
                f"Known tags: {tags}"
            )
        cached = _cached_tag_weights(tag_cfg, cache_dir)
        if cached is not None:
            # Load the cached file directly (no hub request), with what the tag says about
            # preprocessing and activation.
            pretrained_arg = cached
            kwargs["force_preprocess_cfg"] = {
                k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
            if tag_cfg.get("quick_gelu"):
                kwargs["force_quick_gelu"] = True
        elif not hub_reachable():
            raise RuntimeError(
                f"Weights for {name!r} pretrained={pretrained_arg!r} are not in the local cache and the "
                "hub cannot be reached. Provide them in one of these ways:\n"
                f"  - a checkpoint file: HookedCLIP.from_pretrained({name!r}, pretrained='/path/to/open_clip_pytorch_model.bin')\n"
                "  - a cache directory that holds them: from_pretrained(..., cache_dir='/path/to/hf_cache')\n"
                "  - a Hugging Face CLIP directory: HookedCLIP.from_huggingface('/path/to/clip-vit-base-patch32')"
            )
    oc_model = open_clip.create_model(name, pretrained=pretrained_arg, **kwargs)
    return oc_model.eval(), open_clip.get_tokenizer(name), label


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------
def _hf_act(name: str) -> str:
    table = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
    if name not in table:
        raise UnsupportedArchitecture(f"Hugging Face activation {name!r} is not supported")
    return table[name]


def huggingface_vision_config(v: Any, projection_dim: Optional[int]) -> VisionConfig:
    """The vision tower's config from a transformers `CLIPVisionConfig`; `projection_dim` None (or 0)
    for an encoder without the joint-space projection (e.g. a vision-encoder-decoder's encoder)."""
    image, patch = v.image_size, v.patch_size
    return VisionConfig(
        n_layers=v.num_hidden_layers, d_model=v.hidden_size, n_heads=v.num_attention_heads,
        d_head=v.hidden_size // v.num_attention_heads, d_mlp=v.intermediate_size,
        n_ctx=(image // patch) ** 2 + 1, d_embed=projection_dim or None, act_fn=_hf_act(v.hidden_act),
        eps=v.layer_norm_eps, causal=False, pooling="tok", image_size=(image, image),
        patch_size=(patch, patch), ln_pre=True, final_ln_after_pool=True,
    )


def huggingface_preprocess_cfg(image_size: tuple[int, int], folder: Optional[Path] = None) -> dict:
    """Image preprocessing of a transformers CLIP vision model: CLIP's normalisation, or the one in
    `folder`'s preprocessor_config.json when there is one."""
    cfg = {
        "size": image_size, "mode": "RGB", "interpolation": "bicubic", "resize_mode": "shortest",
        "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711), "fill_color": 0,
    }
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
            if theirs in processor:
                cfg[ours] = tuple(float(v) for v in processor[theirs])
    return cfg


def huggingface_configs(config: Any) -> tuple[TextConfig, VisionConfig]:
    """Tower configs from a transformers `CLIPConfig`."""
    t, v = config.text_config, config.vision_config
    eos = t.eos_token_id
    text_cfg = TextConfig(
        n_layers=t.num_hidden_layers, d_model=t.hidden_size, n_heads=t.num_attention_heads,
        d_head=t.hidden_size // t.num_attention_heads, d_mlp=t.intermediate_size,
        n_ctx=t.max_position_embeddings, d_embed=config.projection_dim, act_fn=_hf_act(t.hidden_act),
        eps=t.layer_norm_eps, causal=True,
        # transformers pools at argmax(ids) for legacy configs with eos_token_id == 2, else at the
        # first occurrence of eos_token_id.
        pooling="argmax" if eos == 2 else "eos", d_vocab=t.vocab_size, eot_token_id=eos,
    )
    return text_cfg, huggingface_vision_config(v, config.projection_dim)


HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_huggingface_directory(path: Path, weight_files: tuple[str, ...]) -> None:
    """Refuse, naming what is missing, a path that is not a model directory as `save_pretrained`
    writes it: a folder with config.json (a JSON object) and one of `weight_files`."""
    if not path.is_dir():
        raise FileNotFoundError(f"No Hugging Face model directory at {path}")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json: a Hugging Face model directory holds config.json and "
                                f"its weights ({weight_files[0]}), as save_pretrained writes them")
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config} is not JSON ({error})") from None
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise ValueError(f"{config} names no model_type (a Hugging Face config is a JSON object with model_type)")
    if not any((path / name).is_file() for name in weight_files):
        raise FileNotFoundError(f"{path} holds no weights: expected {' or '.join(weight_files)}")


def huggingface_parts(model_or_path: Any, tokenizer: Any = None) -> Parts:
    """The parts of a HookedCLIP from a transformers `CLIPModel` or a local directory with one
    (config and weights, as written by `save_pretrained`). Its tokenizer is used when the
    directory has one."""
    from transformers import CLIPModel

    path = None
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        check_huggingface_directory(path, HF_WEIGHT_FILES)
        model_or_path = CLIPModel.from_pretrained(path, local_files_only=True)
    hf = model_or_path
    if type(hf).__name__ != "CLIPModel":
        raise UnsupportedArchitecture(f"Expected a transformers CLIPModel, got {type(hf).__name__}")
    text_cfg, vision_cfg = huggingface_configs(hf.config)
    if tokenizer is None and path is not None and any((path / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        from transformers import AutoTokenizer

        tokenizer = Tokenizer.from_huggingface(AutoTokenizer.from_pretrained(path, local_files_only=True), text_cfg.n_ctx)
    elif tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_huggingface(tokenizer, text_cfg.n_ctx)
    processor_cfg = huggingface_preprocess_cfg(vision_cfg.image_size, path)
    param = next(hf.parameters())
    return Parts(HookedTextTower(text_cfg, tokenizer=tokenizer), HookedVisionTower(vision_cfg),
                 dict(preprocess_cfg=processor_cfg, name=getattr(hf.config, "_name_or_path", None) or None),
                 {k: v.detach() for k, v in hf.state_dict().items()}, huggingface_table(text_cfg, vision_cfg),
                 param.device, param.dtype)
