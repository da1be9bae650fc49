"""The cross-model report of a sweep (out/report.html): accuracy per model x dataset, causal-tracing
localisation per layer by model, the top selective heads per model with their layer, and image
ablation's MHA against MLP by model (each replaced by a line saying so when the sweep did not run
that study); and, when the sweep ran them, attention cancellation per setting and head ablation
against random heads, by model."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from clip_lens.plot import heatmap_height, layer_axis, style
from clip_lens.report import Report
from clip_lens.sweep.storage import load

TOP_HEADS = 5


def accuracy_figure(accuracy: pd.DataFrame) -> go.Figure:
    grid = accuracy.pivot_table(index="model", columns="dataset", values="accuracy", aggfunc="mean")
    fig = px.imshow(grid, text_auto=".2f", color_continuous_scale="Viridis", zmin=0, zmax=1, aspect="auto",
                    labels=dict(color="accuracy"))
    return style(fig, "Accuracy per model and dataset (the correct text preferred)", height=heatmap_height(len(grid)))


def localisation_figure(localisation: pd.DataFrame) -> go.Figure:
    fig = px.line(localisation, x="layer", y="localisation", color="model", facet_col="dataset", markers=True,
                  labels=dict(layer="layer (residual stream before block)", localisation="localisation (CTE spread)"))
    layer_axis(fig, "x", localisation["layer"].nunique())
    return style(fig, "Causal-tracing localisation per layer", height=420)


def top_heads(heads: pd.DataFrame, k: int = TOP_HEADS) -> pd.DataFrame:
    """The k most selective heads per model and dataset."""
    return (heads.sort_values("a_N", ascending=False).groupby(["model", "dataset"], sort=True).head(k)
            .sort_values(["model", "dataset", "a_N"], ascending=[True, True, False])
            [["model", "dataset", "layer", "head", "a_N"]].reset_index(drop=True))


def heads_figure(top: pd.DataFrame) -> go.Figure:
    """The top heads (`top_heads`) by layer, a panel per model: each head at its own place within
    its layer's band (head h of H at layer + (h + 0.5) / H - 0.5), labelled h<head>, so that heads
    of one layer stand side by side instead of on one spot."""
    n_heads = int(top["head"].max()) + 1 if len(top) else 1
    placed = top.assign(name="h" + top["head"].astype(str),
                        position=top["layer"] + (top["head"] + 0.5) / n_heads - 0.5)
    models = list(dict.fromkeys(placed["model"]))
    fig = px.scatter(placed, x="position", y="a_N", color="dataset", symbol="dataset", text="name",
                     facet_row="model", category_orders=dict(model=models), hover_data=["layer", "head"],
                     labels=dict(a_N="selectivity a_N", position="layer"))
    fig.update_traces(textposition="top center", marker_size=11)
    fig.for_each_annotation(lambda a: a.update(text=a.text.replace("model=", "")))
    layers = range(int(top["layer"].min()), int(top["layer"].max()) + 1) if len(top) else range(1)
    fig.update_xaxes(range=[layers[0] - 0.5, layers[-1] + 0.5])
    layer_axis(fig, "x", len(layers))
    return style(fig, f"Top {TOP_HEADS} selective heads per model and dataset, by layer",
                 height=160 + 260 * len(models))


def ablation_figure(ablation: pd.DataFrame) -> go.Figure:
    average = ablation[ablation["layer"] == "average"].melt(id_vars=["model", "dataset"], value_vars=["MHA", "MLP"],
                                                            var_name="component", value_name="mean IAE")
    fig = px.bar(average, x="model", y="mean IAE", color="component", barmode="group", facet_col="dataset",
                 color_discrete_map={"MHA": "#264653", "MLP": "#e76f51"})
    return style(fig, "Image ablation: mean IAE over layers, MHA against MLP", height=420)


def cancellation_figure(summary: pd.DataFrame) -> go.Figure:
    value = "accuracy" if summary["accuracy"].notna().any() else "mean_cosine"
    fig = px.line(summary, x="setting", y=value, color="model", facet_col="dataset", markers=True,
                  labels=dict(setting="self-attention cancelled in layers (1-based)"))
    fig.update_xaxes(type="category")
    return style(fig, f"Attention cancellation: {value.replace('_', ' ')} per setting", height=420)


def head_ablation_figure(table: pd.DataFrame) -> go.Figure:
    mean = table.groupby(["model", "dataset", "condition"], sort=False, as_index=False)["accuracy"].mean()
    fig = px.bar(mean, x="model", y="accuracy", color="condition", barmode="group", facet_col="dataset",
                 color_discrete_map={"none": "#264653", "chosen": "#e76f51", "random": "#8ab17d"},
                 labels=dict(condition="heads intervened on"))
    fig.update_yaxes(range=[0, 1])
    return style(fig, "Accuracy with each model's most selective heads ablated, against random heads", height=420)


def task_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Every task of the manifest, failed and unfinished ones first, with its status and error."""
    columns = ["model", "dataset", "study", "status", "attempts", "seconds", "peak_rss_mb", "host", "error"]
    order = manifest["status"].eq("done")  # False (not done) sorts first
    return manifest.assign(_done=order).sort_values(["_done", "model", "dataset", "study"], kind="stable")[columns]


def build_report(tables: dict[str, pd.DataFrame], title: str = "Sweep across models") -> Report:
    report = Report(title)
    manifest = tables["manifest"]
    not_done = int((manifest["status"] != "done").sum())
    report.section("Tasks").text(f"{len(manifest)} tasks over {manifest['model'].nunique()} models, "
                                 f"{manifest['dataset'].nunique()} datasets and {manifest['study'].nunique()} studies; "
                                 f"{len(manifest) - not_done} done, {not_done} failed or not finished.")
    report.table(task_table(manifest), max_rows=max(200, len(manifest)),
                 caption="Every task with its status and error (out/manifest.sqlite)")
    sections = (("Accuracy", "accuracy", accuracy_figure),
                ("Causal-tracing localisation", "localisation", localisation_figure),
                ("Selective heads", "heads", lambda t: heads_figure(top_heads(t))),
                ("Image ablation", "image_ablation", ablation_figure))
    if "attention_cancellation" in tables:  # drawn only when the sweep ran it
        sections += (("Attention cancellation", "attention_cancellation", cancellation_figure),)
    if "head_ablation" in tables:
        sections += (("Head ablation", "head_ablation", head_ablation_figure),)
    for heading, table, figure in sections:
        report.section(heading)
        if table in tables and len(tables[table]):
            report.figure(figure(tables[table]))
            if table == "heads":
                report.table(top_heads(tables[table]), max_rows=200, caption="Top selective heads per model and dataset")
        else:
            report.text(f"No {table.replace('_', ' ')} table: the sweep ran no task of that study.", note=True)
    return report


def write_report(out: Union[str, Path], task_ids: Optional[Iterable[str]] = None) -> Path:
    """out/report.html: every task's status and error, and figures over the finished tasks (only
    `task_ids` if given)."""
    return build_report(load(out, task_ids)).write(Path(out) / "report.html")
