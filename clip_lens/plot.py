"""Plotly figures for the studies: long-format DataFrames in, `go.Figure`s out.

Colours follow one convention throughout: segments by `SEGMENT_COLOURS`; signed effects on a
diverging scale centred at 0.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from clip_lens.scores import SEGMENT_COLOURS, SEGMENTS

DIVERGING = "RdBu_r"
FONT = dict(family="Inter, Helvetica, Arial, sans-serif", size=13)


def style(fig: go.Figure, title: str, height: Optional[int] = None) -> go.Figure:
    """The house style: title top left, white template, one font, margins; returns `fig`."""
    fig.update_layout(title=dict(text=title, x=0.01), template="plotly_white", font=FONT,
                      margin=dict(l=60, r=30, t=70, b=50), **({"height": height} if height else {}))
    return fig


def _symmetric_range(values) -> float:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return float(max(np.abs(finite).max(), 1e-9)) if finite.size else 1.0


def score_distribution(frame: pd.DataFrame, title: str = "Caption-foil score difference d") -> go.Figure:
    """Histogram of d coloured by segment, one panel per negation placement."""
    fig = px.histogram(frame, x="d", color="segment", facet_col="negation_in" if "negation_in" in frame else None,
                       color_discrete_map=SEGMENT_COLOURS, category_orders={"segment": list(SEGMENTS)},
                       nbins=40, opacity=0.85, barmode="overlay")
    fig.add_vline(x=1, line_dash="dot", line_color="grey")
    fig.add_vline(x=-1, line_dash="dot", line_color="grey")
    fig.update_xaxes(title_text="d = S(caption) - S(foil)")
    return style(fig, title, height=400)


def cte_heatmaps(means: pd.DataFrame, localisation: pd.DataFrame, slots: Sequence[str], title: str) -> go.Figure:
    """Per segment: a heatmap of mean CTE (layers x aligned positions) with the layer's localisation
    as bars beside it. `means`: segment, layer, position, cte, instances; `localisation`: segment,
    layer, localisation."""
    segments = [s for s in SEGMENTS if s in set(means["segment"])]
    fig = make_subplots(rows=1, cols=2 * len(segments), shared_yaxes=True, horizontal_spacing=0.015,
                        column_widths=[0.78, 0.22] * len(segments),
                        subplot_titles=[t for s in segments for t in
                                        (f"{s} (n={int(means[means['segment'] == s]['instances'].iloc[0])})", "localisation")])
    bound = _symmetric_range(means["cte"])
    for i, segment in enumerate(segments):
        part = means[means["segment"] == segment]
        grid = part.pivot(index="layer", columns="position", values="cte").reindex(columns=list(slots))
        fig.add_trace(go.Heatmap(z=grid.to_numpy(), x=list(slots), y=grid.index, zmin=-bound, zmax=bound,
                                 colorscale=DIVERGING, showscale=i == 0, colorbar=dict(title="CTE"),
                                 hovertemplate="layer %{y}<br>%{x}<br>CTE %{z:.3f}<extra>" + segment + "</extra>"),
                      row=1, col=2 * i + 1)
        loc = localisation[localisation["segment"] == segment]
        fig.add_trace(go.Bar(x=loc["localisation"], y=loc["layer"], orientation="h", showlegend=False,
                             marker_color=SEGMENT_COLOURS[segment],
                             hovertemplate="layer %{y}<br>std %{x:.3f}<extra></extra>"), row=1, col=2 * i + 2)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    fig.update_xaxes(tickangle=-40)
    return style(fig, title, height=520)


def head_heatmap(table: pd.DataFrame, title: str, value: str = "a_N") -> go.Figure:
    """Heatmap of a per-head value (layers x heads) with the layer means as bars. `table`: layer,
    head, value."""
    grid = table.pivot(index="layer", columns="head", values=value).sort_index()
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.8, 0.2], horizontal_spacing=0.02,
                        subplot_titles=("per head", "layer mean"))
    bound = _symmetric_range(grid.to_numpy())
    fig.add_trace(go.Heatmap(z=grid.to_numpy(), x=[str(h) for h in grid.columns], y=grid.index, zmin=-bound, zmax=bound,
                             colorscale=DIVERGING, colorbar=dict(title=value, x=0.78),
                             hovertemplate="layer %{y} head %{x}<br>%{z:.4f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=grid.mean(axis=1), y=grid.index, orientation="h", marker_color="#264653", showlegend=False,
                         hovertemplate="layer %{y}<br>mean %{x:.4f}<extra></extra>"), row=1, col=2)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="head", row=1, col=1)
    return style(fig, title, height=480)


def query_heatmap(table: pd.DataFrame, slots: Sequence[str], title: str) -> go.Figure:
    """Heads x query positions of one layer. `table`: head, query, diff."""
    grid = table.pivot(index="head", columns="query", values="diff").reindex(columns=list(slots))
    bound = _symmetric_range(grid.to_numpy())
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=list(slots), y=[str(h) for h in grid.index], zmin=-bound, zmax=bound,
                               colorscale=DIVERGING, colorbar=dict(title="mean diff"),
                               hovertemplate="head %{y}<br>query %{x}<br>%{z:.4f}<extra></extra>"))
    fig.update_yaxes(title_text="head", autorange="reversed")
    fig.update_xaxes(title_text="query position")
    return style(fig, title, height=420)


def scatter_against_d(frame: pd.DataFrame, x: str, title: str, x_title: Optional[str] = None) -> go.Figure:
    """d against a per-instance measure, coloured by segment, one panel per negation placement."""
    fig = px.scatter(frame, x=x, y="d", color="segment", facet_col="negation_in" if "negation_in" in frame else None,
                     color_discrete_map=SEGMENT_COLOURS, category_orders={"segment": list(SEGMENTS)},
                     hover_data=[c for c in ("id", "caption", "foil") if c in frame], opacity=0.75)
    fig.add_hline(y=0, line_color="grey", line_width=1)
    fig.update_xaxes(title_text=x_title or x)
    return style(fig, title, height=420)


def accuracy_curve(table: pd.DataFrame, title: str) -> go.Figure:
    """Accuracy (and number of instances) against a minimum threshold. `table`: threshold, accuracy, instances."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=table["threshold"], y=table["accuracy"], mode="lines+markers", name="accuracy",
                             line_color="#2a9d8f"), secondary_y=False)
    fig.add_trace(go.Bar(x=table["threshold"], y=table["instances"], name="instances", marker_color="#ccc",
                         opacity=0.5), secondary_y=True)
    fig.update_yaxes(title_text="accuracy", range=[0, 1], secondary_y=False)
    fig.update_yaxes(title_text="instances", secondary_y=True)
    fig.update_xaxes(title_text="minimum subject size")
    return style(fig, title, height=400)


