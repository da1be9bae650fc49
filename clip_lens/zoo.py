"""Models that ship with clip_lens: their names, files and open_clip registration.

`clip_lens/tiny-shapes` is a tiny CLIP trained on synthetic shape scenes (see `clip_lens.tiny`
for its trainer and evaluator, and docs/tiny_shapes.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

NAME = "clip_lens/tiny-shapes"
ARCHITECTURE = "clip_lens-tiny-shapes"
MODELS = Path(__file__).resolve().parent / "models"
CONFIG = MODELS / "tiny-shapes.json"
WEIGHTS = MODELS / "tiny-shapes.safetensors"


def register() -> str:
    """Make the tiny model's architecture known to open_clip (idempotent); returns its open_clip name."""
    from open_clip import factory

    if ARCHITECTURE not in factory._MODEL_CONFIGS:  # open_clip keeps its registry in this dict
        factory._MODEL_CONFIGS[ARCHITECTURE] = json.loads(CONFIG.read_text())
    return ARCHITECTURE

# the prefix captioner trained against the tiny CLIP (`clip_lens.captioning.train`, docs/captioning.md)
CAPTIONER_NAME = "clip_lens/tiny-shapes-captioner"
CAPTIONER_WEIGHTS = MODELS / "tiny-shapes-captioner.safetensors"


@dataclass(frozen=True)
class TrainReport:
    """What training a shipped model (the tiny CLIP, its captioner) reports."""

    steps: int
    seconds: float
    final_loss: float
