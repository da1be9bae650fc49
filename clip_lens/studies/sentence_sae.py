"""Study "sentence-sae": a sparse autoencoder on the text tower, trained on sentences (VALSE
captions and foils, CANNOT sentences), and the latents that separate negated sentences from plain
ones (docs/methods.md#negated-sentence, docs/methods.md#latents-that-separate-two-groups).

`data` is a frame of sentences with a `negated` column (`clip_lens.data.sentences.negation_sentences`).
The activations of every position up to EOT go to an activation store (under the run's
checkpoints, so a killed run resumes its fill and its training), the SAE trains from the store,
and every sentence is scored by each latent's largest activation over its positions.

    from clip_lens.data.sentences import negation_sentences
    from clip_lens.studies import Target, run_study, sentence_sae
    run_study(sentence_sae.STUDY, model, negation_sentences(valse=[...], cannot=[...]),
              sentence_sae.Options(latents=1024, k=32), Target("out/"), model_label="ViT-B-32 openai")
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import plotly.express as px

from clip_lens.plot import style
from clip_lens.report import Report
from clip_lens.sae import ARCHITECTURES, ActivationStore, fill_store, train_sae
from clip_lens.sae.evaluation import evaluate_reconstruction
from clip_lens.sae.separation import input_scores, separating_latents
from clip_lens.studies.options import OptionError, StudyOptions, option
from clip_lens.studies.runner import Study, Tables


@dataclass(frozen=True, kw_only=True)
class Options(StudyOptions):
    layer: int = option(-1, "text block whose output (hook_resid_post) the SAE reads; negative counts from the last")
    architecture: str = option("topk", "SAE architecture", choices=tuple(ARCHITECTURES))
    latents: int = option(256, "SAE latents", minimum=1)
    k: int = option(16, "active latents per vector (topk, batchtopk)", minimum=1)
    steps: int = option(2000, "training steps", minimum=1)
    batch_size: int = option(512, "vectors per training step", minimum=1)
    seed: int = option(0, "seed of the SAE and of its batches", minimum=0)
    limit: Optional[int] = option(None, "use the first N sentences only", minimum=2)
    top: int = option(20, "latents listed, by how well they separate negated from plain sentences", minimum=1)
    examples: int = option(3, "top sentences shown per listed latent", minimum=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        default_k = type(self).__dataclass_fields__["k"].default
        if self.architecture not in ("topk", "batchtopk") and self.k != default_k:
            raise OptionError(f"k={self.k}: a {self.architecture} SAE has no k (its sparsity comes from its loss); "
                              "leave k out or use architecture 'topk' or 'batchtopk'")


def hook_of(model, options: Options) -> str:
    """The text hook the SAE reads, the layer checked against the tower."""
    n_layers = model.text.cfg.n_layers
    if not -n_layers <= options.layer < n_layers:
        raise ValueError(f"layer={options.layer}: the text tower has blocks 0..{n_layers - 1} (or -{n_layers}..-1)")
    return f"text.blocks.{options.layer % n_layers}.hook_resid_post"


def compute(model, data: pd.DataFrame, options: Options, *, checkpoints=None, progress: bool = True) -> Tables:
    """sentences (sentence, source, negated), evaluation (the SAE's evaluation table on the
    sentences), separation (every latent by |AUC - 0.5|), examples (each listed latent's top sentences)."""
    if not isinstance(data, pd.DataFrame) or not {"sentence", "negated"} <= set(data.columns):
        raise TypeError("the sentence-sae study takes a frame of sentences with a negated column "
                        "(clip_lens.data.sentences.negation_sentences)")
    sentences = data.head(options.limit).reset_index(drop=True) if options.limit else data.reset_index(drop=True)
    if sentences["negated"].nunique() < 2:
        which = "negated" if bool(sentences["negated"].iloc[0]) else "plain"
        raise ValueError(f"all {len(sentences)} sentences are {which}: the study compares negated with plain sentences")
    texts, hook = list(sentences["sentence"]), hook_of(model, options)
    folder = checkpoints.folder if checkpoints is not None and checkpoints.folder is not None else None
    with ExitStack() as stack:
        work = Path(folder) if folder is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        fill_store(model, texts, hook, work / "store", positions="all", progress=progress)
        sae, _ = train_sae(ActivationStore(work / "store"), options.latents,
                           options.k if options.architecture in ("topk", "batchtopk") else None,
                           architecture=options.architecture, steps=options.steps, batch_size=options.batch_size,
                           seed=options.seed, checkpoint_dir=work / "sae", progress=progress, hook=hook)
    tokens = model.to_tokens(texts)
    scores = input_scores(model, sae, tokens)
    separation = separating_latents(scores, sentences["negated"])
    return {"sentences": sentences, "evaluation": evaluate_reconstruction(model, sae, tokens),
            "separation": separation, "examples": top_sentences(scores, sentences, separation, options)}


def top_sentences(scores, sentences: pd.DataFrame, separation: pd.DataFrame, options: Options) -> pd.DataFrame:
    """The `examples` highest-scoring sentences of each of the `top` listed latents."""
    rows = []
    for latent in separation["latent"].head(options.top):
        column = scores[:, int(latent)]
        for rank, index in enumerate(column.argsort(descending=True)[: options.examples].tolist()):
            rows.append({"latent": int(latent), "rank": rank + 1, "score": float(column[index]),
                         "sentence": sentences["sentence"].iloc[index], "negated": bool(sentences["negated"].iloc[index])})
    return pd.DataFrame(rows, columns=["latent", "rank", "score", "sentence", "negated"])


def report(tables: Tables, options: Options) -> Report:
    out = Report("A sparse autoencoder on the text tower: negated against plain sentences")
    sentences, evaluation = tables["sentences"], tables["evaluation"].iloc[0]
    out.section("The SAE").text(
        f"A {evaluation['architecture']} SAE with {int(evaluation['n_latents'])} latents on {evaluation['hook']}, trained "
        f"{options.steps} steps on every position of {len(sentences)} sentences ({int(sentences['negated'].sum())} "
        f"negated). Explained variance {evaluation['explained_variance']:.3f}, {evaluation['l0']:.1f} latents active "
        f"per vector, {evaluation['dead_fraction']:.1%} dead.")
    out.table(tables["evaluation"], caption="Evaluation on the sentences (no image set: S and accuracy are not measured)")
    top = tables["separation"].head(options.top)
    out.section("Latents that separate negated from plain sentences").text(
        "Each sentence's score for a latent is its largest activation over the sentence; AUC 1 means the latent "
        "scores every negated sentence above every plain one, 0 the reverse, 0.5 no separation.")
    fig = px.bar(top.assign(latent=top["latent"].astype(str)), x="latent", y="auc", color="fires_in_group",
                 labels=dict(auc="AUC (negated against plain)", fires_in_group="fires on negated"))
    fig.add_hline(y=0.5, line_dash="dot")
    out.figure(style(fig, "The most separating latents", height=360))
    out.table(top, caption="Latents by |AUC - 0.5|")
    out.table(tables["examples"], caption="Their top sentences")
    return out


STUDY = Study("sentence-sae", Options, compute, report,
              data="a frame of sentences with a negated column (clip_lens.data.sentences.negation_sentences)")
