"""The one way the command line, sweeps and the demo turn a model's name into a `HookedCLIP`.

A `ModelSource` names a model: `clip_lens/tiny-shapes` (its shipped weights), an open_clip
architecture with a pretrained tag or a checkpoint file, or a transformers CLIP directory.

"No pretrained weights" has one meaning everywhere: the open_clip architecture's random
initialisation, seeded by `seed`, with every LayerNorm, bias, embedding and the logit scale moved
off its initial value (`clip_lens.model.random_model_pair`), the weights the parity tests check.
Such a model is labelled "random weights, seed N", and a warning says its results describe an
untrained model.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from clip_lens import zoo
from clip_lens.model import DTYPES, HookedCLIP, as_dtype, random_model_pair


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, and where and in what precision it runs.

    Attributes:
        name: "clip_lens/tiny-shapes", an open_clip architecture ("ViT-B-32"), or a transformers
            CLIP directory.
        pretrained: an open_clip tag or a checkpoint file; None: the shipped weights for
            clip_lens/tiny-shapes, random weights (seeded by `seed`) for an open_clip architecture.
        dtype: a key of `clip_lens.model.DTYPES` ("float32", "bfloat16", "float16"); the torch dtype
            is taken too and kept by that name.
    """

    name: str
    pretrained: Optional[str] = None
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        # a torch dtype is kept by its name in DTYPES (labels and run identities read the name)
        dtype = as_dtype(self.dtype, name="dtype", allow_none=False)
        object.__setattr__(self, "dtype", next(key for key, value in DTYPES.items() if value == dtype))

    @property
    def is_huggingface(self) -> bool:
        return Path(self.name).is_dir()

    @property
    def is_random(self) -> bool:
        return not self.is_huggingface and self.name != zoo.NAME and self.pretrained is None

    def label(self) -> str:
        """How reports and manifests name the model."""
        precision = "" if self.dtype == "float32" else f", {self.dtype}"
        if self.is_huggingface:
            return f"transformers CLIP from {self.name}{precision}"
        if self.name == zoo.NAME and self.pretrained is None:
            return f"{self.name} (the weights shipped with clip_lens{precision})"
        if self.pretrained is None:
            return f"{self.name} (random weights, seed {self.seed}{precision})"
        return f"{self.name} (pretrained={self.pretrained}{precision})"


def load_model(source: ModelSource, *, warn: bool = True) -> HookedCLIP:
    """The HookedCLIP `source` names, on its device in its dtype (see the module docstring for what
    no pretrained weights means)."""
    dtype = DTYPES[source.dtype]
    if source.is_huggingface:
        return HookedCLIP.from_huggingface(source.name, device=source.device, dtype=dtype)
    if source.is_random:
        if warn:
            print(f"warning: {source.name} with random weights (no pretrained weights given); the results describe an "
                  "untrained model", file=sys.stderr)
        _, model = random_model_pair(source.name, seed=source.seed)
        return model.to(device=source.device, dtype=dtype)
    pretrained = source.pretrained
    if pretrained is not None and ("/" in pretrained or "\\" in pretrained) and not Path(pretrained).is_file():
        raise FileNotFoundError(f"no checkpoint file at {pretrained}")
    return HookedCLIP.from_pretrained(source.name, pretrained=pretrained, device=source.device, dtype=dtype)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(source: ModelSource) -> str:
    """What identifies a source's weights before they are loaded: the files' SHA-256 where there
    are files, else the tag or the random seed."""
    if source.is_huggingface:
        folder = Path(source.name)
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        return "hf:" + ",".join(file_digest(f) for f in files) if files else f"hf-missing:{folder}"
    if source.name == zoo.NAME and source.pretrained is None:
        return "file:" + file_digest(zoo.WEIGHTS)
    if source.pretrained is not None:
        path = Path(source.pretrained)
        return "file:" + file_digest(path) if path.is_file() else f"tag:{source.pretrained}"
    return f"random:{source.seed}"
