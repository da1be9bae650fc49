"""`clip_lens.sae.load` and `clip_lens.sae.save`: either on-disk layout, recognised by what is there.

- "clip_lens": `name.json` beside `name.safetensors` (`clip_lens.sae.files`);
- "saelens": a folder holding `cfg.json` and `sae_weights.safetensors` (`clip_lens.sae.saelens`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from clip_lens.sae.architectures import SparseAutoencoder
from clip_lens.sae.saelens import CFG, WEIGHTS, is_saelens_folder, load_saelens, save_saelens

LAYOUTS = ("clip_lens", "saelens")


def load(path: Union[str, Path], *, tower: Optional[str] = None) -> SparseAutoencoder:
    """The SAE at `path`: a SAELens folder (`tower` places a hook name that carries no tower), or
    clip_lens's `path.json` + `path.safetensors` (a path ending in either suffix is taken as its stem)."""
    path = Path(path)
    if is_saelens_folder(path):
        return load_saelens(path, tower=tower)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    if stem.with_suffix(".json").is_file() or stem.with_suffix(".safetensors").is_file():
        return SparseAutoencoder.load(stem)
    raise FileNotFoundError(f"no SAE at {path}: give a folder holding {CFG} and {WEIGHTS} (SAELens's layout) or "
                            f"the stem of name.json + name.safetensors (clip_lens's)")


def save(sae: SparseAutoencoder, path: Union[str, Path], *, layout: str = "clip_lens",
         model_name: Optional[str] = None) -> Path:
    """Write `sae` in `layout` ("clip_lens": path.json + path.safetensors; "saelens": folder `path`
    with cfg.json + sae_weights.safetensors, `model_name` in its metadata). Returns the weights
    file (clip_lens) or the folder (saelens)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: use one of {LAYOUTS}")
    if layout == "saelens":
        return save_saelens(sae, path, model_name=model_name)
    return sae.save(path)
