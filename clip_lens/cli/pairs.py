"""`clip-lens pairs`, `clip-lens compare-tasks` and `clip-lens covariates`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clip_lens.cli.common import run_command, study_parser


def cmd_compare_tasks(args: argparse.Namespace) -> int:
    import pandas as pd

    from clip_lens.studies import compare_tasks

    built = {}

    def make_data(model, options):
        sources = compare_tasks.TaskSources(valse=args.valse, pieces=args.pieces, images=args.images,
                                            generated_images=args.generated_images, cannot=args.cannot,
                                            spacy_model=args.spacy_model, pairs_files=args.pairs or ())
        start = time.perf_counter()
        tasks = compare_tasks.build_tasks(model, sources, limit=options.limit, seed=options.seed, progress=not args.quiet)
        built["seconds"] = time.perf_counter() - start
        images = "generated noise images" if args.generated_images else f"images from {args.images}"
        description = (f"{len(tasks)} tasks: " + ", ".join(f"{t.name} ({len(t.pairs)} pairs)" for t in tasks)
                       + f"; VALSE scored against {images}" * (args.valse is not None))
        return compare_tasks.TaskSet(tasks, description), {k: v for k, v in vars(sources).items() if v not in (None, ())}

    def summary(tables: dict) -> str:
        top = tables["selectivity"].sort_values("a_N", ascending=False).groupby("task", sort=False).head(1)
        stages = pd.concat([pd.DataFrame([{"task": "all", "stage": "building the tasks (pairs, parse, images)",
                                           "seconds": built.get("seconds", 0.0)}]), tables["stages"]])
        return ("most selective head per task:\n" + top[["task", "layer", "head", "a_N"]].to_string(index=False)
                + "\ntime per stage:\n" + compare_tasks.stage_summary(stages).to_string(index=False))

    return run_command(args, compare_tasks.STUDY, make_data, summary)


def cmd_pairs(args: argparse.Namespace) -> int:
    from clip_lens.studies import pairs as pairs_study

    def make_data(model, options):
        return pairs_study.read_files(model, args.pairs, options, args.images), {"pairs": args.pairs, "images": args.images}

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

    return run_command(args, pairs_study.STUDY, make_data, summary, studies=args.studies)


def cmd_covariates(args: argparse.Namespace) -> int:
    from clip_lens.studies import covariates

    def summary(tables: dict) -> str:
        return (tables["grid"].to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n"
                + tables["effects"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))

    return run_command(args, covariates.STUDY, lambda model, options: (None, {}), summary)


def register(sub) -> None:
    from clip_lens.studies import compare_tasks
    from clip_lens.studies import pairs as pairs_study

    compare = study_parser(sub, "compare-tasks", compare_tasks.STUDY, "minimal-pair tasks side by side: selective heads, "
                                                                      "causal-tracing localisation, head ablation")
    compare.add_argument("--valse", type=Path, default=None, help="the folder with VALSE's pieces (<piece>.json)")
    compare.add_argument("--pieces", nargs="+", default=None, help="VALSE pieces to use (default: all eleven)")
    compare.add_argument("--cannot", nargs="+", type=Path, default=None, help="CANNOT .tsv files or folders")
    compare.add_argument("--pairs", nargs="+", type=Path, default=None,
                         help="your own minimal pairs: CSV or JSONL files with columns caption, foil (and image)")
    compare.add_argument("--images", type=Path, default=None, help="the folder with VALSE's image files")
    compare.add_argument("--generated-images", action="store_true",
                         help="score VALSE against generated noise images, one per image file (to run without the image set)")
    compare.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline for CANNOT's parse")
    compare.set_defaults(func=cmd_compare_tasks)

    pairs = study_parser(sub, "pairs", pairs_study.STUDY, "the text studies on your minimal pairs: causal tracing, "
                                                          "selective heads, head ablation")
    pairs.add_argument("studies", metavar="study", choices=[*pairs_study.STUDIES, "all"],
                       help=f"one of {', '.join(pairs_study.STUDIES)} or all")
    pairs.add_argument("--pairs", required=True, nargs="+", type=Path,
                       help="CSV or JSONL files with columns caption, foil, image (and id)")
    pairs.add_argument("--images", type=Path, default=None, help="the folder the image paths are relative to")
    pairs.set_defaults(func=cmd_pairs)

    from clip_lens.studies import covariates

    study_parser(sub, "covariates", covariates.STUDY, "negation accuracy by subject size x caption length on synthetic "
                 "scenes").set_defaults(func=cmd_covariates)
