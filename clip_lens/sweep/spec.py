"""A sweep spec (TOML): models x datasets x studies, and where the results go.

    out = "runs/sweep"                       # relative paths are read from the spec's folder

    [[models]]
    name = "b32"                             # a label, unique in the spec
    architecture = "ViT-B-32"                # an open_clip name ...
    pretrained = "openai"                    # ... with a tag or checkpoint file (none: random weights, `seed`)
    # or: huggingface = "/path/to/hf-clip-dir", or: architecture = "clip_lens/tiny-shapes"

    [[datasets]]
    name = "existence"
    kind = "valse"                           # valse | cannot | pairs | shapes | images
    valse = "../shared/data/valse"           # the folder with the pieces' JSON files
    piece = "existence"
    images = "/data/valse-images"            # or "generated": seeded noise images (runs the machinery only)

    [[studies]]
    name = "causal-tracing"                  # accuracy | causal-tracing | selective-heads | image-ablation |
                                             # attention-cancellation | circuit | attribution | head-ablation
    limit = 50                               # options (see STUDIES in clip_lens.sweep.studies)

Every entry is checked when the spec is read; an error names the entry and the key.
"""

from __future__ import annotations

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

DATASET_KINDS = {
    "valse": {"valse", "piece", "images", "seed", "limit"},
    "cannot": {"paths", "spacy_model", "limit"},
    "pairs": {"file", "images", "limit"},
    "shapes": {"scenes", "seed"},
    "images": {"images", "captions", "labels"},
}
MODEL_KEYS = {"architecture", "pretrained", "huggingface", "seed", "dtype", "device"}
RESOURCE_KEYS = {"cpus", "gpus", "memory_gb"}
# the studies a task can run, with their options (clip_lens.sweep.studies runs them)
STUDY_OPTIONS = {"accuracy": set(), "causal-tracing": set(), "selective-heads": set(), "image-ablation": {"grey"},
                 "attention-cancellation": {"settings", "captioner", "beams"}, "circuit": {"steps", "check", "n_random"},
                 "attribution": {"sae_latents", "sae_k", "sae_steps", "limit"},
                 "head-ablation": {"top_k", "intervention", "random_seeds"}}
PATH_KEYS = {"valse", "images", "file", "pretrained", "huggingface", "captions", "labels", "captioner"}


class SpecError(ValueError):
    """A sweep spec that cannot run; the message names the entry and the key."""


@dataclass(frozen=True)
class Entry:
    """One model, dataset or study: its name and its other keys (paths made absolute)."""

    name: str
    options: dict = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


@dataclass(frozen=True)
class Spec:
    out: Path
    models: tuple[Entry, ...]
    datasets: tuple[Entry, ...]
    studies: tuple[Entry, ...]
    resources: dict
    retries: int
    source: str = ""


def read_spec(path_or_text: Union[str, Path], *, base: Union[str, Path, None] = None) -> Spec:
    """A spec from a TOML file (or TOML text, with `base` for relative paths)."""
    if isinstance(path_or_text, Path) or (isinstance(path_or_text, str) and "\n" not in path_or_text
                                           and path_or_text.endswith(".toml")):
        path = Path(path_or_text)
        if not path.is_file():
            raise FileNotFoundError(f"no sweep spec at {path}")
        text, base, source = path.read_text(), path.resolve().parent, str(path)
    else:
        text, base, source = str(path_or_text), Path(base or ".").resolve(), "<text>"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{source}: not valid TOML: {error}") from None
    unknown = set(raw) - {"out", "models", "datasets", "studies", "resources", "retries"}
    if unknown:
        raise SpecError(f"{source}: unknown top-level key {sorted(unknown)[0]!r} (out, models, datasets, studies, "
                        "resources, retries)")
    if "out" not in raw:
        raise SpecError(f"{source}: no 'out' folder")
    resources = dict(raw.get("resources", {}))
    bad = set(resources) - RESOURCE_KEYS
    if bad:
        raise SpecError(f"{source}: [resources] has unknown key {sorted(bad)[0]!r} ({', '.join(sorted(RESOURCE_KEYS))})")
    retries = raw.get("retries", 2)
    if not isinstance(retries, int) or retries < 0:
        raise SpecError(f"{source}: retries must be a whole number >= 0, got {retries!r}")
    models = _entries(raw, "models", base, source, lambda e: _check_model(e, source))
    datasets = _entries(raw, "datasets", base, source, lambda e: _check_dataset(e, source))
    studies = _entries(raw, "studies", base, source, lambda e: _check_study(e, source))
    return Spec(_absolute(raw["out"], base), models, datasets, studies, resources, retries, source)


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value not in ("generated", "random") and not value.startswith("clip_lens/"):
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path)
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    return value


