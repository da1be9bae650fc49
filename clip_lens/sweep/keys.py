"""The keys of a sweep spec's model, dataset and resource tables, each a checked dataclass
(`clip_lens.studies.options`): a wrong type, a value out of range, an unknown or a missing key is
refused when the spec is read, the error naming the entry and the key. A study's table is read as
that study's own `Options`."""

from __future__ import annotations

import difflib
import importlib.util
import re
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Optional

from clip_lens.model import DTYPES
from clip_lens.studies.options import CheckedFields, OptionError, option

DEVICE = re.compile(r"cpu|mps|cuda(:[0-9]+)?")  # the devices a model entry may name ("cuda:1": the second GPU)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def is_tag(value: str) -> bool:
    """An open_clip pretrained tag ("openai", "laion2b_s34b_b79k") rather than a checkpoint path."""
    return "/" not in value and "\\" not in value and not value.endswith(CHECKPOINT_SUFFIXES)


def known_architectures() -> list[str]:
    """The names a model entry's architecture may take: open_clip's architectures and the CLIPs
    shipped with clip_lens (their open_clip registration is internal, not a name to give)."""
    import open_clip

    from clip_lens import zoo

    return [zoo.NAME] + [name for name in open_clip.list_models() if name != zoo.ARCHITECTURE]


def _closest(word: str, names: list[str]) -> str:
    """", closest: a, b, c" (difflib's nearest names), or "" when nothing is near."""
    near = difflib.get_close_matches(word, names, n=3, cutoff=0.5)
    return f" (closest: {', '.join(near)})" if near else ""


def check_architecture(architecture: str) -> None:
    """An open_clip architecture, a CLIP shipped with clip_lens, or a transformers CLIP directory
    (its config.json there); anything else is refused with the closest names."""
    names = known_architectures()
    if architecture in names:
        return
    looks_like_path = ("/" in architecture or "\\" in architecture) and not architecture.startswith("clip_lens/")
    if looks_like_path and (Path(architecture) / "config.json").is_file():
        return
    where = f"no transformers CLIP directory (with its config.json) at {architecture}, and " if looks_like_path else ""
    raise OptionError(f"architecture={architecture!r}: {where}not an open_clip architecture nor a model shipped with "
                      f"clip_lens{_closest(architecture, names)}; open_clip.list_models() names them all")


def check_tag(architecture: str, tag: str) -> None:
    """`tag` is one of open_clip's pretrained tags for `architecture` (clip_lens's shipped CLIPs
    have none: they come with their weights)."""
    import open_clip

    from clip_lens import zoo

    if architecture == zoo.NAME:
        raise OptionError(f"pretrained={tag!r}: {zoo.NAME} comes with its weights; give no pretrained, or a checkpoint "
                          "file")
    if architecture in open_clip.list_models() and not open_clip.get_pretrained_cfg(architecture, tag):
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        known = f"its tags: {', '.join(tags)}" if tags else "it has none"
        raise OptionError(f"pretrained={tag!r}: not a checkpoint file nor an open_clip tag of {architecture} ({known})")


@dataclass(frozen=True, kw_only=True)
class ModelKeys(CheckedFields):
    architecture: Optional[str] = option(None, "an open_clip architecture or clip_lens/tiny-shapes")
    pretrained: Optional[str] = option(None, "an open_clip tag or checkpoint file (none: random weights, `seed`)")
    huggingface: Optional[str] = option(None, "a transformers CLIP directory")
    seed: int = option(0, "seed of the random weights", minimum=0)
    dtype: str = option("float32", "precision of the towers", choices=tuple(DTYPES))
    device: str = option("cpu", "torch device: cpu, cuda, cuda:N or mps")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not DEVICE.fullmatch(self.device):
            raise OptionError(f"device={self.device!r}: give cpu, cuda, cuda:N (a GPU's index) or mps")
        if self.huggingface is not None and self.pretrained is not None:
            raise OptionError(f"pretrained={self.pretrained!r}: a transformers CLIP directory brings its weights; "
                              "pretrained is for an architecture")
        if self.architecture is not None:
            check_architecture(self.architecture)
            if self.pretrained is not None and is_tag(self.pretrained):
                check_tag(self.architecture, self.pretrained)


@dataclass(frozen=True, kw_only=True)
class ValseKeys(CheckedFields):
    valse: str = option(MISSING, "the folder with VALSE's pieces")
    piece: str = option(MISSING, "the piece's name (its file is <piece>.json)")
    images: str = option(MISSING, "the image folder, or \"generated\"")
    seed: int = option(0, "seed of generated images", minimum=0)
    limit: Optional[int] = option(None, "use the first N pairs", minimum=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.piece or "/" in self.piece or "\\" in self.piece or self.piece.startswith("."):
            raise OptionError(f"piece={self.piece!r}: give a piece's name (a file <piece>.json in the VALSE folder)")


@dataclass(frozen=True, kw_only=True)
class CannotKeys(CheckedFields):
    paths: tuple[str, ...] = option(MISSING, "CANNOT .tsv files or folders", min_items=1)
    spacy_model: str = option("en_core_web_sm", "spaCy pipeline for the dependency parse")
    limit: Optional[int] = option(None, "use the first N pairs", minimum=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not spacy_pipeline_installed(self.spacy_model):
            raise OptionError(f"spacy_model={self.spacy_model!r}: no installed spaCy pipeline of that name (install "
                              "it, e.g. `python -m spacy download en_core_web_sm`, or give a pipeline's folder)")


def spacy_pipeline_installed(name: str) -> bool:
    """A spaCy pipeline that `clip_lens.data.cannot.load_spacy` can load: an installed package (or
    its listed equivalent), or a pipeline's folder; found without importing spaCy."""
    from clip_lens.data.cannot import SPACY_EQUIVALENTS

    if name and Path(name).is_dir() and ("/" in name or "\\" in name or name.startswith(".")):
        return True
    for candidate in (name, *SPACY_EQUIVALENTS.get(name, ())):
        if candidate.isidentifier() and importlib.util.find_spec(candidate) is not None:
            return True
    return False


@dataclass(frozen=True, kw_only=True)
class PairsKeys(CheckedFields):
    file: str = option(MISSING, "a CSV or JSONL file of minimal pairs")
    images: Optional[str] = option(None, "the folder the image paths are relative to")
    limit: Optional[int] = option(None, "use the first N pairs", minimum=1)


@dataclass(frozen=True, kw_only=True)
class ShapesKeys(CheckedFields):
    scenes: int = option(40, "synthetic scenes", minimum=1)
    seed: int = option(1, "seed of the scenes", minimum=0)


@dataclass(frozen=True, kw_only=True)
class ImagesKeys(CheckedFields):
    images: Optional[str] = option(None, "an image folder (none: scikit-image's sample photos)")
    captions: Optional[str] = option(None, "one 'label<TAB>caption' per line")
    labels: Optional[str] = option(None, "CSV with columns image, label")


DATASET_KINDS = {"valse": ValseKeys, "cannot": CannotKeys, "pairs": PairsKeys, "shapes": ShapesKeys, "images": ImagesKeys}


@dataclass(frozen=True, kw_only=True)
class Resources(CheckedFields):
    cpus: Optional[int] = option(None, "CPU threads per task (default 1 on Ray; torch's choice locally)", minimum=1,
                                 maximum=1024)
    gpus: Optional[float] = option(None, "GPUs per task", minimum=0)
    memory_gb: Optional[float] = option(None, "memory per task in GiB (Ray)", minimum=0)
