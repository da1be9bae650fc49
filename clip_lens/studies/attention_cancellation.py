"""Study "attention-cancellation": self-attention cancelled in chosen vision layers (every position
attends only to itself), each image scored against every candidate caption; with a captioner also
the captions generated from the cancelled tower; the attention distance of every head and the
class token's attention maps (docs/methods.md#attention-cancellation).

`data` is an image set (`clip_lens.data.image_sets.ImageSet`: an image folder with its captions
file, or scikit-image's sample photos, which the front end writes out before the run).

Tables: summary, predictions, logits, attention_distance, captions_by_setting (with a captioner),
and for the report images (path, label, target caption) and attention_maps (class-token attention
of the first `map_images` images).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch

from clip_lens.checkpoints import Checkpoints
from clip_lens.data.image_sets import ImageSet
from clip_lens.report import Report
from clip_lens.studies.analyses import attention_cancellation as cancellation
from clip_lens.studies.analyses import attention_maps
from clip_lens.studies.options import OptionError, StudyOptions, option
from clip_lens.studies.runner import Study, Tables

# tables the report is drawn from, not results of their own (the sweep leaves them out)
REPORT_TABLES = ("images", "attention_maps")


@dataclass(frozen=True, kw_only=True)
class Options(StudyOptions):
    settings: Optional[str] = option(None, "layers to cancel, 1-based, e.g. '1 2 1-3 4-6 1,5,9' (default: each layer "
                                           "and the study's ranges)")
    map_images: int = option(3, "images to draw class-token attention maps for", minimum=0)
    map_layer: Optional[int] = option(None, "layer (from 0) of the attention maps (default: the last)", minimum=0)
    captioner: Optional[str] = option(None, "also generate captions from the cancelled tower: "
                                            "clip_lens/tiny-shapes-captioner, a prefix captioner's .safetensors file, a "
                                            "Hugging Face vision-encoder-decoder directory, or 'random'")
    caption_image: int = option(0, "the image (index in the set) whose captions per setting the report tabulates",
                                minimum=0)
    beams: int = option(1, "beam search with this many beams (1: greedy)", minimum=1)
    pair_chunk: int = option(32, "images per forward pass (memory)", minimum=1)
    checkpoint_chunk: int = option(32, "images saved per checkpoint, from which a killed run resumes (pair_chunk may "
                                       "change in between)", minimum=1)
    seed: int = option(0, "seed of the random captioner (--captioner random)", minimum=0)
    NOT_IN_IDENTITY: ClassVar[tuple[str, ...]] = ("pair_chunk",)  # memory only: a killed run resumes with another

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.captioner is None and (self.beams != 1 or self.caption_image != 0):
            raise OptionError("beams and caption_image (--beams, --caption-image) are for generated captions: give a "
                              "captioner (--captioner) too")
        if self.settings is not None:
            try:
                cancellation.parse_settings(self.settings, 10**6)
            except ValueError:
                raise OptionError(f"settings={self.settings!r}: give 1-based layers, ranges and sets, e.g. "
                                  "'1 2 1-3 1,5,9'") from None
            if not re.sub(r"[\s;]+", "", self.settings):
                raise OptionError(f"settings={self.settings!r}: give at least one setting, or None for the defaults")


def load_captioner(name: Optional[str], model, seed: int):
    """The captioner `name` on the model's device: "random" (an untrained prefix captioner for this
    CLIP, seeded by `seed`), clip_lens/tiny-shapes-captioner, a file or a Hugging Face directory."""
    if name is None:
        return None
    from clip_lens.captioning import load_captioner as load
    from clip_lens.captioning.train import random_captioner

    with torch.device("cpu"):  # built on the host whatever the default device, then moved to the model's
        if name == "random":
            return random_captioner(model.vision.cfg.d_embed, seed).to(model.device)
        return load(name, device=model.device)


def cancel(model, data: ImageSet, options: Options, *, checkpoints=None, progress: bool = True):
    """The attention-cancellation result (`analyses.attention_cancellation.AttentionCancellation`)
    and the pixels [n, 3, H, W] of the image set."""
    captioner = load_captioner(options.captioner, model, options.seed)
    n_layers, frame = model.vision.cfg.n_layers, data.frame
    settings = cancellation.parse_settings(options.settings, n_layers) if options.settings else None
    if captioner is not None and not 0 <= options.caption_image < len(frame):
        raise ValueError(f"caption_image {options.caption_image} is out of range: the image set has {len(frame)} images")
    if options.map_layer is not None and options.map_layer >= n_layers:
        raise ValueError(f"map_layer {options.map_layer}: the vision tower's layers run 0..{n_layers - 1}")
    pixels = model.to_pixels(list(frame["image"]))
    captioning = None if captioner is None else cancellation.Captioning(captioner, beams=options.beams)
    result = cancellation.run(model, data, settings=settings, pixels=pixels, captioner=captioning,
                              pair_chunk=options.pair_chunk,
                              checkpoints=(checkpoints or Checkpoints(None)).sized(options.checkpoint_chunk), progress=progress)
    return result, pixels


def compute(model, data: ImageSet, options: Options, *, checkpoints=None, progress: bool = True) -> Tables:
    """summary, predictions, logits, attention_distance, [captions_by_setting], images, attention_maps."""
    result, pixels = cancel(model, data, options, checkpoints=checkpoints, progress=progress)
    tables = {"summary": result.summary(), "predictions": result.predictions(), "logits": result.logits_frame(),
              "attention_distance": attention_maps.mean_attention_distance(model, pixels)}
    if result.generated is not None:
        tables["captions_by_setting"] = result.caption_table(options.caption_image)
    tables["images"] = result.images_frame()
    layer = model.vision.cfg.n_layers - 1 if options.map_layer is None else options.map_layer
    shown = min(options.map_images, len(data.frame))
    tables["attention_maps"] = attention_maps.class_token_table(model, pixels[:shown], list(data.frame["image"][:shown]),
                                                                layer)
    return tables


# --- report --------------------------------------------------------------------------------------
def report(tables: Tables, options: Options) -> Report:
    out = Report("Attention cancellation in CLIP's vision encoder")
    _setup(out, tables)
    out.section("Cancelling self-attention").text(
        "In the layers of a setting (named from 1, as in the study; the tables' blocks column counts from 0) every "
        "position attends only to itself, so the attention block outputs out_proj(V).", note=True)
    out.table(tables["summary"], max_rows=100, caption="Accuracy, mean cosine of the selected caption, and the share "
                                                       "of images whose selection changed from the baseline")
    for fig in cancellation.figures(tables["summary"], tables["logits"], tables["images"]).values():
        out.figure(fig)
    out.table(tables["predictions"], max_rows=40, caption="Selected caption per setting and image")
    if "captions_by_setting" in tables:
        _generated(out, tables, options)
    _maps(out, tables)
    return out


def _setup(out: Report, tables: Tables) -> None:
    images = tables["images"]
    folders = sorted({str(Path(p).parent) for p in images["image"]})
    where = folders[0] if len(folders) == 1 else f"{len(folders)} folders"
    n_captions = tables["logits"]["caption"].nunique()
    out.section("Setup").text(f"Images: {where} ({len(images)} images, {int((images['target'] >= 0).sum())} labelled); "
                              f"{n_captions} candidate captions.")


def _generated(out: Report, tables: Tables, options: Options) -> None:
    name = Path(tables["images"]["image"][options.caption_image]).name
    captioner = f"random prefix captioner (seed {options.seed})" if options.captioner == "random" else options.captioner
    decoding = "greedy decoding" if options.beams == 1 else f"beam search, {options.beams} beams"
    out.section("Generated captions").text(
        f"Captioner: {captioner} (reads the vision tower with self-attention cancelled as in each setting; {decoding}). "
        "Cosines are CLIP's: under the setting, as for the selected caption, and against the unmodified image.",
        note=True)
    out.table(tables["captions_by_setting"], max_rows=100, caption=f"Selected and generated caption per setting for {name}")


def _maps(out: Report, tables: Tables) -> None:
    out.section("Attention maps")
    out.figure(attention_maps.distance_figure(tables["attention_distance"]))
    for image, rows in tables["attention_maps"].groupby("image", sort=False):
        size = (int(rows["height"].iloc[0]), int(rows["width"].iloc[0]))
        out.figure(attention_maps.attention_map_figure(
            attention_maps.view_of_file(image, size), attention_maps.maps_of(rows),
            f"Class-token attention, layer {int(rows['layer'].iloc[0])} (from 0): {Path(image).name}"))


STUDY = Study("attention-cancellation", Options, compute, report,
              data="an image set (clip_lens.data.image_sets.ImageSet): images, candidate captions, targets")
