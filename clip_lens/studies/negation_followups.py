"""Study "negation-followups": follow-up experiments to the negation studies, each answering a
question the causal-tracing and image-ablation results leave open, on synthetic scenes generated from
`seed` (`data` is None):

- Is negation linearly readable where causal tracing localises it? Linear probes at the aligned
  slots of every layer, negated sentence against its non-negated partner
  (docs/methods.md#linear-probes), beside the mean causal-tracing effect of the same cells on the
  same instances, with their rank correlation.
- Do positions carry the negation together? Joint restorations of two positions at once against
  the two made one at a time, per layer: their interaction
  (docs/methods.md#joint-interventions-and-their-interaction).
- Does the effect at a position reach the score through later attention or through later MLPs?
  Severed causal tracing: each restoration repeated with the later MLPs, or the later attention
  layers, held at the corrupted run's values (docs/methods.md#severed-causal-tracing).
- What do several vision layers do together? Image ablation of MHA (or MLP) in windows of `window`
  consecutive blocks at once (docs/methods.md#image-ablation-over-layer-windows).
- Does ablation "improve" classification because the mean-colour baseline takes the model off
  its distribution? Image ablation against the mean-colour image and against the same scene
  rendered without its subject (docs/methods.md#subject-removed-baseline).
- Where in the vision tower does the subject's effect on d live? Causal tracing in the vision
  encoder: the original image's residual restored at one (layer, position) in the run on the
  subject-removed image (docs/methods.md#image-causal-tracing).
- What predicts d once image and caption features are held fixed together? A joint least-squares
  fit of d on brightness, contrast, colourfulness, subject size, caption length and the number of
  objects (docs/methods.md#joint-covariate-fit).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from clip_lens import baselines
from clip_lens.data import shapes
from clip_lens.data.valse import ALIGNED_SLOTS, NEGATOR_POSITION, weighted_slot_mean
from clip_lens.patching import interaction_table
from clip_lens.plot import heatmap_height, layer_axis, style
from clip_lens.probes import PROBE_HOOKS, probe_grid
from clip_lens.report import Report
from clip_lens.severed_tracing import severed_trace
from clip_lens.studies.analyses import causal_tracing, covariates, existence, image_ablation, image_tracing
from clip_lens.studies.options import StudyOptions, option
from clip_lens.studies.runner import Study, Tables

QUESTIONS = {
    "probes": "Is negation linearly readable where causal tracing localises it?",
    "interactions": "Do two positions carry the negation together?",
    "severed": "Does the effect reach the score through later attention or through later MLPs?",
    "windows": "What do consecutive vision layers do together?",
    "baselines": "Does ablation 'improve' classification because the mean-colour baseline is off distribution?",
    "image_tracing": "Where in the vision tower does the subject's effect on d live?",
    "covariates": "Which image and caption features predict d when fitted together?",
}


@dataclass(frozen=True, kw_only=True)
class Options(StudyOptions):
    scenes: int = option(100, "synthetic existence scenes for the probes and the baselines", minimum=8)
    covariate_scenes: int = option(400, "varied synthetic scenes for the joint covariate fit", minimum=10)
    seed: int = option(1, "seed of the scenes and of the probes' split", minimum=0)
    probe_hook: str = option("resid", "the activations probed (resid: the residual at layers 0..L)",
                             choices=tuple(PROBE_HOOKS))
    test_fraction: float = option(0.3, "share of the probe texts held out", minimum=0.1, maximum=0.9)
    window: int = option(2, "consecutive vision blocks ablated together (at most the tower's blocks)", minimum=1)
    severed_pairs: int = option(20, "instances traced with later MLPs or attention severed (one forward run per "
                                    "layer, position and severing: slower than plain tracing)", minimum=1)


def probe_table(model, instances: existence.ExistenceInstances, options: Options) -> pd.DataFrame:
    """Probe test accuracy per (layer, aligned slot): each instance's negated sentence (label 1)
    and its non-negated partner (label 0)."""
    frame = instances.frame
    negated_is_caption = frame["negation_in"] == "caption"
    negated = frame["caption"].where(negated_is_caption, frame["foil"])
    plain = frame["foil"].where(negated_is_caption, frame["caption"])
    texts = list(negated) + list(plain)
    labels = [1] * len(negated) + [0] * len(plain)
    return probe_grid(model, texts, labels, hook=options.probe_hook, positions="aligned",
                      test_fraction=options.test_fraction, seed=options.seed)


def probes_beside_tracing(model, instances: existence.ExistenceInstances, probes: pd.DataFrame,
                          progress: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cells, correlation): each probed (layer, slot) with the mean CTE of causal tracing on the
    same instances, and the Spearman rank correlation of probe accuracy with CTE over the cells."""
    tracing = causal_tracing.run(model, instances, progress=progress)
    means = weighted_slot_mean(tracing.cte, tracing.further_counts)  # [layers, 8]
    cte = pd.DataFrame([(layer, slot, float(means[layer, s])) for layer in range(means.shape[0])
                        for s, slot in enumerate(ALIGNED_SLOTS)], columns=["layer", "position", "cte"])
    cells = probes[["layer", "position", "test_accuracy", "control_accuracy"]].merge(cte, on=["layer", "position"])
    rho = cells["test_accuracy"].corr(cells["cte"], method="spearman")
    return cells, pd.DataFrame({"measure": ["spearman(probe accuracy, mean CTE)"], "value": [rho], "cells": [len(cells)]})


