"""SAELens's on-disk layout: a folder holding `cfg.json` and `sae_weights.safetensors`.

    sae = clip_lens.sae.load("path/to/saelens_folder", tower="vision")   # an SAE trained elsewhere
    clip_lens.sae.save(sae, "out/folder", layout="saelens")              # ours, readable by SAELens

The layout as SAELens 6 writes it (`SAEConfig.to_dict`, `SAE.save_model`):

- cfg.json: `architecture` ("standard", "topk", "jumprelu"; "batchtopk" is SAELens's training
  form, saved for inference as "jumprelu"), `d_in`, `d_sae`, `dtype`, `device`,
  `apply_b_dec_to_input`, `normalize_activations`, `reshape_activations`, `k` and
  `rescale_acts_by_decoder_norm` for "topk", and `metadata` (`hook_name`, `model_name`,
  `sae_lens_version`, ...). Configs written before SAELens 6 keep those metadata keys at the top
  level (`hook_name`, or `hook_point`), name the activation `activation_fn_str` / `activation_fn`
  with `activation_fn_kwargs: {"k": ...}` for TopK, and may lack `architecture` ("standard").
- sae_weights.safetensors: `W_enc` [d_in, d_sae], `W_dec` [d_sae, d_in], `b_enc` [d_sae], `b_dec`
  [d_in], and `threshold` [d_sae] for "jumprelu" (`topk_threshold`, a scalar, for "batchtopk").

Hook names in SAELens are a model's own (TransformerLens style, "blocks.11.hook_resid_post"):
clip_lens writes its tower into the metadata (`clip_lens_tower`) and reads it back; an SAE from
elsewhere needs `tower=`. What clip_lens does not compute (activation normalisation, hook_z
reshaping, a fine-tuning scaling factor) is refused by name, never silently dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from clip_lens.hooks import split_tower_prefix
from clip_lens.sae.architectures import ARCHITECTURES, BatchTopKSAE, JumpReLUSAE, SparseAutoencoder, TopKSAE
from clip_lens.sae.files import check_weights, read_json_object

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
LAYOUT_VERSION = "6.0.0"   # the SAELens config layout written here (its version decides how a reader parses it)
TOWERS = ("text", "vision")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
UNSUPPORTED = {"normalize_activations": "none", "reshape_activations": "none"}


def is_saelens_folder(path: Union[str, Path]) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CFG).is_file()


# --- reading ---------------------------------------------------------------------------------------
def load_saelens(path: Union[str, Path], tower: Optional[str] = None) -> SparseAutoencoder:
    """The SAE in SAELens's layout at folder `path`, as the clip_lens class of its architecture.
    `tower` ("text" or "vision") places a hook name that carries no tower; every problem is
    refused naming the file and key, before the weights are read."""
    from safetensors.torch import load_file

    folder = Path(path)
    cfg_path, weights_path = folder / CFG, folder / WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: a SAELens SAE folder holds {CFG} and {WEIGHTS}")
    cfg = _modern(read_json_object(cfg_path, "SAELens config"), cfg_path)
    architecture = cfg["architecture"]
    cls = ARCHITECTURES[architecture]
    d_in, d_sae = _size(cfg, "d_in", cfg_path), _size(cfg, "d_sae", cfg_path)
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    expected.update({"jumprelu": {"threshold": (d_sae,)}, "batchtopk": {"topk_threshold": ()}}.get(architecture, {}))
    check_weights(weights_path, cfg_path, expected)
    kwargs: dict[str, Any] = {"hook": _hook(cfg, cfg_path, tower),
                              "apply_b_dec_to_input": _flag(cfg, "apply_b_dec_to_input", True, cfg_path)}
    if architecture in ("topk", "batchtopk"):
        kwargs["k"] = cfg["k"]
    sae = cls(d_in, d_sae, **kwargs)
    state = load_file(str(weights_path))
    if architecture == "batchtopk":
        state["threshold"] = state.pop("topk_threshold")
    dtype = DTYPES[cfg.get("dtype", "float32")]
    sae.load_state_dict({key: value.to(dtype) for key, value in state.items()})
    if architecture == "topk" and _flag(cfg, "rescale_acts_by_decoder_norm", False, cfg_path):
        _fold_decoder_norms(sae)
    return sae.to(dtype).eval()


def _modern(cfg: dict, path: Path) -> dict:
    """A config in SAELens 6's form: keys of configs written before it renamed and moved."""
    cfg = dict(cfg)
    metadata = dict(cfg.get("metadata") or {})
    for old, new in (("hook_point", "hook_name"), ("hook_name", "hook_name"), ("model_name", "model_name")):
        if old in cfg and new not in metadata:
            metadata[new] = cfg.pop(old)
    cfg["metadata"] = metadata
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if "architecture" not in cfg:
        cfg["architecture"] = "topk" if activation == "topk" else "standard"
    if cfg["architecture"] == "topk" and "k" not in cfg and k is not None:
        cfg["k"] = k
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    if cfg["architecture"] not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {cfg['architecture']!r} is not one clip_lens computes "
                         f"({', '.join(sorted(ARCHITECTURES))})")
    if cfg["architecture"] == "standard" and activation not in ("relu", None):
        raise ValueError(f"{path}: activation_fn {activation!r}: a standard SAE here uses relu")
    for key, plain in UNSUPPORTED.items():
        if cfg.get(key, plain) not in (plain, None):
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (clip_lens reads SAEs with {key}='{plain}')")
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(f"{path}: finetuning_scaling_factor is set; fold the scaling factor into the weights first")
    if cfg.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"{path}: dtype {cfg['dtype']!r} is not one of {sorted(DTYPES)}")
    if cfg["architecture"] in ("topk", "batchtopk") and not _positive_number(cfg.get("k")):
        raise ValueError(f"{path}: a {cfg['architecture']} SAE needs k, a positive number; got {cfg.get('k')!r}")
    return cfg


