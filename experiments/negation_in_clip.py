"""Reproduces the thesis and paper on how CLIP's text encoder processes negation: accuracy and
segments on VALSE existence, causal tracing in the text encoder (CTE by layer and aligned position,
localisation), negator-selective attention heads on VALSE and on CANNOT, the preliminary analyses
(sequence length, caption-foil similarity, subject size), image ablation in the vision encoder,
and, beyond the source, the dataset covariates it names as open (subject size x caption length) and
the follow-up experiments it names (`negation-followups`): probes by layer and slot, joint
restorations of two positions and their interaction, severed causal tracing, image ablation over
windows of layers and against a subject-removed image, and a joint fit of image and caption covariates.

    python experiments/negation_in_clip.py --model clip_lens/tiny-shapes --out runs/negation_in_clip
    python experiments/negation_in_clip.py --model ViT-B-32 --pretrained openai \\
        --valse ../shared/data/valse/existence.json --images /data/visual7w \\
        --cannot ../shared/data/cannot-sources --out runs/negation_in_clip

Without --valse the VALSE-format pairs are held-out synthetic scenes (written to out/scenes), which
the tiny CLIP was not trained on. Every output and the result of the source it reproduces are
listed in out/README.md (REPRODUCES below). negation_in_clip.toml runs it over models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from clip_lens import studies, zoo
from clip_lens.cli.common import add_model_flags, add_output_flags, model_from_args
from clip_lens.data import load_cannot
from clip_lens.data.shapes import export_valse
from clip_lens.report import write_index

V, C, K, F = "valse_existence", "cannot", "covariates", "followups"
REPRODUCES = [
    (f"{V}/accuracy.csv", "accuracy and the correct / ambiguous / incorrect segments, by where the negation is"),
    (f"{V}/excluded.csv", "the instances excluded by the rephrasing, with the reason"),
    (f"{V}/causal_tracing_segment_means.csv", "the causal-tracing heatmaps: mean CTE by layer and aligned position, "
                                              "per segment and placement of the negation"),
    (f"{V}/causal_tracing_localisation.csv", "the localisation bars: spread of CTE over the positions from the "
                                             "negator on, by layer"),
    (f"{V}/causal_tracing_instances.csv", "the per-instance CTE array (instances x layers x 8 aligned positions)"),
    (f"{V}/negator_heads.csv", "a^N of every head on VALSE existence (the negator-selective heads)"),
    (f"{V}/negator_query_positions.csv", "where the top heads move the negation to: mean diff per query position"),
    (f"{V}/preliminary_correlations.csv", "the correlation table of d with sequence length, caption-foil similarity "
                                          "and subject size"),
    (f"{V}/image_ablation_mha_vs_mlp.csv", "mean IAE of MHA against MLP per vision layer and on average"),
    (f"{V}/image_ablation_outcomes.csv", "the stacked bars: instances made worse or better, ending correct or not"),
    (f"{V}/report.html", "every figure of the above"),
    (f"{C}/negator_heads.csv", "a^N of every head on CANNOT 'no'-determiner sentences (the validation of the heads)"),
    (f"{C}/selection.csv", "how the CANNOT sentences were selected (dependency parse)"),
    (f"{K}/grid.csv", "beyond the source: accuracy and mean d by subject size x caption length"),
    (f"{K}/effects.csv", "beyond the source: the fitted effect of each covariate on d"),
    (f"{F}/probes.csv", "follow-up, 'is negation linearly readable where causal tracing localises it?': probe "
                        "accuracy per layer and aligned slot, with its control task"),
    (f"{F}/interactions.csv", "follow-up, 'do two positions carry the negation together?': joint restorations of "
                              "two positions against each alone, and their interaction, per layer"),
    (f"{F}/severed.csv", "follow-up, 'does the effect reach the score through later attention or later MLPs?': "
                         "severed causal tracing at the negator and EOT"),
    (f"{F}/windows.csv", "follow-up, 'what do consecutive vision layers do together?': image ablation of windows "
                         "of blocks"),
    (f"{F}/baselines.csv", "follow-up, 'does ablation improve classification because the mean-colour image is off "
                           "distribution?': improvement rates against the mean-colour and subject-removed baselines"),
    (f"{F}/image_tracing.csv", "follow-up, 'where in the vision tower does the subject's effect on d live?': "
                               "causal tracing against the subject-removed image, restored share per layer and region"),
    (f"{F}/coefficients.csv", "follow-up, 'what predicts d when image and caption features are fitted together?': "
                              "coefficients with 95% intervals"),
    (f"{F}/r2.csv", "follow-up: R² of each covariate alone and of all together"),
]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(parser, default_model=zoo.NAME)
    add_output_flags(parser, default_out=Path("runs/negation_in_clip"))
    parser.add_argument("--valse", type=Path, default=None, help="VALSE existence.json (default: synthetic scenes)")
    parser.add_argument("--images", type=Path, default=None, help="with --valse: the folder of its image files")
    parser.add_argument("--scenes", type=int, default=400, help="without --valse: held-out synthetic scenes")
    parser.add_argument("--cannot", type=Path, nargs="*", default=[], help="CANNOT .tsv files or folders (none: skipped)")
    parser.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline for CANNOT's parse")
    parser.add_argument("--limit", type=int, default=None, help="use the first N instances of each dataset")
    parser.add_argument("--covariate-scenes", type=int, default=100, help="scenes per subject size (0: skip)")
    parser.add_argument("--followup-scenes", type=int, default=studies.get("negation-followups").Options().scenes,
                        help="synthetic scenes for the follow-up experiments (0: skip; default: the study's)")
    return parser.parse_args(argv)


def valse_data(args: argparse.Namespace):
    """(the VALSE existence data, its sources): the given file and folder, or exported scenes."""
    from clip_lens.studies.valse_existence import ValseExistence

    if args.valse is None:
        valse = export_valse(args.out / "scenes", args.scenes, seed=20_000)
        return ValseExistence(valse, valse.parent / "images"), {"valse": valse, "images": valse.parent / "images"}
    if args.images is None:
        raise ValueError("--valse needs --images (the folder with the instances' image files)")
    return ValseExistence(args.valse, args.images), {"valse": args.valse, "images": args.images}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    model, label = model_from_args(args)

    def run(name: str, folder: str, data, options, sources: dict) -> dict:
        target = studies.Target(args.out / folder, args.overwrite, not args.quiet)
        return studies.run_study(studies.get(name), model, data, options, target, model_label=label, sources=sources)

    data, sources = valse_data(args)
    tables = run("valse-existence", V, data, studies.get("valse-existence").Options(limit=args.limit), sources)
    print(tables["accuracy"].to_string(index=False))
    if args.cannot:
        options = studies.get("cannot").Options(spacy_model=args.spacy_model, limit=args.limit)
        run("cannot", C, load_cannot(args.cannot), options, {"cannot": args.cannot})
    if args.covariate_scenes:
        run("covariates", K, None, studies.get("covariates").Options(scenes=args.covariate_scenes), {})
    if args.followup_scenes:
        run("negation-followups", F, None, studies.get("negation-followups").Options(scenes=args.followup_scenes), {})
    write_index(args.out, f"Negation in the text encoder of {label}", REPRODUCES)
    print(f"wrote {args.out}/README.md (what each output reproduces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
