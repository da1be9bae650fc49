"""`clip-lens circuit`: the study "circuit" (`clip_lens.studies.circuit`) on a task the data flags
choose (text: synthetic scenes, VALSE existence or a pairs file; vision: images against their mean
colour or a folder of corrupted images)."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_lens.cli.common import model_source, run_command, study_parser


def circuit_task(args: argparse.Namespace, model):
    """The `CircuitTask` the data flags name, for `model`."""
    from clip_lens.studies import circuit

    if args.tower == "text" and args.pairs is not None:
        return circuit.text_pairs_from_file(model, args.pairs, args.images, limit=args.limit)
    if args.tower == "text" and args.valse is not None:
        if args.images is None:
            raise ValueError("--valse needs --images (the folder with the instances' image files)")
        return circuit.negation_valse(model, args.valse, args.images, limit=args.limit, progress=not args.quiet)
    if args.tower == "text":
        return circuit.negation_scenes(model, n=args.scenes, seed=args.scene_seed)
    return _vision_task(args, model)


def _vision_task(args: argparse.Namespace, model):
    from clip_lens.data.image_sets import open_image_set
    from clip_lens.studies import circuit

    images = open_image_set(args.images, args.captions, args.labels, args.out / "sample_images")
    labelled = images.targets >= 0
    if not labelled.any():
        raise ValueError(f"no image in {images.source} has a label naming one of the captions")
    frame = images.frame[labelled].head(args.limit) if args.limit else images.frame[labelled]
    captions = [images.captions[t] for t in images.targets[labelled][: len(frame)]]
    return circuit.images_against_mean_colour(model, list(frame["image"]), captions, args.corrupt)


DATA_FLAGS = ("tower", "valse", "pairs", "corrupt", "images", "captions", "labels", "scenes", "scene_seed", "limit")


def cmd_circuit(args: argparse.Namespace) -> int:
    from clip_lens.studies import circuit

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: give a number of instances >= 1")

    def make_data(model, options):
        task = circuit_task(args, model)
        task.model_label = model_source(args).label()  # the summary table names the model as the manifest does
        return task, {flag: getattr(args, flag) for flag in DATA_FLAGS if getattr(args, flag) is not None}

    def summary(tables: dict) -> str:
        row = tables["summary"].iloc[0]
        agreement = tables["agreement"].to_string(index=False, float_format=lambda v: f"{v:.3f}")
        return (f"circuit: {row['circuit_edges']} of {row['edges']:,} edges, faithfulness "
                f"{row['circuit_faithfulness']:.3f} (random circuits of its size: {row['random_faithfulness']:.3f})\n"
                f"against exact edge patching:\n{agreement}")

    return run_command(args, circuit.STUDY, make_data, summary)


def register(sub) -> None:
    from clip_lens.studies import circuit as study

    circuit = study_parser(sub, "circuit", study.STUDY, "circuits in one tower: EAP / EAP-IG edge scores, exact edge "
                                                        "patching, faithfulness curves and the circuit drawn")
    circuit.add_argument("tower", choices=["text", "vision"],
                         help="text: negated against non-negated sentences; vision: images against their mean colour")
    circuit.add_argument("--valse", type=Path, default=None,
                         help="text: VALSE existence.json (default: held-out synthetic scenes)")
    circuit.add_argument("--pairs", type=Path, default=None,
                         help="text: your own minimal pairs, a CSV or JSONL file with columns caption, foil, image "
                              "(the caption is the clean run)")
    circuit.add_argument("--corrupt", type=Path, default=None,
                         help="vision: a folder with a corrupted image of the same file name for each image "
                              "(default: each image's mean colour)")
    circuit.add_argument("--images", type=Path, default=None,
                         help="text with --valse or --pairs: the image folder; vision: an image folder "
                              "(default: scikit-image's sample photos)")
    circuit.add_argument("--captions", type=Path, default=None, help="vision: one 'label<TAB>caption' per line")
    circuit.add_argument("--labels", type=Path, default=None, help="vision: CSV with columns image, label")
    circuit.add_argument("--scenes", type=int, default=64, help="text without --valse: synthetic scenes (default 64)")
    circuit.add_argument("--scene-seed", type=int, default=20_000, help="seed of the synthetic scenes")
    circuit.add_argument("--limit", type=int, default=None, help="use the first N instances only")
    circuit.set_defaults(func=cmd_circuit)
