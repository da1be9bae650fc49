"""Attention cancellation and attention maps end to end, as the CLI runs them: compute, write
tables and one HTML report. With no image folder, scikit-image's sample photos are the demo set."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import pandas as pd

from clip_lens.checkpoints import claim_resumable_output, weights_fingerprint
from clip_lens.data.image_sets import open_image_set
from clip_lens.model import HookedCLIP
from clip_lens.report import Report, write_study
from clip_lens.studies.analyses import attention_cancellation, attention_maps

PathLike = Union[str, Path]


def attention_cancellation_study(model: HookedCLIP, model_label: str, out: PathLike, *, images: Optional[PathLike] = None,
                                 captions: Optional[PathLike] = None, labels: Optional[PathLike] = None,
                                 settings: Optional[str] = None, map_images: int = 3, map_layer: Optional[int] = None,
                                 captioner=None, caption_image: int = 0, beams: int = 1, pair_chunk: int = 32,
                                 overwrite: bool = False, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Run attention cancellation (and attention maps) and write `out/`: predictions.csv,
    summary.csv, logits.csv, attention_distance.csv and report.html; with a captioner
    (`clip_lens.captioning`) also the generated captions (in predictions.csv and summary.csv) and
    captions_by_setting.csv, the selected and generated caption per setting for image
    `caption_image` (an index into the image set). Returns the tables.

    Each finished chunk of `pair_chunk` images is saved under out/.partial/; run again into the
    same `out` with the same settings, a killed run resumes from them (clip_lens.checkpoints)."""
    if captioner is None and (beams != 1 or caption_image != 0):
        raise ValueError("beams and caption_image (--beams, --caption-image) are for generated captions: give a "
                         "captioner (--captioner) too")
    captioner_label = None if captioner is None else (getattr(captioner, "name", "") or type(captioner).__name__)
    identity = dict(study="attention-cancellation", model=model_label, dtype=str(model.dtype), device=str(model.device),
                    weights=weights_fingerprint(model), images=images, captions=captions, labels=labels, settings=settings,
                    captioner=captioner_label, beams=beams, pair_chunk=pair_chunk,
                    captioner_weights=None if captioner is None else weights_fingerprint(captioner))
    checkpoints = claim_resumable_output(out, identity, overwrite=overwrite)
    out = Path(out)
    image_set = open_image_set(images, captions, labels, out / "sample_images")
    frame, caption_list, targets, source = image_set.frame, image_set.captions, image_set.targets, image_set.source
    chosen = attention_cancellation.parse_settings(settings, model.vision.cfg.n_layers) if settings else None
    if captioner is not None and not 0 <= caption_image < len(frame):
        raise ValueError(f"caption_image {caption_image} is out of range: the image set has {len(frame)} images")
    pixels = model.to_pixels(list(frame["image"]))
    result = attention_cancellation.run(model, frame, caption_list, targets=targets, settings=chosen, pixels=pixels,
                                        captioner=captioner, beams=beams, pair_chunk=pair_chunk, checkpoints=checkpoints,
                                        progress=progress)
    distance = attention_maps.mean_attention_distance(model, pixels)
    tables = {"summary": result.summary(), "predictions": result.predictions(), "logits": result.logits_frame(),
              "attention_distance": distance}
    if captioner is not None:
        tables["captions_by_setting"] = result.caption_table(caption_image)

    report = Report("Attention cancellation in CLIP's vision encoder")
    report.section("Setup").text(f"Model: {model_label}. Images: {source} ({len(frame)} images, "
                                 f"{int((targets >= 0).sum())} labelled); {len(caption_list)} candidate captions.")
    report.section("Cancelling self-attention").text(
        "In the layers of a setting (named from 1, as in the study; the tables' blocks column counts from 0) every "
        "position attends only to itself, so the attention block outputs out_proj(V).", note=True)
    report.table(tables["summary"], max_rows=100, caption="Accuracy, mean cosine of the selected caption, and the share "
                                                          "of images whose selection changed from the baseline")
    for fig in result.figures().values():
        report.figure(fig)
    report.table(tables["predictions"], max_rows=40, caption="Selected caption per setting and image")
    if captioner is not None:
        name = Path(frame["image"][caption_image]).name
        report.section("Generated captions").text(
            f"Captioner: {getattr(captioner, 'name', '') or type(captioner).__name__} (reads the "
            f"{'image embedding' if captioner.reads == 'embedding' else 'output tokens'} of the vision tower, with "
            f"self-attention cancelled as in each setting; {'greedy decoding' if beams == 1 else f'beam search, {beams} beams'}). "
            "Cosines are CLIP's: under the setting, as for the selected caption, and against the unmodified image.",
            note=True)
        report.table(tables["captions_by_setting"], max_rows=100,
                     caption=f"Selected and generated caption per setting for {name}")
    report.section("Attention maps")
    report.figure(attention_maps.distance_figure(distance))
    layer = model.vision.cfg.n_layers - 1 if map_layer is None else map_layer
    maps = attention_maps.class_token_attention(attention_maps.patterns(model, pixels[:map_images], [layer])[:, 0],
                                                model.vision.cfg.grid_size)
    for i in range(min(map_images, len(frame))):
        name = Path(frame["image"][i]).name
        report.figure(attention_maps.attention_map_figure(attention_maps.model_view(model, pixels[i]), maps[i],
                                                          f"Class-token attention, layer {layer} (from 0): {name}"))
    write_study(out, tables, report, manifest={"study": "attention-cancellation", "model": model_label,
                                               "captioner": captioner_label, "beams": beams,
                                               "data": {"images": source, "captions": captions, "labels": labels},
                                               "checkpoints": checkpoints.summary()})
    checkpoints.finish()
    return tables