def _is_tag(value: Any) -> bool:
    """An open_clip pretrained tag ("openai", "laion2b_s34b_b79k") rather than a checkpoint path."""
    text = str(value)
    return "/" not in text and "\\" not in text and not text.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _entries(raw: dict, key: str, base: Path, source: str, check) -> tuple[Entry, ...]:
    items = raw.get(key, [])
    if not isinstance(items, list) or not items:
        raise SpecError(f"{source}: give at least one [[{key}]] entry")
    entries, names = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise SpecError(f"{source}: {key}[{i}] has no name")
        name = item["name"]
        if name in names:
            raise SpecError(f"{source}: two {key} are named {name!r}")
        names.add(name)
        options = {k: (_absolute(v, base) if (k in PATH_KEYS and not (k == "pretrained" and _is_tag(v))) or k == "paths"
                       else v) for k, v in item.items() if k != "name"}
        if key == "datasets" and options.get("kind") == "valse" and "images" not in options:
            raise SpecError(f"{source}: dataset {name!r} needs images (a folder, or \"generated\")")
        entry = Entry(name, {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if isinstance(v, list) and
                                  v and isinstance(v[0], Path) else v) for k, v in options.items()})
        check(entry)
        entries.append(entry)
    return tuple(entries)


def _check_model(entry: Entry, source: str) -> None:
    bad = set(entry.options) - MODEL_KEYS
    if bad:
        raise SpecError(f"{source}: model {entry.name!r} has unknown key {sorted(bad)[0]!r} ({', '.join(sorted(MODEL_KEYS))})")
    from clip_lens.model import DTYPES

    if entry.get("dtype", "float32") not in DTYPES:
        raise SpecError(f"{source}: model {entry.name!r} has dtype {entry.get('dtype')!r}; use one of {', '.join(DTYPES)}")
    if ("architecture" in entry.options) == ("huggingface" in entry.options):
        raise SpecError(f"{source}: model {entry.name!r} needs exactly one of architecture (open_clip name or "
                        "clip_lens/tiny-shapes) or huggingface (a directory)")


def _check_dataset(entry: Entry, source: str) -> None:
    kind = entry.get("kind")
    if kind not in DATASET_KINDS:
        raise SpecError(f"{source}: dataset {entry.name!r} has kind {kind!r}; use one of {', '.join(DATASET_KINDS)}")
    bad = set(entry.options) - DATASET_KINDS[kind] - {"kind"}
    if bad:
        raise SpecError(f"{source}: dataset {entry.name!r} ({kind}) has unknown key {sorted(bad)[0]!r} "
                        f"({', '.join(sorted(DATASET_KINDS[kind]))})")
    needed = {"valse": ("valse", "piece"), "cannot": ("paths",), "pairs": ("file",), "shapes": (), "images": ()}[kind]
    if kind == "images" and ("images" in entry.options) != ("captions" in entry.options):
        raise SpecError(f"{source}: dataset {entry.name!r} (images) needs both images and captions, or neither (the "
                        "sample photos)")
    for key in needed:
        if key not in entry.options:
            raise SpecError(f"{source}: dataset {entry.name!r} ({kind}) needs {key!r}")


def _check_study(entry: Entry, source: str) -> None:
    if entry.name not in STUDY_OPTIONS:
        raise SpecError(f"{source}: study {entry.name!r} is not one the sweep runs ({', '.join(STUDY_OPTIONS)})")
    bad = set(entry.options) - STUDY_OPTIONS[entry.name] - {"crash_once_marker"}
    if bad:
        raise SpecError(f"{source}: study {entry.name!r} has unknown option {sorted(bad)[0]!r} "
                        f"({', '.join(sorted(STUDY_OPTIONS[entry.name])) or 'none'})")