def _positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def _size(cfg: dict, key: str, path: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _flag(cfg: dict, key: str, default: bool, path: Path) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{path}: {key} must be true or false, got {value!r}")
    return value


def _hook(cfg: dict, path: Path, tower: Optional[str]) -> Optional[str]:
    """The clip_lens hook ("vision.blocks.11.hook_resid_post") of the SAE's hook name."""
    if tower is not None and tower not in TOWERS:
        raise ValueError(f"tower={tower!r}: use 'text' or 'vision'")
    metadata = cfg["metadata"]
    name = metadata.get("hook_name")
    if name is None:
        return None
    if not isinstance(name, str):
        raise ValueError(f"{path}: hook_name must be a string, got {name!r}")
    if split_tower_prefix(name)[0] is not None:
        return name
    found = metadata.get("clip_lens_tower")
    if tower is not None and found is not None and tower != found:
        raise ValueError(f"{path}: the SAE was trained on the {found} tower ({name}), not the {tower} tower")
    if (tower or found) is None:
        raise ValueError(f"{path}: hook_name {name!r} does not say which tower it reads; pass tower='vision' or "
                         f"tower='text'")
    return f"{tower or found}.{name}"


@torch.no_grad()
def _fold_decoder_norms(sae: SparseAutoencoder) -> None:
    """SAELens's rescale_acts_by_decoder_norm (pre-activations times each decoder row's norm, latents
    divided by it before decoding) folded into unit-norm decoder rows: the same latents and output."""
    norms = sae.W_dec.norm(dim=-1)
    sae.W_enc.mul_(norms)
    sae.b_enc.mul_(norms)
    sae.W_dec.div_(norms[:, None])


# --- writing ---------------------------------------------------------------------------------------
def save_saelens(sae: SparseAutoencoder, path: Union[str, Path], *, model_name: Optional[str] = None) -> Path:
    """`sae` in SAELens's layout in folder `path` (created; each file written whole, then renamed).
    A BatchTopK SAE is written in its inference form, "jumprelu" with its threshold for every
    latent, as SAELens saves its own. Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in sae.state_dict().items()}
    if isinstance(sae, BatchTopKSAE):
        state["threshold"] = state["threshold"].expand(sae.n_latents).contiguous()
    cfg = saelens_config(sae, model_name, next(iter(state.values())).dtype)
    save_file(state, str(folder / (WEIGHTS + ".tmp")))
    (folder / (CFG + ".tmp")).write_text(json.dumps(cfg, indent=2))
    os.replace(folder / (WEIGHTS + ".tmp"), folder / WEIGHTS)
    os.replace(folder / (CFG + ".tmp"), folder / CFG)
    return folder


def saelens_config(sae: SparseAutoencoder, model_name: Optional[str], dtype: torch.dtype) -> dict:
    """The cfg.json SAELens 6 reads for `sae`."""
    architecture = "jumprelu" if isinstance(sae, (BatchTopKSAE, JumpReLUSAE)) else sae.architecture
    tower, name = split_tower_prefix(sae.hook) if sae.hook is not None else (None, None)
    metadata = {"sae_lens_version": LAYOUT_VERSION, "sae_lens_training_version": None, "model_name": model_name,
                "hook_name": name, "hook_head_index": None, "clip_lens_tower": tower, "clip_lens_hook": sae.hook}
    cfg = {"architecture": architecture, "d_in": sae.d_in, "d_sae": sae.n_latents,
           "dtype": next(key for key, value in DTYPES.items() if value == dtype), "device": "cpu",
           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": metadata}
    if isinstance(sae, TopKSAE):
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    return cfg
