"""`clip-lens pairs`, `clip-lens compare-tasks` and `clip-lens covariates`."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_lens.cli.common import _add_model_args, run_command, study_parser
from clip_lens.cli.common import legacy_run_study as run_study


def cmd_compare_tasks(args: argparse.Namespace) -> int:
    from clip_lens.studies import compare_tasks

    def study(model, label: str) -> dict:
        tasks = compare_tasks.build_tasks(
            model, valse=args.valse, pieces=args.pieces, cannot=args.cannot, pairs_files=args.pairs or (),
            images=args.images, generated_images=args.generated_images, limit=args.limit,
            spacy_model=args.spacy_model, seed=args.seed, progress=not args.quiet)
        images = "generated noise images" if args.generated_images else f"images from {args.images}"
        description = (f"{len(tasks)} tasks: " + ", ".join(f"{t.name} ({len(t.pairs)} pairs)" for t in tasks)
                       + f"; VALSE scored against {images}" * (args.valse is not None))
        return compare_tasks.compare_tasks(model, label, args.out, tasks, top_k=args.top_k, description=description,
                                           overwrite=args.overwrite, progress=not args.quiet)

    def summary(tables: dict) -> str:
        top = tables["selectivity"].sort_values("a_N", ascending=False).groupby("task", sort=False).head(1)
        return "most selective head per task:\n" + top[["task", "layer", "head", "a_N"]].to_string(index=False)

    return run_study(args, study, summary)


def cmd_pairs(args: argparse.Namespace) -> int:
    from clip_lens.studies import pairs as pairs_study

    def study(model, label: str) -> dict:
        return pairs_study.pairs_study(model, label, args.out, args.pairs, studies=args.study, images=args.images,
                                       top_k=args.top_k, choose=args.choose, alphas=args.alphas, limit=args.limit,
                                       overwrite=args.overwrite, progress=not args.quiet)

    def summary(tables: dict) -> str:
        lines = []
        if "heads" in tables:
            top = tables["heads"].groupby("task", sort=False).head(1)
            lines.append("most selective head per file:\n" + top[["task", "layer", "head", "a_N"]].to_string(index=False))
        if "ablation" in tables:
            ablation = tables["ablation"]
            lines.append(ablation[ablation["alpha"] == 0.0].groupby(["task", "condition"], sort=False)["accuracy"]
                         .mean().reset_index().to_string(index=False))
        return "\n".join(lines)

    return run_study(args, study, summary)


def cmd_covariates(args: argparse.Namespace) -> int:
    from clip_lens.studies import covariates

    def summary(tables: dict) -> str:
        return (tables["grid"].to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n"
                + tables["effects"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))

    return run_command(args, covariates.STUDY, lambda model, options: (None, {}), summary)


def register(sub) -> None:
    compare = sub.add_parser("compare-tasks", help="minimal-pair tasks side by side: selective heads, causal-tracing "
                                                   "localisation, head ablation")
    compare.add_argument("--valse", type=Path, default=None, help="the folder with VALSE's pieces (<piece>.json)")
    compare.add_argument("--pieces", nargs="+", default=None, help="VALSE pieces to use (default: all eleven)")
    compare.add_argument("--cannot", nargs="+", type=Path, default=None, help="CANNOT .tsv files or folders")
    compare.add_argument("--pairs", nargs="+", type=Path, default=None,
                         help="your own minimal pairs: CSV or JSONL files with columns caption, foil (and image)")
    compare.add_argument("--images", type=Path, default=None, help="the folder with VALSE's image files")
    compare.add_argument("--generated-images", action="store_true",
                         help="score VALSE against generated noise images (to run without the image set)")
    compare.add_argument("--limit", type=int, default=None, help="use the first N pairs of each task")
    compare.add_argument("--top-k", type=int, default=3, help="each task's most selective heads to ablate (default 3)")
    compare.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline for CANNOT's parse")
    _add_model_args(compare, instances=False)
    compare.set_defaults(func=cmd_compare_tasks)

    pairs = sub.add_parser("pairs", help="the text studies on your minimal pairs: causal tracing, selective heads, "
                                         "head ablation")
    pairs.add_argument("study", choices=["causal-tracing", "heads", "ablate-heads", "all"])
    pairs.add_argument("--pairs", required=True, nargs="+", type=Path,
                       help="CSV or JSONL files with columns caption, foil, image (and id)")
    pairs.add_argument("--images", type=Path, default=None, help="the folder the image paths are relative to")
    pairs.add_argument("--top-k", type=int, default=3, help="heads to ablate (default 3)")
    pairs.add_argument("--choose", choices=["selectivity", "attribution"], default="selectivity",
                       help="choose the heads by selectivity or by attribution patching (default selectivity)")
    pairs.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5, 0.0, -1.0],
                       help="factors the chosen heads' output is scaled by (default 1 0.5 0 -1)")
    pairs.add_argument("--limit", type=int, default=None, help="use the first N pairs of each file")
    _add_model_args(pairs, instances=False)
    pairs.set_defaults(func=cmd_pairs)

    from clip_lens.studies import covariates

    study_parser(sub, "covariates", covariates.STUDY, "negation accuracy by subject size x caption length on synthetic "
                 "scenes").set_defaults(func=cmd_covariates)