# pairs of aligned slots restored together: every instance has them (its EOT lies beyond NEGATOR_POSITION + 2)
POSITION_GROUPS = {"negator+subject": (NEGATOR_POSITION, NEGATOR_POSITION + 1),
                   "negator+next": (NEGATOR_POSITION, NEGATOR_POSITION + 2),
                   "subject+next": (NEGATOR_POSITION + 1, NEGATOR_POSITION + 2)}


def interaction_shares(model, instances: existence.ExistenceInstances, progress: bool) -> pd.DataFrame:
    """Per layer and group of `POSITION_GROUPS`: the negated sentence's residual restored in the
    non-negated run at both positions (joint), at each alone (summed), and their difference, each
    as a share of d = S(negated) - S(non-negated) summed over the instances."""
    frame = instances.frame
    table = interaction_table(model, target=list(frame["non_negated"]), source=list(frame["negated"]),
                              image=instances.image_emb, groups=list(POSITION_GROUPS.values()), layers="all",
                              progress=progress)
    table["d"] = table["source_baseline"] - table["baseline"]
    sums = table.groupby(["layer", "group"], sort=False)[["joint", "alone", "interaction", "d"]].sum()
    shares = sums[["joint", "alone", "interaction"]].div(sums["d"], axis=0).reset_index()
    names = {group: name for name, group in POSITION_GROUPS.items()}
    return shares.assign(group=shares["group"].map(names)).rename(columns={"group": "positions"})


def severed_table(model, instances: existence.ExistenceInstances, pairs: int) -> pd.DataFrame:
    """Mean severed-tracing effect per severing x layer at the negator and at EOT (and over the
    other positions), on the first `pairs` instances."""
    frame = instances.frame.head(pairs)
    rows = severed_trace(model, target=list(frame["non_negated"]), source=list(frame["negated"]),
                         image=instances.image_emb[: len(frame)])
    eot = model.text.pooled_positions(model.to_tokens(list(frame["non_negated"]))).cpu().numpy()
    slot = np.where(rows["position"] == NEGATOR_POSITION, "negator",
                    np.where(rows["position"] == eot[rows["pair"]], "EOT", "other"))
    means = rows.assign(slot=slot).groupby(["severed", "layer", "slot"], sort=False)["effect"].mean()
    return means.rename("mean_effect").reset_index()


