"""Preliminary analyses of VALSE existence (docs/methods.md#preliminary-measures): how d relates to the caption's length,
to the caption-foil similarity in the joint space and (negation in the foil) to the size of the
subject in the image, measured by a text-prompted segmentation model such as CLIPSeg."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clip_lens import plot
from clip_lens.model import HookedCLIP
from clip_lens.studies.analyses.existence import ExistenceInstances

MEASURES = {"n_tokens": "caption length (tokens)", "caption_foil_cosine": "cosine(caption, foil)",
            "subject_size": "relative subject size"}
# Words that end the subject phrase of "There is/are no <subject> ..." (e.g. "people in the picture").
SUBJECT_STOP = {"in", "on", "at", "shown", "pictured", "visible", "present", "here", "there", "near", "inside",
                "outside", "around", "under", "behind", "to", "that", "which", "who", "being", "by", "with",
                "for", "from", "anywhere", "seen", "depicted", "can", "is", "are"}

SubjectSize = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def subject_of(negated: str) -> str:
    """The subject phrase of "There is/are no <subject> ...": the words after the negator up to the
    first word that starts a location or a predicate ("people in the picture" -> "people")."""
    match = re.match(r"^There (?:is|are) no (.*?)\.?$", negated.strip())
    if match is None:
        raise ValueError(f"not a 'There is/are no ...' sentence: {negated!r}")
    words = []
    for word in match.group(1).split():
        if word.lower() in SUBJECT_STOP and words:
            break
        words.append(word)
    return " ".join(words)


class ClipSegSubjectSize:
    """Relative subject size with a CLIPSeg checkpoint (a local path or a cached hub name): the mean
    over pixels of sigmoid(logits) for the subject prompt.

    Call with image paths and subject phrases; returns [n] sizes in [0, 1]. `masks` gives the
    subjects' segmentation masks, for a subject-removed baseline (`clip_lens.baselines.fill_mask`).
    """

    def __init__(self, path: Union[str, Path], batch_size: int = 16, device: str = "cpu"):
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        self.processor = CLIPSegProcessor.from_pretrained(path)
        self.model = CLIPSegForImageSegmentation.from_pretrained(path).eval().to(device)
        self.batch_size, self.device = batch_size, device

    def __call__(self, images: Sequence[str], subjects: Sequence[str], progress: bool = True) -> np.ndarray:
        sizes = [probabilities.flatten(1).mean(dim=-1) for _, probabilities in self._batches(images, subjects, progress)]
        return torch.cat(sizes).numpy() if sizes else np.zeros(0)

    def masks(self, images: Sequence[str], subjects: Sequence[str], threshold: float = 0.5,
              progress: bool = True) -> list[np.ndarray]:
        """Each image's [height, width] bool mask of its subject: sigmoid(logits) resized to the
        image's own size (bilinear) above `threshold`."""
        if not 0 < threshold < 1:
            raise ValueError(f"threshold={threshold!r}: give a probability strictly between 0 and 1")
        out = []
        for pil, probabilities in self._batches(images, subjects, progress):
            for image, probability in zip(pil, probabilities):
                resized = F.interpolate(probability[None, None], size=(image.height, image.width), mode="bilinear",
                                        align_corners=False)[0, 0]
                out.append((resized > threshold).numpy())
        return out

    @torch.no_grad()
    def _batches(self, images: Sequence[str], subjects: Sequence[str], progress: bool):
        """(PIL images, sigmoid(logits) [batch, h, w] on the CPU) per batch of images."""
        from PIL import Image

        if len(images) != len(subjects):
            raise ValueError(f"{len(images)} images for {len(subjects)} subjects; give one subject per image")
        for start in tqdm(range(0, len(images), self.batch_size), desc="subject size", disable=not progress):
            pil = [Image.open(p).convert("RGB") for p in images[start:start + self.batch_size]]
            inputs = self.processor(text=list(subjects[start:start + self.batch_size]), images=pil,
                                    padding=True, return_tensors="pt").to(self.device)
            logits = self.model(**inputs).logits  # [batch, h, w], or [h, w] for one image
            yield pil, torch.sigmoid(logits.reshape(len(pil), *logits.shape[-2:])).float().cpu()


