"""The keys of a sweep spec's model, dataset and resource tables, each a checked dataclass
(`clip_lens.studies.options`): a wrong type, a value out of range, an unknown or a missing key is
refused when the spec is read, the error naming the entry and the key. A study's table is read as
that study's own `Options`."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Optional

from clip_lens.model import DTYPES
from clip_lens.studies.options import CheckedFields, option


@dataclass(frozen=True, kw_only=True)
class ModelKeys(CheckedFields):
    architecture: Optional[str] = option(None, "an open_clip architecture or clip_lens/tiny-shapes")
    pretrained: Optional[str] = option(None, "an open_clip tag or checkpoint file (none: random weights, `seed`)")
    huggingface: Optional[str] = option(None, "a transformers CLIP directory")
    seed: int = option(0, "seed of the random weights", minimum=0)
    dtype: str = option("float32", "precision of the towers", choices=tuple(DTYPES))
    device: str = option("cpu", "torch device")


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
            from clip_lens.studies.options import OptionError

            raise OptionError(f"piece={self.piece!r}: give a piece's name (a file <piece>.json in the VALSE folder)")


@dataclass(frozen=True, kw_only=True)
class CannotKeys(CheckedFields):
    paths: tuple[str, ...] = option(MISSING, "CANNOT .tsv files or folders", min_items=1)
    spacy_model: str = option("en_core_web_sm", "spaCy pipeline for the dependency parse")
    limit: Optional[int] = option(None, "use the first N pairs", minimum=1)


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
