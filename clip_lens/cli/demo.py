"""`clip-lens demo`: the shipped tiny CLIP on held-out synthetic scenes, every study."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clip_lens.cli.common import _add_device_args, load_captioner
from clip_lens.model import DTYPES


def cmd_demo(args: argparse.Namespace) -> int:
    """The shipped tiny CLIP on held-out synthetic scenes: every negation study and image ablation
    (out/report.html), attention cancellation (out/attention_cancellation/) and attribution
    (out/attribution/) on one-shape scenes, and the negation circuit of the text tower (out/circuit/)."""
    import clip_lens
    from clip_lens import tiny, zoo
    from clip_lens.data.shapes import export_valse, single_shape_set
    from clip_lens.studies import attention_cancellation as vision_study
    from clip_lens.studies import attribution as attribution_study
    from clip_lens.studies import circuit as circuit_study
    from clip_lens.studies import negation as negation_study

    start = time.perf_counter()
    model = clip_lens.HookedCLIP.from_pretrained(tiny.NAME, device=args.device, dtype=DTYPES[args.dtype])
    accuracy = tiny.evaluate(model)
    line = (f"Held-out accuracy of {tiny.NAME} ({accuracy['pairs']} synthetic existence pairs, seed {tiny.EVAL_SEED}): "
            f"{accuracy['accuracy']:.1%} overall, {accuracy['negation_in_caption']:.1%} with the negation in the "
            f"caption, {accuracy['negation_in_foil']:.1%} in the foil.")
    print(line)
    scenes = export_valse(args.out / "scenes", args.scenes, seed=args.seed)
    tables = negation_study.valse_existence(
        model, f"{tiny.NAME} (a tiny CLIP trained on synthetic shape scenes, shipped with clip_lens)", scenes,
        args.out / "scenes" / "images", args.out, preface=[line], overwrite=True, progress=not args.quiet)
    loc = tables["causal_tracing_localisation"]
    correct = loc[loc["segment"] == "correct"].groupby("layer")["localisation"].max()
    print(tables["accuracy"].to_string(index=False))
    print("causal-tracing localisation of the correct segment by layer: "
          + ", ".join(f"{layer}: {value:.3f}" for layer, value in correct.items()))
    images, captions = single_shape_set(args.out / "single_shapes" / "images")
    cancel = vision_study.attention_cancellation_study(
        model, f"{tiny.NAME}", args.out / "attention_cancellation", images=images, captions=captions,
        captioner=load_captioner(zoo.CAPTIONER_NAME, model), overwrite=True, progress=not args.quiet)
    table = cancel["summary"].set_index("setting")
    print(f"attention cancellation on one-shape scenes: baseline accuracy {table.loc['baseline', 'accuracy']:.3f}; "
          f"generated captions' mean cosine {table.loc['baseline', 'mean_generated_cosine']:.3f} at baseline, "
          + ", ".join(f"{setting} {value:.3f}" for setting, value in table["mean_generated_cosine"].iloc[1:].items())
          + f" with attention cancelled; report {args.out}/attention_cancellation/report.html")
    attr = attribution_study.attribution_study(
        model, f"{tiny.NAME}", args.out / "attribution", images=images, captions=captions,
        concept_template="There is a {}.", sae_latents=64, sae_k=4, ks=(0, 1, 2, 4, 8), overwrite=True,
        progress=not args.quiet)
    areas = attr["deletion_areas"].set_index("method")["area"]
    print("attribution on one-shape scenes, area under the deletion curves (smaller = more faithful): "
          + ", ".join(f"{method} {area:.3f}" for method, area in areas.items())
          + f"; report {args.out}/attribution/report.html")
    circuit = circuit_study.circuit_study(
        model, f"{tiny.NAME}", args.out / "circuit", circuit_study.negation_scenes(model, n=64, seed=args.seed),
        overwrite=True, progress=not args.quiet)["summary"].iloc[0]
    print(f"negation circuit in the text tower: {circuit['circuit_edges']} of {circuit['edges']} edges carry "
          f"{circuit['circuit_faithfulness']:.0%} of the negated-vs-plain difference (random circuits of that size "
          f"{circuit['random_faithfulness']:.0%}); report {args.out}/circuit/report.html")
    print(f"wrote {args.out}/report.html in {time.perf_counter() - start:.1f}s")
    return 0


def register(sub) -> None:
    demo = sub.add_parser("demo", help="the shipped tiny CLIP on synthetic scenes: negation studies and a report")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    demo.add_argument("--scenes", type=int, default=400, help="held-out scenes to study (default 400)")
    demo.add_argument("--seed", type=int, default=20_000, help="seed of the scenes")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_device_args(demo)
    demo.set_defaults(func=cmd_demo)
