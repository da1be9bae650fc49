"""Labelled image folders and candidate-caption files (attention cancellation, zero-shot studies).

An image folder is either flat (labels from a `labels.csv` with columns `image`, `label`, or none)
or one sub-folder per label. A captions file has one candidate caption per line, optionally
`label<TAB>caption`; an image's label names its correct caption (by that label, or by being the
caption itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from clip_lens.images import path_in_folder

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(folder: Union[str, Path], labels: Optional[Union[str, Path]] = None) -> pd.DataFrame:
    """Images of a folder with their labels: DataFrame with `image` (path) and `label` (None when unknown).

    Args:
        labels: a CSV with columns `image` (file name, relative to `folder`) and `label`; default
            `folder/labels.csv` when present, else sub-folder names, else no labels.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder not found: {folder}")
    labels = Path(labels) if labels is not None else (folder / "labels.csv" if (folder / "labels.csv").is_file() else None)
    if labels is not None:
        table = pd.read_csv(labels, dtype=str)
        if not {"image", "label"} <= set(table.columns):
            raise ValueError(f"{labels} needs columns 'image' and 'label'; it has {list(table.columns)}")
        paths = [path_in_folder(folder, name, f"{labels}, row {i + 1}") for i, name in enumerate(table["image"])]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) listed in {labels} missing from {folder}: {', '.join(missing[:5])}")
        return pd.DataFrame({"image": [str(p) for p in paths], "label": table["label"].tolist()})
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and _images_in(p))
    if subfolders:
        rows = [(str(p), sub.name) for sub in subfolders for p in _images_in(sub)]
    else:
        rows = [(str(p), None) for p in _images_in(folder)]
    if not rows:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return pd.DataFrame(rows, columns=["image", "label"])


def load_captions(path: Union[str, Path]) -> tuple[list[str], dict[str, int]]:
    """(captions, label -> caption index) from a captions file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Captions file not found: {path}")
    captions, by_label = [], {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        label, _, caption = line.partition("\t") if "\t" in line else (line, "", line)
        captions.append(caption.strip())
        by_label[label.strip()] = len(captions) - 1
        by_label.setdefault(caption.strip(), len(captions) - 1)
    if not captions:
        raise ValueError(f"{path} holds no captions")
    return captions, by_label


def caption_targets(labels: Sequence[Optional[str]], by_label: dict[str, int]) -> np.ndarray:
    """Index of each image's correct caption (-1 for unlabelled images); unknown labels raise."""
    unknown = sorted({l for l in labels if l is not None and l not in by_label})
    if unknown:
        raise ValueError(f"labels without a caption: {unknown[:5]}; give them as 'label<TAB>caption' lines")
    return np.array([by_label[l] if l is not None else -1 for l in labels])


@dataclass
class ImageSet:
    """Images with labels and the candidate captions, as the vision studies take them.

    Attributes:
        frame: one row per image: image (path), label (None when unlabelled).
        captions: the candidate captions.
        targets: [images], the index of each image's caption in `captions` (-1 when unlabelled).
        source: where the images came from, for reports.
    """

    frame: pd.DataFrame
    captions: list[str]
    targets: np.ndarray
    source: str


def open_image_set(images: Optional[Union[str, Path]], captions: Optional[Union[str, Path]],
                   labels: Optional[Union[str, Path]], sample_folder: Union[str, Path]) -> ImageSet:
    """An image folder with its captions file (and optional labels CSV), or, with `images=None`,
    scikit-image's sample photos written to `sample_folder` (the demo set)."""
    if images is None:
        from clip_lens.data.sample_images import sample_images

        frame, caption_by_label = sample_images(sample_folder)
        caption_list = list(caption_by_label.values())
        by_label = {label: i for i, label in enumerate(caption_by_label)}
        source = "scikit-image's sample photos (demo set)"
    else:
        if captions is None:
            raise ValueError("--images needs --captions (a file with one candidate caption per line, "
                             "optionally 'label<TAB>caption')")
        frame = load_image_folder(images, labels)
        caption_list, by_label = load_captions(captions)
        source = str(images)
    return ImageSet(frame, caption_list, caption_targets(frame["label"], by_label), source)
