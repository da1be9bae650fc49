"""`clip-lens valse-existence`, `clip-lens cannot`, `clip-lens negation-followups` and `clip-lens
sentence-sae`: the negation studies (`clip_lens.studies.valse_existence`, `cannot`,
`negation_followups`, `sentence_sae`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_lens.cli.common import run_command, study_parser

STUDY_CHOICES = ["causal-tracing", "negator-attention", "preliminary", "image-ablation", "text", "all"]


def chosen_studies(choice: str) -> tuple[str, ...]:
    """The parts the positional study choice runs: one part, 'text' (the three text-tower parts) or 'all'."""
    from clip_lens.studies import valse_existence

    return {"all": valse_existence.VALSE_STUDIES, "text": valse_existence.TEXT_STUDIES}.get(choice, (choice,))


def cmd_valse_existence(args: argparse.Namespace) -> int:
    from clip_lens.studies import valse_existence

    def make_data(model, options) -> tuple:
        return valse_existence.ValseExistence(args.valse, args.images), {"valse": args.valse, "images": args.images}

    def summary(tables: dict) -> str:
        return (f"{tables['accuracy'].to_string(index=False)}\n"
                f"{len(tables['instances'])} instances, {len(tables['excluded'])} excluded")

    return run_command(args, valse_existence.STUDY, make_data, summary, studies=chosen_studies(args.study))


def cmd_cannot(args: argparse.Namespace) -> int:
    from clip_lens.data import load_cannot
    from clip_lens.studies import cannot

    def summary(tables: dict) -> str:
        return f"{tables['selection'].to_string(index=False)}\n{tables['negator_heads'].head(5).to_string(index=False)}"

    return run_command(args, cannot.STUDY, lambda model, options: (load_cannot(args.cannot), {"cannot": args.cannot}),
                       summary)


def cmd_negation_followups(args: argparse.Namespace) -> int:
    from clip_lens.studies import negation_followups

    def summary(tables: dict) -> str:
        best = tables["probes"].sort_values("test_accuracy", ascending=False).head(3)
        return (f"best probe cells:\n{best[['layer', 'position', 'test_accuracy', 'control_accuracy']].to_string(index=False)}"
                f"\n{tables['baselines'].to_string(index=False)}\nR² of all covariates together: "
                f"{float(tables['r2'].set_index('term').loc['all', 'r2']):.3f}")

    return run_command(args, negation_followups.STUDY, lambda model, options: (None, {}), summary)


def cmd_sentence_sae(args: argparse.Namespace) -> int:
    from clip_lens.data.sentences import negation_sentences
    from clip_lens.studies import sentence_sae

    def make_data(model, options) -> tuple:
        return (negation_sentences(valse=args.valse, cannot=args.cannot),
                {"valse": [str(p) for p in args.valse], "cannot": [str(p) for p in args.cannot]})

    def summary(tables: dict) -> str:
        columns = ["latent", "auc", "fires_in_group", "fires_outside"]
        evaluation = tables["evaluation"][["hook", "explained_variance", "l0", "dead_fraction"]]
        separation = tables["separation"][columns].head(5)
        return "\n".join([evaluation.to_string(index=False), "latents separating negated from plain sentences:",
                          separation.to_string(index=False)])

    return run_command(args, sentence_sae.STUDY, make_data, summary)


def register(sub) -> None:
    from clip_lens.studies import cannot, negation_followups, sentence_sae, valse_existence

    valse = study_parser(sub, "valse-existence", valse_existence.STUDY, "negation studies on VALSE existence")
    valse.add_argument("study", choices=STUDY_CHOICES,
                       help="one study, 'text' (the three text-encoder studies) or 'all' (with image ablation)")
    valse.add_argument("--valse", required=True, type=Path, help="VALSE existence.json")
    valse.add_argument("--images", required=True, type=Path, help="folder with the instances' image files")
    valse.set_defaults(func=cmd_valse_existence)

    parser = study_parser(sub, "cannot", cannot.STUDY, "negation studies on CANNOT")
    parser.add_argument("study", choices=["negator-attention"])
    parser.add_argument("--cannot", required=True, nargs="+", type=Path,
                        help="CANNOT .tsv files (premise/hypothesis/label or sentence/negated) or folders of them")
    parser.set_defaults(func=cmd_cannot)

    study_parser(sub, "negation-followups", negation_followups.STUDY,
                 "follow-up experiments on synthetic scenes: probes by layer and slot, a subject-removed image "
                 "baseline, a joint covariate fit").set_defaults(func=cmd_negation_followups)

    parser = study_parser(sub, "sentence-sae", sentence_sae.STUDY,
                          "an SAE on the text tower over VALSE and CANNOT sentences, and its negation latents")
    parser.add_argument("--valse", nargs="*", default=[], type=Path, help="VALSE piece files (captions and foils)")
    parser.add_argument("--cannot", nargs="*", default=[], type=Path, help="CANNOT .tsv files or folders of them")
    parser.set_defaults(func=cmd_sentence_sae)
