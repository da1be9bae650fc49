"""Reproduces the study that attributes CLIP's predictions to latent components: each image's score
with its caption attributed to attention heads, MLP neurons, positions and sparse-autoencoder
latents by attribution patching; Logit Lens by layer; deletion curves that measure how faithful
each ranking of heads is (attribution patching, Logit Lens, random); latents read against the class
names, with the ones a class relies on but that do not mean it ("unexpected reliance").

    python experiments/latent_attribution.py --model clip_lens/tiny-shapes --out runs/latent_attribution
    python experiments/latent_attribution.py --model ViT-B-32 --pretrained openai --images photos/ \\
        --captions captions.txt --sae-latents 4096 --sae-steps 20000 --out runs/latent_attribution

With the tiny CLIP and no --images, the images are one-shape synthetic scenes; with another model
and no --images, scikit-image's sample photos. Both towers are attributed (vision/ and text/).
Every output and the result of the source it reproduces are listed in out/README.md (REPRODUCES
below). latent_attribution.toml runs it over models.
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
from clip_lens.studies.attribution import TINY_CLIP

REPRODUCES = [
    (f"{tower}/{name}", f"{what} ({tower} tower)") for tower in ("vision", "text") for name, what in (
        ("head_attributions.csv", "attribution patching per head and image (the source's head-attribution maps)"),
        ("top_neurons.csv", "the MLP neurons with the largest attributions"),
        ("logit_lens.csv", "Logit Lens: each layer's residual read out through the final norm and projection"),
        ("deletion_curves.csv", "faithfulness: the score as the top-k heads of each ranking are removed "
                                "(attribution patching, Logit Lens, random)"),
        ("deletion_areas.csv", "the area under each deletion curve (the source's faithfulness comparison)"),
        ("latent_attributions.csv", "attribution patching through the SAE: each image's latents"),
        ("reliance.csv", "per class, the latents relied on and their alignment with the class name; unexpected reliance"),
        ("report.html", "every figure: head heatmap, Logit Lens by layer, deletion curves, attribution maps, reliance"),
    )
]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(parser, default_model=zoo.NAME)
    add_output_flags(parser, default_out=Path("runs/latent_attribution"))
    parser.add_argument("--images", type=Path, default=None, help="labelled image folder (labels.csv or sub-folders)")
    parser.add_argument("--captions", type=Path, default=None, help="one 'label<TAB>caption' per line")
    parser.add_argument("--labels", type=Path, default=None, help="CSV with columns image, label")
    parser.add_argument("--towers", nargs="+", choices=["vision", "text"], default=["vision", "text"])
    parser.add_argument("--sae-latents", type=int, default=None, help="latents of the SAE (default: the study's)")
    parser.add_argument("--sae-k", type=int, default=None, help="active latents per input (default: the study's)")
    parser.add_argument("--sae-steps", type=int, default=None, help="SAE training steps (default: the study's)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N labelled images only")
    return parser.parse_args(argv)


def options_for(args: argparse.Namespace, tower: str, tiny: bool):
    """The attribution study's options: the study's defaults, what was given, and for the tiny CLIP
    an SAE and a deletion range sized to its 64-wide, 4-head towers."""
    study = studies.get("attribution")
    sized = TINY_CLIP if tiny else {}
    given = {key: getattr(args, key) for key in ("sae_latents", "sae_k", "sae_steps", "limit")
             if getattr(args, key) is not None}
    return study.Options(**{**sized, **given, "tower": tower})


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    model, label = model_from_args(args)
    tiny = args.model == zoo.NAME and args.pretrained is None
    images, captions = args.images, args.captions
    if images is None and tiny:
        images, captions = single_shape_set(args.out / "single_shapes" / "images")
    image_set = open_image_set(images, captions, args.labels, args.out / "sample_images")
    study = studies.get("attribution")
    for tower in args.towers:
        target = studies.Target(args.out / tower, args.overwrite, not args.quiet)
        tables = studies.run_study(study, model, image_set, options_for(args, tower, tiny), target, model_label=label,
                                   sources={"images": images or image_set.source, "captions": captions})
        areas = tables["deletion_areas"].set_index("method")["area"]
        print(f"{tower} tower, area under the deletion curves (smaller = more faithful): "
              + ", ".join(f"{method} {area:.3f}" for method, area in areas.items()))
    write_index(args.out, f"Attributing the predictions of {label} to latent components", REPRODUCES)
    print(f"wrote {args.out}/README.md (what each output reproduces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
