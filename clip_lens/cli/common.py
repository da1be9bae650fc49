"""What every study command shares: the model flags, the output flags, and running a study
through `clip_lens.studies.run_study` with a summary printed at the end."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

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


def model_from_args(args: argparse.Namespace):
    """(HookedCLIP, label) for --model / --pretrained / --model-seed / --dtype / --device."""
    from clip_lens.model_sources import ModelSource, load_model

    source = ModelSource(args.model, args.pretrained, seed=args.model_seed, dtype=args.dtype, device=args.device)
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


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# --- the commands not yet on the study runner (to go) -------------------------------------------
def _add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="precision of the towers (scores are computed in float32 whatever it is)")
    parser.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu, cuda, cuda:1")


def legacy_load_model(model: str, pretrained: Optional[str], dtype: str = "float32", device: str = "cpu"):
    """(HookedCLIP, label) from an open_clip name (+ tag or checkpoint) or a transformers CLIP
    directory, on `device` in `dtype` (a key of DTYPES)."""
    import clip_lens
    from clip_lens import zoo

    precision = "" if dtype == "float32" else f", {dtype}"
    if Path(model).is_dir():
        hooked = clip_lens.HookedCLIP.from_huggingface(model, device=device, dtype=DTYPES[dtype])
        return hooked, f"transformers CLIP from {model}{precision}"
    hooked = clip_lens.HookedCLIP.from_pretrained(model, pretrained=pretrained, device=device, dtype=DTYPES[dtype])
    if model == zoo.NAME and pretrained is None:
        return hooked, f"{model} (the weights shipped with clip_lens{precision})"
    if pretrained is None:
        print(f"warning: {model} with random weights (no --pretrained); the results describe an untrained model",
              file=sys.stderr)
    return hooked, f"{model} ({'pretrained=' + str(pretrained) if pretrained else 'random weights'}{precision})"


def _add_model_args(parser: argparse.ArgumentParser, instances: bool = True) -> None:
    parser.add_argument("--model", default="ViT-B-32",
                        help="open_clip architecture (e.g. ViT-B-32) or a transformers CLIP directory")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint file")
    parser.add_argument("--out", required=True, type=Path, help="output folder (tables and report.html)")
    if instances:
        parser.add_argument("--limit", type=int, default=None, help="use the first N instances only")
        parser.add_argument("--query-layers", type=int, nargs="*", default=None,
                            help="layers for the per-query-position view (default: the layer of the top head)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --out (refused without it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_device_args(parser)


def legacy_run_study(args: argparse.Namespace, study: Callable[..., dict], summary: Callable[[dict], str] = lambda t: "") -> int:
    """The steps every study command shares: seed, load the model, run `study(model, label)`,
    print its summary, and say what was written and how long it took."""
    from clip_lens.report import add_to_manifest

    torch.manual_seed(args.seed)
    model, label = legacy_load_model(args.model, args.pretrained, args.dtype, args.device)
    start = time.perf_counter()
    tables = study(model, label)
    add_to_manifest(args.out, command=["clip-lens", *args.argv], seed=args.seed, dtype=args.dtype, device=args.device,
                    seconds=round(time.perf_counter() - start, 1))
    lines = summary(tables)
    if lines:
        print(lines)
    print(f"wrote {args.out}/report.html and {len(tables)} tables in {time.perf_counter() - start:.1f}s")
    return 0


def load_captioner(source: str, model, seed: int = 0):
    """--captioner: "random" (an untrained prefix captioner for this CLIP), the shipped
    clip_lens/tiny-shapes-captioner, a prefix captioner's file or a Hugging Face directory."""
    from clip_lens.captioning import load_captioner as load
    from clip_lens.captioning.train import random_captioner

    if source == "random":
        return random_captioner(model.vision.cfg.d_embed, seed).to(model.device)
    return load(source, device=model.device)
