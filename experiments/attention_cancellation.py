"""Reproduces the layer-wise study of self-attention in CLIP's vision tower: attention cancelled in
single layers and in ranges of layers, each image scored against candidate captions (the caption
CLIP selects, its cosine, accuracy against the label), captions generated from the cancelled tower
beside the selected ones, the attention distance of every head and class-token attention maps.

    python experiments/attention_cancellation.py --model clip_lens/tiny-shapes --out runs/attention_cancellation
    python experiments/attention_cancellation.py --model ViT-B-32 --pretrained openai \\
        --images photos/ --captions captions.txt --captioner /path/to/hf-vision-encoder-decoder --out runs/cancel

With the tiny CLIP and no --images, the images are one-shape synthetic scenes and the captioner is
the one shipped for it; with another model and no --images, scikit-image's sample photos (no
captioner unless --captioner is given). Every output and the result of the source it reproduces
are listed in out/README.md (REPRODUCES below). attention_cancellation.toml runs it over models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from clip_lens import studies, zoo
from clip_lens.cli.common import add_model_flags, add_output_flags, model_from_args
from clip_lens.data.image_sets import open_image_set
from clip_lens.data.shapes import single_shape_set
from clip_lens.report import write_index

REPRODUCES = [
    ("summary.csv", "Table 1: per setting (baseline, each layer, the ranges), accuracy against the label, mean cosine "
                    "of the selected caption, share of changed selections, and the generated captions' mean cosines "
                    "(under the setting and against the unmodified image)"),
    ("predictions.csv", "the selected caption per image and setting (the source's per-image listings)"),
    ("logits.csv", "the per-caption logits behind each selection"),
    ("captions_by_setting.csv", "Figure 5: the selected and the generated caption of one image in every setting"),
    ("attention_distance.csv", "mean attention distance of every head by layer (the source's attention-distance plot)"),
    ("report.html", "every figure above: accuracy and cosine by setting, generated-caption cosines, class-token "
                    "attention maps"),
]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_flags(parser, default_model=zoo.NAME)
    add_output_flags(parser, default_out=Path("runs/attention_cancellation"))
    parser.add_argument("--images", type=Path, default=None, help="labelled image folder (labels.csv or sub-folders)")
    parser.add_argument("--captions", type=Path, default=None, help="candidate captions, 'label<TAB>caption' per line")
    parser.add_argument("--labels", type=Path, default=None, help="CSV with columns image, label")
    parser.add_argument("--captioner", default=None, help="a captioner (default: the shipped one with the tiny CLIP)")
    parser.add_argument("--settings", default=None,
                        help="layers to cancel, 1-based (default: each layer and the source's ranges: thirds, quarters "
                             "and all layers of the tower)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    model, label = model_from_args(args)
    tiny = args.model == zoo.NAME and args.pretrained is None
    images, captions = (args.images, args.captions)
    if images is None and tiny:
        images, captions = single_shape_set(args.out / "single_shapes" / "images")
    image_set = open_image_set(images, captions, args.labels, args.out / "sample_images")
    study = studies.get("attention-cancellation")
    options = study.Options(settings=args.settings, captioner=args.captioner or (zoo.CAPTIONER_NAME if tiny else None))
    tables = studies.run_study(study, model, image_set, options, studies.Target(args.out, args.overwrite, not args.quiet),
                               model_label=label, sources={"images": images or image_set.source, "captions": captions})
    write_index(args.out, f"Attention cancellation in the vision tower of {label}", REPRODUCES)
    print(tables["summary"].to_string(index=False))
    print(f"wrote {args.out}/README.md (what each output reproduces) and {args.out}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