COMPONENT_COLOURS = {"MHA": "#3a86ff", "MLP": "#fb8500"}
OUTCOME_COLOURS = {("worse", "incorrect"): "#d62828", ("worse", "correct"): "#f4a261",
                   ("better", "correct"): "#2a9d8f", ("better", "incorrect"): "#8ecae6",
                   ("unchanged", "correct"): "#bbbbbb", ("unchanged", "incorrect"): "#888888"}


def iae_by_layer(means: pd.DataFrame, title: str) -> go.Figure:
    """Mean IAE against layer, MHA and MLP, one panel per segment and a row per negation placement.
    `means`: negation_in, segment, component, layer, iae, instances."""
    fig = px.line(means, x="layer", y="iae", color="component", facet_col="segment", facet_row="negation_in",
                  markers=True, color_discrete_map=COMPONENT_COLOURS,
                  category_orders={"segment": [s for s in SEGMENTS if s in set(means["segment"])]},
                  hover_data=["instances"])
    fig.add_hline(y=0, line_color="grey", line_width=1)
    fig.for_each_annotation(lambda a: a.update(text=a.text.replace("negation_in=", "negation in ").replace("segment=", "")))
    return style(fig, title, height=300 + 180 * means["negation_in"].nunique())


def outcome_bars(counts: pd.DataFrame, title: str) -> go.Figure:
    """Stacked bars per layer: worse/better x ends correct/incorrect, one panel per component.
    `counts`: component, layer, change, ends, instances."""
    components = [c for c in COMPONENT_COLOURS if c in set(counts["component"])]
    fig = make_subplots(rows=1, cols=len(components), shared_yaxes=True, subplot_titles=components,
                        horizontal_spacing=0.04)
    for i, component in enumerate(components):
        part = counts[counts["component"] == component]
        for (change, ends), colour in OUTCOME_COLOURS.items():
            bars = part[(part["change"] == change) & (part["ends"] == ends)]
            if not len(bars):
                continue
            fig.add_trace(go.Bar(x=bars["layer"], y=bars["instances"], name=f"{change}, ends {ends}", marker_color=colour,
                                 legendgroup=f"{change}{ends}", showlegend=i == 0), row=1, col=i + 1)
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="instances", row=1, col=1)
    return style(fig, title, height=420)


def mha_vs_mlp(table: pd.DataFrame, title: str) -> go.Figure:
    """Grouped bars of mean IAE per layer (and the average) for MHA and MLP. `table`: layer, MHA, MLP."""
    fig = go.Figure([go.Bar(x=table["layer"], y=table[c], name=c, marker_color=COMPONENT_COLOURS[c]) for c in ("MHA", "MLP")])
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="layer", type="category")
    fig.update_yaxes(title_text="mean IAE")
    return style(fig, title, height=400)
