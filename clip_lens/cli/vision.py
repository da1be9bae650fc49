"""`clip-lens attention-cancellation` and `clip-lens attribution`."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_lens.cli.common import _add_model_args, load_captioner
from clip_lens.cli.common import legacy_run_study as run_study


def cmd_attention_cancellation(args: argparse.Namespace) -> int:
    from clip_lens.studies import attention_cancellation as vision_study

    def study(model, label: str) -> dict:
        captioner = None if args.captioner is None else load_captioner(args.captioner, model, args.seed)
        return vision_study.attention_cancellation_study(
            model, label, args.out, images=args.images, captions=args.captions, labels=args.labels,
            settings=args.settings, map_images=args.map_images, captioner=captioner, caption_image=args.caption_image,
            beams=args.beams, overwrite=args.overwrite, progress=not args.quiet)

    def summary(tables: dict) -> str:
        text = tables["summary"].to_string(index=False)
        if "captions_by_setting" in tables:
            text += "\n" + tables["captions_by_setting"].to_string(index=False)
        return text

    return run_study(args, study, summary)


def cmd_attribution(args: argparse.Namespace) -> int:
    from clip_lens.studies import attribution as attribution_study

    def summary(tables: dict) -> str:
        reliance = tables["reliance"]
        return (f"{tables['deletion_areas'].to_string(index=False)}\n{int(reliance['unexpected'].sum())} of "
                f"{len(reliance)} relied-on latents are unexpected (low alignment with their class)")

    return run_study(args, lambda model, label: attribution_study.attribution_study(
        model, label, args.out, images=args.images, captions=args.captions, labels=args.labels, tower=args.tower,
        sae=args.sae, sae_hook=args.sae_hook, sae_latents=args.sae_latents, sae_k=args.sae_k, sae_steps=args.sae_steps,
        ks=args.ks, concept_template=args.concept_template, limit=args.limit, seed=args.seed, overwrite=args.overwrite,
        progress=not args.quiet),
        summary)


def register(sub) -> None:
    cancel = sub.add_parser("attention-cancellation", help="cancel self-attention in vision layers; attention maps")
    cancel.add_argument("--images", type=Path, default=None,
                        help="image folder (labels from labels.csv or sub-folders); default: scikit-image's sample photos")
    cancel.add_argument("--captions", type=Path, default=None, help="candidate captions, one per line ('label<TAB>caption')")
    cancel.add_argument("--labels", type=Path, default=None, help="CSV with columns image, label (default: folder/labels.csv)")
    cancel.add_argument("--settings", default=None,
                        help="layers to cancel, 1-based, e.g. '1 2 1-3 4-6 1,5,9' (default: each layer and the study's ranges)")
    cancel.add_argument("--map-images", type=int, default=3, help="images to draw class-token attention maps for")
    cancel.add_argument("--captioner", default=None,
                        help="also generate captions from the cancelled tower: clip_lens/tiny-shapes-captioner, a prefix "
                             "captioner's .safetensors file, a Hugging Face vision-encoder-decoder directory, or 'random'")
    cancel.add_argument("--beams", type=int, default=1, help="beam search with this many beams (default 1: greedy)")
    cancel.add_argument("--caption-image", type=int, default=0,
                        help="the image (index in the set) whose captions per setting the report tabulates")
    _add_model_args(cancel, instances=False)
    cancel.set_defaults(func=cmd_attention_cancellation)

    attr = sub.add_parser("attribution", help="attribute scores to heads, neurons, positions and SAE latents; "
                                              "Logit Lens and its faithfulness")
    attr.add_argument("--images", type=Path, default=None,
                      help="image folder (labels from labels.csv or sub-folders); default: scikit-image's sample photos")
    attr.add_argument("--captions", type=Path, default=None, help="one 'label<TAB>caption' per line: each image is scored "
                                                                    "against its label's caption")
    attr.add_argument("--labels", type=Path, default=None, help="CSV with columns image, label (default: folder/labels.csv)")
    attr.add_argument("--tower", choices=["vision", "text"], default="vision", help="the encoder whose components are attributed")
    attr.add_argument("--sae", type=Path, default=None, help="a saved TopKSAE (default: train one on the study's activations)")
    attr.add_argument("--sae-hook", default=None, help="hook the SAE reads (default: blocks.<L-1>.hook_resid_post)")
    attr.add_argument("--sae-latents", type=int, default=256)
    attr.add_argument("--sae-k", type=int, default=16)
    attr.add_argument("--sae-steps", type=int, default=1500)
    attr.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32],
                      help="numbers of heads removed along the deletion curves")
    attr.add_argument("--concept-template", default="a photo of a {}.", help="text for a class name in latent alignment")
    attr.add_argument("--limit", type=int, default=None, help="use the first N labelled images only")
    _add_model_args(attr, instances=False)
    attr.set_defaults(func=cmd_attribution)