@dataclass
class Preliminary:
    """Per-instance measures (`frame`), their correlations with d, and accuracy against a minimum
    subject size (empty without a subject-size model)."""

    frame: pd.DataFrame
    correlations: pd.DataFrame
    accuracy_by_subject_size: pd.DataFrame

    def figures(self) -> dict[str, go.Figure]:
        figures = {"score_distribution": plot.score_distribution(self.frame),
                   "caption_foil_similarity": plot.scatter_against_d(
                       self.frame, "caption_foil_cosine", "d against caption-foil similarity", MEASURES["caption_foil_cosine"]),
                   "caption_length": plot.scatter_against_d(self.frame, "n_tokens", "d against caption length",
                                                            MEASURES["n_tokens"])}
        sized = self.frame.dropna(subset=["subject_size"])
        if len(sized):
            figures["subject_size"] = plot.scatter_against_d(sized, "subject_size", "d against subject size (negation in the foil)",
                                                             MEASURES["subject_size"])
            figures["accuracy_by_subject_size"] = plot.accuracy_curve(
                self.accuracy_by_subject_size, "Accuracy of instances with at least a given subject size")
        return figures


def correlations(frame: pd.DataFrame, measures: Sequence[str] = tuple(MEASURES)) -> pd.DataFrame:
    """Pearson and Spearman correlation of d with each measure, for all instances and per negation
    placement (rows with the measure missing are left out)."""
    rows = []
    groups = [("all", frame)] + [(where, part) for where, part in frame.groupby("negation_in", sort=False)]
    for where, part in groups:
        for measure in measures:
            valid = part[[measure, "d"]].dropna()
            if len(valid) < 3 or valid[measure].nunique() < 2:
                continue
            rows.append(dict(negation_in=where, measure=measure, pearson=valid[measure].corr(valid["d"]),
                             spearman=valid[measure].corr(valid["d"], method="spearman"), instances=len(valid)))
    return pd.DataFrame(rows, columns=["negation_in", "measure", "pearson", "spearman", "instances"])


def accuracy_by_threshold(frame: pd.DataFrame, thresholds: Optional[Sequence[float]] = None) -> pd.DataFrame:
    """Accuracy (d > 0) among instances whose subject size is at least each threshold."""
    sized = frame.dropna(subset=["subject_size"])
    if not len(sized):
        return pd.DataFrame(columns=["threshold", "accuracy", "instances"])
    if thresholds is None:
        thresholds = np.round(np.linspace(0, sized["subject_size"].max(), 11), 4)
    rows = []
    for t in thresholds:
        part = sized[sized["subject_size"] >= t]
        rows.append(dict(threshold=float(t), accuracy=float((part["d"] > 0).mean()) if len(part) else np.nan,
                         instances=len(part)))
    return pd.DataFrame(rows)


def run(model: HookedCLIP, instances: ExistenceInstances, *, subject_size: Optional[Union[str, Path, SubjectSize]] = None,
        progress: bool = True) -> Preliminary:
    """The preliminary measures for every instance.

    Args:
        subject_size: a CLIPSeg checkpoint path, or a callable (image paths, subjects) -> sizes [n];
            needs instances built from an image folder. None: no subject size.
    """
    frame = instances.instances_table()
    tokens = model.to_tokens(list(frame["caption"]))
    frame["n_tokens"] = (model.text.pooled_positions(tokens) - 1).cpu().numpy()  # between SOT and EOT
    captions, foils = instances.text_embeddings(model)
    frame["caption_foil_cosine"] = F.cosine_similarity(captions.float(), foils.float(), dim=-1).cpu().numpy()
    frame["subject"] = [subject_of(s) for s in instances.frame["negated"]]
    frame["subject_size"] = np.nan
    if subject_size is not None:
        if "image_path" not in instances.frame:
            raise ValueError("subject size needs instances prepared from an image folder (image paths)")
        measure = ClipSegSubjectSize(subject_size) if isinstance(subject_size, (str, Path)) else subject_size
        in_foil = (frame["negation_in"] == "foil").to_numpy()
        paths = list(instances.frame["image_path"][in_foil])
        frame.loc[in_foil, "subject_size"] = np.asarray(measure(paths, list(frame["subject"][in_foil])), dtype=float)
    return Preliminary(frame, correlations(frame), accuracy_by_threshold(frame))
