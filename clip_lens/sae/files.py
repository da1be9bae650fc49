"""clip_lens's own file layout for an SAE: `name.json` (its config) beside `name.safetensors` (its
weights). Loading checks every key of the config and the shape of every tensor (read from the
safetensors header) before anything is allocated, and runs no code.

    sae.save("runs/sae/final")            # runs/sae/final.json + runs/sae/final.safetensors
    sae = clip_lens.sae.load("runs/sae/final")

It knows nothing of the classes: `clip_lens.sae.architectures` passes them in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

SIZES = ("d_in", "n_latents")
OPTIONAL = ("architecture", "hook", "apply_b_dec_to_input")


def save_sae(sae: Any, path: Union[str, Path]) -> Path:
    """`path.safetensors` (weights) and `path.json` (config and architecture); returns the weights
    path. Each file is written whole under a temporary name, then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights, config = path.with_suffix(".safetensors"), path.with_suffix(".json")
    save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()}, str(weights) + ".tmp")
    config.with_suffix(".json.tmp").write_text(json.dumps({"architecture": sae.architecture, **sae.config()}))
    os.replace(str(weights) + ".tmp", weights)
    os.replace(config.with_suffix(".json.tmp"), config)
    return weights


def load_sae(path: Union[str, Path], architectures: dict) -> Any:
    """An SAE saved by `save_sae`, built by its class in `architectures` ({name: class}, as
    `clip_lens.sae.architectures.ARCHITECTURES`): `path.json` (its config, each key checked by name and type) and
    `path.safetensors` (its weights, whose shapes in the file's header must be those the config
    implies); every problem is refused, naming the file, before anything is allocated. A config
    without "architecture" is a TopK SAE (the layout's first version)."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"SAE file not found: {p}" + (" (it is a folder)" if p.is_dir() else ""))
    config = read_config(config_path, architectures)
    cls = architectures[config.pop("architecture", "topk")]
    check_weights(weights_path, config_path, cls.parameter_shapes(config["d_in"], config["n_latents"]))
    sae = cls(**config)
    sae.load_state_dict(load_file(str(weights_path)))
    return sae.eval()


def read_json_object(path: Path, name: str, article: str = "a") -> dict:
    """The JSON object in `path`, a `name` ("SAE config"); anything else is a ValueError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a JSON {name} ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {article} {name} is a JSON object, not a {type(value).__name__}")
    return value


def read_config(path: Path, architectures: dict) -> dict:
    """An SAE's JSON config: architecture (a key of `architectures`; default "topk"), d_in, n_latents
    (positive integers), k for "topk" (an integer in 1..n_latents) and "batchtopk" (a number in
    (0, n_latents]), hook (a hook name or null) and apply_b_dec_to_input (a bool); anything else is
    a ValueError naming the file and key."""
    config = read_json_object(path, "SAE config", "an")
    architecture = config.get("architecture", "topk")
    if architecture not in architectures:
        raise ValueError(f"{path}: architecture {architecture!r} is not one of {sorted(architectures)}")
    needs_k = architecture in ("topk", "batchtopk")
    required = SIZES + (("k",) if needs_k else ())
    missing = [key for key in required if key not in config]
    unknown = sorted(set(config) - set(required) - set(OPTIONAL))
    if missing or unknown:
        what = "lacks " + ", ".join(missing) if missing else "has unknown keys " + ", ".join(unknown)
        raise ValueError(f"{path}: the SAE config {what} (it has {', '.join(required)}, and optionally "
                         f"{', '.join(OPTIONAL)})")
    for key in SIZES + (("k",) if architecture == "topk" else ()):
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 1:
            raise ValueError(f"{path}: {key} must be a positive integer, got {config[key]!r}")
    if needs_k and (isinstance(config["k"], bool) or not isinstance(config["k"], (int, float))
                    or not 0 < config["k"] <= config["n_latents"]):
        raise ValueError(f"{path}: k={config['k']} must lie in 1..n_latents={config['n_latents']}")
    if config.get("hook") is not None and not isinstance(config["hook"], str):
        raise ValueError(f"{path}: hook must be a hook name or null, got {config['hook']!r}")
    if not isinstance(config.get("apply_b_dec_to_input", True), bool):
        raise ValueError(f"{path}: apply_b_dec_to_input must be true or false, got {config['apply_b_dec_to_input']!r}")
    return config


def check_weights(weights: Path, config: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse a weights file whose tensors (read from its header, none loaded) are not the ones
    the config implies."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"{weights} is not a safetensors file: {error}") from None
    if set(found) != set(expected):
        raise ValueError(f"{weights} holds tensors {sorted(found)}, an SAE has {sorted(expected)}")
    for key, shape in expected.items():
        if found[key] != shape:
            raise ValueError(f"{config}'s d_in and n_latents imply {key} of shape {list(shape)}, but {weights} holds "
                             f"{list(found[key])}")
