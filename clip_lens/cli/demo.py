"""`clip-lens demo`: the shipped tiny CLIP on held-out synthetic scenes, every study, through the
same runner as every other command (`clip_lens.studies.run_study`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clip_lens.cli.common import add_device_flags


class Demo:
    """One demo run: the model, where it writes, and how each study is run into a sub-folder."""

    def __init__(self, args: argparse.Namespace):
        from clip_lens import zoo
        from clip_lens.model_sources import ModelSource, load_model

        self.args = args
        source = ModelSource(zoo.NAME, dtype=args.dtype, device=args.device)
        self.model, self.label = load_model(source), source.label()

    def run(self, name: str, folder: str, data, options, sources: dict, setup: tuple = ()) -> dict:
        from clip_lens import studies

        target = studies.Target(self.args.out / folder, overwrite=True, progress=not self.args.quiet, setup=setup)
        return studies.run_study(studies.get(name), self.model, data, options, target, model_label=self.label,
                                 sources=sources)


def negation(demo: Demo) -> None:
    """Every negation study and image ablation on held-out scenes in VALSE's format (out/report.html)."""
    from clip_lens import studies, tiny
    from clip_lens.data.shapes import export_valse
    from clip_lens.studies.valse_existence import ValseExistence

    accuracy = tiny.evaluate(demo.model)
    line = (f"Held-out accuracy of {tiny.NAME} ({accuracy['pairs']} synthetic existence pairs, seed {tiny.EVAL_SEED}): "
            f"{accuracy['accuracy']:.1%} overall, {accuracy['negation_in_caption']:.1%} with the negation in the "
            f"caption, {accuracy['negation_in_foil']:.1%} in the foil.")
    print(line)
    scenes = export_valse(demo.args.out / "scenes", demo.args.scenes, seed=demo.args.seed)
    data = ValseExistence(scenes, scenes.parent / "images")
    tables = demo.run("valse-existence", ".", data, studies.get("valse-existence").Options(),
                      {"valse": scenes, "images": scenes.parent / "images"}, setup=(line,))
    loc = tables["causal_tracing_localisation"]
    correct = loc[loc["segment"] == "correct"].groupby("layer")["localisation"].max()
    print(tables["accuracy"].to_string(index=False))
    print("causal-tracing localisation of the correct segment by layer: "
          + ", ".join(f"{layer}: {value:.3f}" for layer, value in correct.items())
          + " (spread of CTE over the 5 positions from the negator; 0.400 = all of d on one position)")


def vision(demo: Demo, images: Path, captions: Path) -> None:
    """Attention cancellation with generated captions on one-shape scenes (out/attention_cancellation/)."""
    from clip_lens import studies, zoo
    from clip_lens.data.image_sets import open_image_set

    image_set = open_image_set(images, captions, None, demo.args.out / "sample_images")
    options = studies.get("attention-cancellation").Options(captioner=zoo.CAPTIONER_NAME)
    table = demo.run("attention-cancellation", "attention_cancellation", image_set, options,
                     {"images": images, "captions": captions})["summary"].set_index("setting")
    print(f"attention cancellation on one-shape scenes: baseline accuracy {table.loc['baseline', 'accuracy']:.3f}; "
          f"generated captions' mean cosine {table.loc['baseline', 'mean_generated_cosine']:.3f} at baseline, "
          + ", ".join(f"{setting} {value:.3f}" for setting, value in table["mean_generated_cosine"].iloc[1:].items())
          + f" with attention cancelled; report {demo.args.out}/attention_cancellation/report.html")


def attribution(demo: Demo, images: Path, captions: Path) -> None:
    """Attribution to heads, neurons and SAE latents on one-shape scenes (out/attribution/)."""
    from clip_lens import studies
    from clip_lens.data.image_sets import open_image_set
    from clip_lens.sae import write_browser
    from clip_lens.studies.attribution import BROWSER_PAGE, TINY_CLIP, AttributionData

    image_set = open_image_set(images, captions, None, demo.args.out / "sample_images")
    options = studies.get("attribution").Options(**TINY_CLIP)
    pages: list = []  # the latent browser's data: the report links each relied-on latent to its page
    areas = demo.run("attribution", "attribution", AttributionData(image_set, on_browser_data=pages.append), options,
                     {"images": images, "captions": captions})["deletion_areas"].set_index("method")["area"]
    if pages:
        write_browser(pages[-1], demo.args.out / "attribution" / BROWSER_PAGE, title="SAE latents of the attribution demo")
    print("attribution on one-shape scenes, area under the deletion curves (smaller = more faithful): "
          + ", ".join(f"{method} {area:.3f}" for method, area in areas.items())
          + f"; report {demo.args.out}/attribution/report.html, latents {demo.args.out}/attribution/{BROWSER_PAGE}")


def circuit(demo: Demo) -> None:
    """The negation circuit of the text tower on held-out scenes (out/circuit/)."""
    from clip_lens import studies
    from clip_lens.studies.circuit import negation_scenes

    task = negation_scenes(demo.model, n=64, seed=demo.args.seed)
    task.model_label = demo.label
    row = demo.run("circuit", "circuit", task, studies.get("circuit").Options(),
                   {"scenes": 64, "seed": demo.args.seed})["summary"].iloc[0]
    print(f"negation circuit in the text tower: {row['circuit_edges']} of {row['edges']} edges carry "
          f"{row['circuit_faithfulness']:.0%} of the negated-vs-plain difference (random circuits of that size "
          f"{row['random_faithfulness']:.0%}); report {demo.args.out}/circuit/report.html")


def cmd_demo(args: argparse.Namespace) -> int:
    """The shipped tiny CLIP on held-out synthetic scenes: every negation study and image ablation
    (out/report.html), attention cancellation (out/attention_cancellation/) and attribution
    (out/attribution/) on one-shape scenes, and the negation circuit of the text tower (out/circuit/)."""
    from clip_lens.data.shapes import single_shape_set

    start = time.perf_counter()
    demo = Demo(args)
    negation(demo)
    images, captions = single_shape_set(args.out / "single_shapes" / "images")
    vision(demo, images, captions)
    attribution(demo, images, captions)
    circuit(demo)
    print(f"wrote {args.out}/report.html in {time.perf_counter() - start:.1f}s")
    return 0


def register(sub) -> None:
    demo = sub.add_parser("demo", help="the shipped tiny CLIP on synthetic scenes: negation studies and a report")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    demo.add_argument("--scenes", type=int, default=400, help="held-out scenes to study (default 400)")
    demo.add_argument("--seed", type=int, default=20_000, help="seed of the scenes")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_flags(demo)
    demo.set_defaults(func=cmd_demo)