def baseline_tables(model, instances: existence.ExistenceInstances, examples: list,
                    progress: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(baselines, image_tracing): how often ablating MHA or MLP improves an instance against each
    baseline image, and the restored share of the subject's effect per vision layer and region."""
    removed = [baselines.subject_removed(example) for example in examples]
    ablations = {
        "mean colour": image_ablation.run(model, instances, progress=progress),
        "subject removed": image_ablation.run_with_baseline(model, instances, removed, progress=progress),
    }
    tracing = image_tracing.region_shares(image_tracing.run(model, instances, removed, progress=progress))
    return image_ablation.improvement_rates(ablations), tracing


def compute(model, data: None, options: Options, *, checkpoints=None, progress: bool = True) -> Tables:
    """probes (layer x slot accuracies), probes_and_tracing (each cell's accuracy and mean CTE) and
    probe_tracing_correlation, interactions (joint, alone and interaction shares of d per layer and
    pair of positions), severed (mean severed-tracing effect per severing, layer and slot),
    windows (mean IAE of MHA and MLP per window of `window` blocks, by its first block),
    baselines (improvement rates per baseline), image_tracing (restored share of the subject's
    effect per vision layer and region), coefficients
    and r2 (the joint covariate fit), covariate_instances (its scenes' covariates and d)."""
    if data is not None:
        raise ValueError("the negation-followups study generates its own scenes: give data=None")
    image_ablation.layer_windows(options.window, model.vision.cfg.n_layers)  # a window wider than the tower: refused now
    with tempfile.TemporaryDirectory() as folder:
        path = shapes.export_valse(folder, options.scenes, seed=options.seed)
        instances = existence.prepare(model, path, images=f"{folder}/images", progress=progress)
        examples = list(shapes.examples(options.scenes, seed=options.seed))
        probes = probe_table(model, instances, options)
        cells, correlation = probes_beside_tracing(model, instances, probes, progress)
        tables = {"probes": probes, "probes_and_tracing": cells, "probe_tracing_correlation": correlation,
                  "interactions": interaction_shares(model, instances, progress),
                  "severed": severed_table(model, instances, options.severed_pairs),
                  "windows": image_ablation.run_windows(model, instances, k=options.window,
                                                        progress=progress).mha_vs_mlp()}
        tables["baselines"], tables["image_tracing"] = baseline_tables(model, instances, examples, progress)
    fit = covariates.joint_covariate_fit(covariates.clip_scorer(model), n=options.covariate_scenes, seed=options.seed,
                                         count_tokens=covariates.token_counter(model))
    return {**tables, "coefficients": fit["coefficients"], "r2": fit["r2"], "covariate_instances": fit["instances"]}


def probes_figure(probes: pd.DataFrame) -> go.Figure:
    """Held-out probe accuracy by layer and aligned slot."""
    table = probes.pivot_table(index="layer", columns="position", values="test_accuracy", sort=False)
    fig = px.imshow(table, text_auto=".2f", zmin=0, zmax=1, color_continuous_scale="Viridis",
                    labels=dict(x="aligned slot", y="layer", color="accuracy"))
    layer_axis(fig, "y", len(table))
    return style(fig, "Probe accuracy on held-out texts (negated or not)", height=heatmap_height(len(table)))


def coefficients_figure(coefficients: pd.DataFrame) -> go.Figure:
    rows = coefficients[coefficients["term"] != "intercept"]
    fig = go.Figure(go.Scatter(x=rows["coefficient"], y=rows["term"], mode="markers",
                               error_x=dict(type="data", symmetric=False, array=rows["high"] - rows["coefficient"],
                                            arrayminus=rows["coefficient"] - rows["low"])))
    fig.add_vline(x=0, line_dash="dot")
    fig.update_layout(xaxis_title="change in d per standard deviation (95% interval)")
    return style(fig, "Joint fit of d", height=360)


def _line_section(out: Report, question: str, table: pd.DataFrame, *, y: str, color: str, text: str, title: str,
                  caption: str) -> None:
    """A section of the report: the question, what was done, `y` by layer (one line per `color`), the table."""
    out.section(QUESTIONS[question]).text(text)
    fig = layer_axis(px.line(table, x="layer", y=y, color=color, markers=True), "x", table["layer"].nunique())
    out.figure(style(fig, title, height=340))
    out.table(table, caption=caption)


def report(tables: Tables, options: Options) -> Report:
    out = Report("Negation: follow-up experiments")
    out.section(QUESTIONS["probes"]).text(
        f"{options.scenes} synthetic existence scenes (seed {options.seed}); each negated sentence against its "
        f"non-negated partner, a linear probe per layer and aligned slot on `{options.probe_hook}`, "
        f"{options.test_fraction:.0%} of the texts held out. Read each accuracy against its control task (the same "
        "probe on shuffled labels) and against causal tracing's localisation.")
    out.figure(probes_figure(tables["probes"]))
    correlation = tables["probe_tracing_correlation"]
    out.table(tables["probes_and_tracing"], caption="Probe and control accuracy beside the mean causal-tracing effect "
                                                    "of the same cell")
    out.table(correlation, caption="Rank correlation over the cells")
    _line_section(out, "interactions", tables["interactions"], color="positions", y="interaction", text=(
        "The negated sentence's residual restored in the non-negated run at two positions at once ('joint') and at "
        "each alone ('alone', summed), as shares of d. A non-zero interaction (joint - alone) means the positions "
        "act together: what one carries depends on the other."),
        title="Interaction of two restored positions",
        caption="Joint, alone and interaction shares of d per layer and pair of positions")
    out.section(QUESTIONS["severed"]).text(
        f"The first {options.severed_pairs} instances traced three ways: plainly ('none'), with every later MLP held at "
        "the non-negated run's output ('mlp'), and with every later attention layer held ('attn'). An effect that "
        "survives 'mlp' but not 'attn' reaches the score through attention.")
    severed = tables["severed"]
    fig = px.line(severed[severed["slot"] != "other"], x="layer", y="mean_effect", color="severed", facet_col="slot",
                  markers=True, labels=dict(mean_effect="mean effect"))
    layer_axis(fig, "x", severed["layer"].nunique())
    out.figure(style(fig, "Severed causal tracing", height=360))
    out.table(severed, caption="Mean effect per severing, layer and position")
    out.section(QUESTIONS["windows"]).text(
        f"MHA (or MLP) of {options.window} consecutive vision blocks ablated at once against the mean-colour image; "
        "each row is a window by its first block. Set beside the single-block IAE of the same instances (window 1) "
        "to see whether the blocks act together.")
    out.table(tables["windows"], caption=f"Mean IAE per window of {options.window} blocks")
    out.section(QUESTIONS["baselines"]).text(
        "Each instance x layer ablated against the mean-colour image and against the scene rendered without its "
        "subject. Where the negation is in the caption the subject is absent from the image, so the subject-removed "
        "image is the image itself and nothing changes: the mean colour's improvements there do not come from the "
        "subject.")
    out.table(tables["baselines"], caption="Share of instance x layer cases that ablation improves, worsens, fixes "
                                           "or breaks")
    _line_section(out, "image_tracing", tables["image_tracing"], color="region", y="share", text=(
        "Each image whose subject is present: the original image's residual restored at one vision layer and "
        "position in the run on the image without its subject. The share is the change of d over the subject's "
        "whole effect on d, summed over the region's cells; after the last block only the class token is read."),
        title="Causal tracing in the vision encoder",
        caption="Restored share of the subject's effect per layer and region (cells: instance x position)")
    out.section(QUESTIONS["covariates"]).text(
        f"{options.covariate_scenes} varied synthetic scenes; d fitted by least squares on the standardised covariates "
        "together.")
    out.figure(coefficients_figure(tables["coefficients"]))
    out.table(tables["r2"], caption="R² of each covariate alone and of all together")
    return out


STUDY = Study("negation-followups", Options, compute, report, data="none: the study generates its own scenes")
