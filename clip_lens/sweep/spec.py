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

from clip_lens.checks import is_integer

MODEL_KEYS = {"architecture", "pretrained", "huggingface", "seed", "dtype", "device"}
RESOURCE_KEYS = {"cpus", "gpus", "memory_gb"}
PATH_KEYS = {"valse", "images", "file", "pretrained", "huggingface", "captions", "labels", "captioner"}
# the studies a task can run; each reads its table as the study's Options (clip_lens.studies)
SWEEP_STUDIES = ("accuracy", "causal-tracing", "selective-heads", "image-ablation", "attention-cancellation", "circuit",
                 "attribution", "head-ablation")
TEST_KEYS = {"crash_once_marker"}  # read by the executors' tests, never an option


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
    resources = raw.get("resources", {})
    if not isinstance(resources, dict):
        raise SpecError(f"{source}: [resources] must be a table (cpus, gpus, memory_gb)")
    check_resources(resources, source)
    retries = raw.get("retries", 2)
    if not is_integer(retries) or retries < 0:
        raise SpecError(f"{source}: retries must be a whole number >= 0, got {retries!r}")
    models = _entries(raw, "models", base, source, lambda e: _check_model(e, source))
    datasets = _entries(raw, "datasets", base, source, lambda e: _check_dataset(e, source))
    studies = _entries(raw, "studies", base, source, lambda e: _check_study(e, source))
    return Spec(out_folder(raw["out"], base, source), models, datasets, studies, dict(resources), retries, source)


def out_folder(value: Any, base: Path, source: str) -> Path:
    """The spec's output folder, absolute; refused unless it is new, empty or a sweep's folder
    (not a filesystem root, not a file, not a folder of other things)."""
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{source}: out must be a folder path (a string), got {value!r}")
    folder = _path(value, base, f"{source}: out")
    resolved = folder.resolve()
    if resolved.parent == resolved:
        raise SpecError(f"{source}: out={value!r} is a filesystem root; give a folder of its own for the sweep")
    if folder.exists() and not folder.is_dir():
        raise SpecError(f"{source}: out={value!r}: {folder} is a file, not a folder")
    if folder.is_dir() and not is_sweep_folder(folder):
        names = sorted(p.name for p in folder.iterdir())
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise SpecError(f"{source}: out={value!r}: {folder} holds other things than a sweep ({shown}); give a new or "
                        "empty folder, or an earlier run's")
    return folder


def is_sweep_folder(folder: Path) -> bool:
    """A folder a sweep may write to: one an earlier run wrote (its manifest or tasks folder), or
    one holding nothing but hidden files."""
    from clip_lens.sweep.storage import MANIFEST

    if (folder / MANIFEST).is_file() or (folder / "tasks").is_dir():
        return True
    return all(p.name.startswith(".") for p in folder.iterdir())


def _path(value: str, base: Path, where: str) -> Path:
    """`value` as an absolute path (relative ones read from `base`, "~" expanded); refused when it
    cannot name a file (empty, a NUL character, an unknown user's "~name")."""
    if not value.strip() or "\0" in value:
        raise SpecError(f"{where}={value!r}: give a path (a non-empty string without NUL characters)")
    try:
        path = Path(value).expanduser()
    except RuntimeError:
        raise SpecError(f"{where}={value!r}: cannot expand ~ (no such user or no home folder)") from None
    return path if path.is_absolute() else (base / path)


def _absolute(value: Any, base: Path, where: str) -> Any:
    """A path key's value with its paths made absolute strings (names, tags and other types as
    they are: the entry's check refuses a wrong type)."""
    if isinstance(value, str) and value not in ("generated", "random") and not value.startswith("clip_lens/"):
        path = _path(value, base, where)
        if path.resolve().parent == path.resolve():  # a dataset's folder is hashed file by file: never the whole disk
            raise SpecError(f"{where}={value!r} is a filesystem root; give the folder or file itself")
        return str(path)
    if isinstance(value, list):
        return [_absolute(v, base, where) for v in value]
    return value


def _is_path_key(key: str, value: Any) -> bool:
    """Whether an entry's key holds paths (a pretrained tag does not)."""
    from clip_lens.sweep.keys import is_tag

    if key == "pretrained" and isinstance(value, str) and is_tag(value):
        return False
    return key in PATH_KEYS or (key == "paths" and isinstance(value, list))  # a string there: "give a list"


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
        where = f"{source}: {key[:-1]} {name!r}: key"
        options = {k: (_absolute(v, base, f"{where} {k}") if _is_path_key(k, v) else v) for k, v in item.items()
                   if k != "name"}
        if key == "datasets" and options.get("kind") == "valse" and "images" not in options:
            raise SpecError(f"{source}: dataset {name!r} needs images (a folder, or \"generated\")")
        entry = Entry(name, options)
        check(entry)
        entries.append(entry)
    return tuple(entries)


def _check_model(entry: Entry, source: str) -> None:
    from clip_lens.sweep.keys import ModelKeys

    keys = _checked_keys(ModelKeys, entry.options, f"{source}: model {entry.name!r}")
    if (keys.architecture is None) == (keys.huggingface is None):
        raise SpecError(f"{source}: model {entry.name!r} needs exactly one of architecture (open_clip name or "
                        "clip_lens/tiny-shapes) or huggingface (a directory)")


def _check_dataset(entry: Entry, source: str) -> None:
    from clip_lens.sweep.keys import DATASET_KINDS

    kind = entry.get("kind")
    if not isinstance(kind, str) or kind not in DATASET_KINDS:
        raise SpecError(f"{source}: dataset {entry.name!r} has kind {kind!r}; use one of {', '.join(DATASET_KINDS)}")
    keys = {k: v for k, v in entry.options.items() if k != "kind"}
    checked = _checked_keys(DATASET_KINDS[kind], keys, f"{source}: dataset {entry.name!r} ({kind})")
    if kind == "images" and (checked.images is None) != (checked.captions is None):
        raise SpecError(f"{source}: dataset {entry.name!r} (images) needs both images and captions, or neither (the "
                        "sample photos)")


def _check_study(entry: Entry, source: str) -> None:
    from clip_lens import studies

    if entry.name not in SWEEP_STUDIES:
        raise SpecError(f"{source}: study {entry.name!r} is not one the sweep runs ({', '.join(SWEEP_STUDIES)})")
    keys = {k: v for k, v in entry.options.items() if k not in TEST_KEYS}
    _checked_keys(studies.get(entry.name).Options, keys, f"{source}: study {entry.name!r}")


def check_resources(resources: dict, source: str) -> None:
    from clip_lens.sweep.keys import Resources

    _checked_keys(Resources, resources, f"{source}: [resources]")


def _checked_keys(schema: type, keys: dict, where: str):
    """`schema` made from `keys`; a wrong, unknown or missing key is a SpecError naming `where` and the key."""
    from clip_lens.studies.options import OptionError, options_from_mapping

    try:
        return options_from_mapping(schema, keys, where)
    except OptionError as error:
        raise SpecError(str(error)) from None
