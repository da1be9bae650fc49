"""`clip-lens circuit`."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_lens.cli.common import _add_model_args
from clip_lens.cli.common import legacy_run_study as run_study


def cmd_circuit(args: argparse.Namespace) -> int:
    from clip_lens.data.image_sets import open_image_set
    from clip_lens.studies import circuit as circuit_study

    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: EAP-IG needs m >= 1 interpolation steps")
    for option in ("check", "pair_chunk", "random"):
        if getattr(args, option) < (0 if option == "random" else 1):
            raise ValueError(f"--{option.replace('_', '-')} {getattr(args, option)}: give a positive number")

    def study(model, label: str) -> dict:
        if args.tower == "text" and args.pairs is not None:
            task = circuit_study.text_pairs_from_file(model, args.pairs, args.images, limit=args.limit)
        elif args.tower == "text" and args.valse is not None:
            if args.images is None:
                raise ValueError("--valse needs --images (the folder with the instances' image files)")
            task = circuit_study.negation_valse(model, args.valse, args.images, limit=args.limit, progress=not args.quiet)
        elif args.tower == "text":
            task = circuit_study.negation_scenes(model, n=args.scenes, seed=args.scene_seed)
        else:
            images = open_image_set(args.images, args.captions, args.labels, args.out / "sample_images")
            labelled = images.targets >= 0
            if not labelled.any():
                raise ValueError(f"no image in {images.source} has a label naming one of the captions")
            frame = images.frame[labelled].head(args.limit) if args.limit else images.frame[labelled]
            captions = [images.captions[t] for t in images.targets[labelled][: len(frame)]]
            task = circuit_study.images_against_mean_colour(model, list(frame["image"]), captions, args.corrupt)
        return circuit_study.circuit_study(
            model, label, args.out, task, steps=args.steps, path=args.path, check=args.check, sizes=args.sizes,
            n_random=args.random, selection=args.selection, signed=args.signed, pair_chunk=args.pair_chunk,
            seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)

    def summary(tables: dict) -> str:
        row = tables["summary"].iloc[0]
        agreement = tables["agreement"].to_string(index=False, float_format=lambda v: f"{v:.3f}")
        return (f"circuit: {row['circuit_edges']} of {row['edges']:,} edges, faithfulness "
                f"{row['circuit_faithfulness']:.3f} (random circuits of its size: {row['random_faithfulness']:.3f})\n"
                f"against exact edge patching:\n{agreement}")

    return run_study(args, study, summary)


def register(sub) -> None:
    circuit = sub.add_parser("circuit", help="circuits in one tower: EAP / EAP-IG edge scores, exact edge patching, "
                                             "faithfulness curves and the circuit drawn")
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
    circuit.add_argument("--steps", type=int, default=5, help="EAP-IG's interpolation steps m (default 5)")
    circuit.add_argument("--path", choices=["inputs", "activations"], default="inputs",
                         help="EAP-IG's path: along the input, or along each sender group's output")
    circuit.add_argument("--check", type=int, default=50,
                         help="top edges of each method checked against exact edge patching (default 50)")
    circuit.add_argument("--sizes", type=int, nargs="+", default=None,
                         help="circuit sizes of the faithfulness curve (default 1, 2, 5, 10, ... every edge)")
    circuit.add_argument("--random", type=int, default=5, help="random circuits per size (default 5)")
    circuit.add_argument("--selection", choices=["paths", "greedy", "top"], default="paths",
                         help="how circuits are chosen from the scores (default: strongest input-to-output paths)")
    circuit.add_argument("--signed", action="store_true",
                         help="rank edges by the part of their score that moves the metric towards the corrupted run")
    circuit.add_argument("--pair-chunk", type=int, default=32, help="pairs per forward pass (default 32)")
    _add_model_args(circuit, instances=False)
    circuit.set_defaults(func=cmd_circuit)
