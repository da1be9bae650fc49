"""`clip-lens valse-existence` and `clip-lens cannot`: the negation studies."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_lens.cli.common import _add_model_args
from clip_lens.cli.common import legacy_run_study as run_study


def cmd_valse_existence(args: argparse.Namespace) -> int:
    from clip_lens.studies import negation as negation_study

    studies = {"all": negation_study.VALSE_STUDIES, "text": negation_study.TEXT_STUDIES}.get(args.study, (args.study,))
    return run_study(args, lambda model, label: negation_study.valse_existence(
        model, label, args.valse, args.images, args.out, studies=studies, missing=args.missing_images, limit=args.limit,
        sample=args.sample, seed=args.seed, grey=args.grey, subject_size=args.clipseg, query_layers=args.query_layers,
        batch_size=args.batch_size, pair_chunk=args.pair_chunk, overwrite=args.overwrite, progress=not args.quiet),
        lambda tables: f"{tables['accuracy'].to_string(index=False)}\n"
                       f"{len(tables['instances'])} instances, {len(tables['excluded'])} excluded")


def cmd_cannot(args: argparse.Namespace) -> int:
    from clip_lens.studies import negation as negation_study

    return run_study(args, lambda model, label: negation_study.cannot_negator_attention(
        model, label, args.cannot, args.out, spacy_model=args.spacy_model, limit=args.limit,
        query_layers=args.query_layers, overwrite=args.overwrite, progress=not args.quiet),
        lambda tables: f"{tables['selection'].to_string(index=False)}\n"
                       f"{tables['negator_heads'].head(5).to_string(index=False)}")


def register(sub) -> None:
    valse = sub.add_parser("valse-existence", help="negation studies on VALSE existence")
    valse.add_argument("study", choices=["causal-tracing", "negator-attention", "preliminary", "image-ablation", "text", "all"],
                       help="one study, 'text' (the three text-encoder studies) or 'all' (with image ablation)")
    valse.add_argument("--valse", required=True, type=Path, help="VALSE existence.json")
    valse.add_argument("--images", required=True, type=Path, help="folder with the instances' image files")
    valse.add_argument("--missing-images", choices=["raise", "skip"], default="raise",
                       help="stop with an error on missing images (default), or skip those instances and list them")
    valse.add_argument("--sample", type=int, default=None, help="a random sample of N instances (seeded by --seed)")
    valse.add_argument("--grey", action="store_true", help="image ablation: a grey mean colour instead of per-channel")
    valse.add_argument("--batch-size", type=int, default=None,
                       help="interventions per forward pass (memory: batch x positions x d_model floats)")
    valse.add_argument("--pair-chunk", type=int, default=None,
                       help="instances whose runs are cached at a time (memory: about 2L+1 residual streams each)")
    valse.add_argument("--clipseg", default=None, help="CLIPSeg checkpoint (local path) for the subject size")
    _add_model_args(valse)
    valse.set_defaults(func=cmd_valse_existence)

    cannot = sub.add_parser("cannot", help="negation studies on CANNOT")
    cannot.add_argument("study", choices=["negator-attention"])
    cannot.add_argument("--cannot", required=True, nargs="+", type=Path,
                        help="CANNOT .tsv files (premise/hypothesis/label or sentence/negated) or folders of them")
    cannot.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline for the dependency parse")
    _add_model_args(cannot)
    cannot.set_defaults(func=cmd_cannot)
