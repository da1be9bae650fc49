"""What every study command shares: the model flags, the output flags, and running a study
through `clip_lens.studies.run_study` with a summary printed at the end."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from clip_lens.model import DTYPES
from clip_lens.studies.options import add_option_flags, options_from_args

Summary = Callable[[dict], str]


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="precision of the towers (scores are computed in float32 whatever it is)")
    parser.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu, cuda, cuda:1")


def add_model_flags(parser: argparse.ArgumentParser, *, default_model: str = "ViT-B-32") -> None:
    """--model, --pretrained, --seed (random weights), --dtype, --device."""
    parser.add_argument("--model", default=default_model,
                        help="clip_lens/tiny-shapes, an open_clip architecture (e.g. ViT-B-32) or a transformers CLIP directory")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag or checkpoint file (none: random weights, seeded by --model-seed)")
    parser.add_argument("--model-seed", type=int, default=0, help="seed of the random weights when there is no --pretrained")
    add_device_flags(parser)


def add_output_flags(parser: argparse.ArgumentParser, *, default_out: Optional[Path] = None) -> None:
    """--out, --overwrite, --quiet."""
    if default_out is None:
        parser.add_argument("--out", required=True, type=Path, help="output folder (tables and report.html)")
    else:
        parser.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --out (refused without it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def study_parser(sub, name: str, study, help: str, *, skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A sub-command for `study`: its options as flags (`clip_lens.studies.options`), the model and
    the output flags."""
    parser = sub.add_parser(name, help=help)
    parser.set_defaults(study_name=study.name)  # which study the command runs (tests walk it)
    add_option_flags(parser, study.Options, skip=skip)
    add_model_flags(parser)
    add_output_flags(parser)
    return parser


def model_source(args: argparse.Namespace):
    """The `ModelSource` of --model / --pretrained / --model-seed / --dtype / --device."""
    from clip_lens.model_sources import ModelSource

    return ModelSource(args.model, args.pretrained, seed=args.model_seed, dtype=args.dtype, device=args.device)


def model_from_args(args: argparse.Namespace):
    """(HookedCLIP, label) for the model flags."""
    from clip_lens.model_sources import load_model

    source = model_source(args)
    return load_model(source), source.label()


def run_command(args: argparse.Namespace, study, make_data: Callable[[Any, Any], tuple[Any, Mapping]],
                summary: Summary = lambda tables: "", **extra_options: Any) -> int:
    """Load the model, build `study`'s options from the flags, `make_data(model, options)` ->
    (data, sources), run the study into --out, print `summary(tables)` and what was written."""
    from clip_lens.report import add_to_manifest
    from clip_lens.studies import Target, run_study

    options = options_from_args(study.Options, args, **extra_options)
    model, label = model_from_args(args)
    start = time.perf_counter()
    data, sources = make_data(model, options)
    tables = run_study(study, model, data, options, Target(args.out, args.overwrite, not args.quiet), model_label=label,
                       sources=sources)
    add_to_manifest(args.out, command=["clip-lens", *args.argv], dtype=args.dtype, device=args.device)
    text = summary(tables)
    if text:
        print(text)
    print(f"wrote {args.out}/report.html and {len(tables)} tables in {time.perf_counter() - start:.1f}s")
    return 0
