"""Plotly figures for the studies: long-format DataFrames in, `go.Figure`s out, all in one style.

Colours follow one convention throughout: segments by `SEGMENT_COLOURS`; signed effects on a
diverging scale centred at 0; classes, models and seeds from `PALETTE` (24 distinct colours).

The style (`style`) owns every layout fact a figure shares: the title and its top margin, axis titles
wrapped to fit their side of the plot and the margins that hold them, colour bars beside the plot
area (right of every subplot), readable cell text on heatmaps. Layer axes take integer ticks
(`layer_axis`); figures with one line per seed draw one trace per seed (`seed_lines`).
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from clip_lens.scores import SEGMENT_COLOURS, SEGMENTS

DIVERGING = "RdBu_r"
FONT = dict(family="Inter, Helvetica, Arial, sans-serif", size=13)
TITLE_SIZE = 16
CELL_TEXT_SIZE = 12           # numbers written in heatmap cells, px
CELL_PX = 40                  # height of one heatmap row that holds a number of CELL_TEXT_SIZE
PALETTE = tuple(px.colors.qualitative.Dark24)  # distinct colours for up to 24 classes / models / seeds
COLORBAR_X = 1.02             # paper coordinates: just right of the plot area, beside every subplot
DEFAULT_HEIGHT = 450          # plotly's own default, px
ASSUMED_WIDTH = 800           # px: a report's figure width, for wrapping the title
CHAR_WIDTH = 0.6              # mean character width as a share of the font size
LINE_HEIGHT = 1.3             # line height as a share of the font size
MARGIN = dict(l=60, r=30, t=70, b=60)


def text_width(text: str, size: float = FONT["size"]) -> float:
    """Estimated width in px of the longest line of `text` (lines split at <br>, tags dropped)."""
    lines = re.sub(r"<(?!br)[^>]*>", "", str(text)).split("<br>")
    return max(len(line) for line in lines) * CHAR_WIDTH * size


def wrap(text: str, width: float, size: float = FONT["size"]) -> str:
    """`text` with <br> between words so that each line is at most `width` px wide (a single word
    longer than that keeps its own line)."""
    lines: list[str] = []
    for word in str(text).split():
        if lines and text_width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "<br>".join(lines)


def layer_axis(fig: go.Figure, axis: str = "x", n_layers: Optional[int] = None, **where) -> go.Figure:
    """Integer ticks on a layer axis (`axis` "x" or "y"; `where`: row=, col=, as plotly's
    update_xaxes takes): one tick per layer, or every second one beyond 16 layers; returns `fig`."""
    if axis not in ("x", "y"):
        raise ValueError(f"axis={axis!r}: give 'x' or 'y'")
    step = 1 if n_layers is None else max(1, math.ceil(n_layers / 16))
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    update(tickmode="linear", tick0=0, dtick=step, tickformat="d", **where)
    return fig


def heatmap_height(rows: int, extra: int = 0) -> int:
    """A heatmap figure's height in px that gives each of `rows` rows room for a number in its cells."""
    return MARGIN["t"] + MARGIN["b"] + extra + max(rows, 4) * CELL_PX


def seed_lines(table: pd.DataFrame, x: str, y: str, group: str, seed: str = "seed", title: str = "",
               x_title: Optional[str] = None) -> go.Figure:
    """`y` against `x`, one line per `group` value and seed (never two seeds joined into one
    zig-zag line). `table`: x, y, group and (optionally) seed columns; seeds < 0 mean "no seed"."""
    fig = go.Figure()
    seeds = table[seed] if seed in table else pd.Series(-1, index=table.index)
    colours = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(pd.unique(table[group]))}
    dashes = ("solid", "dash", "dot", "dashdot", "longdash")
    for (name, s), part in table.sort_values(x, kind="stable").groupby([table[group], seeds], sort=False):
        label = f"{name} (seed {int(s)})" if s >= 0 and seeds[table[group] == name].nunique() > 1 else f"{name}"
        rank = sorted(pd.unique(seeds[table[group] == name])).index(s)
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="lines+markers", name=label,
                                 line=dict(color=colours[name], dash=dashes[rank % len(dashes)])))
    fig.update_xaxes(title_text=x_title or x)
    fig.update_yaxes(title_text=y)
    return style(fig, title, height=400)


def style(fig: go.Figure, title: str, height: Optional[int] = None) -> go.Figure:
    """The house style, applied to `fig` and returned: title top left with a top margin that holds
    it (and any subplot titles), one font and palette, axis titles wrapped to fit their side of the
    plot area and margins that hold them and the tick labels, colour bars right of every subplot,
    heatmap cell numbers at a readable size."""
    height = height or fig.layout.height or DEFAULT_HEIGHT
    title_text = wrap(title, ASSUMED_WIDTH - 40, TITLE_SIZE)
    title_lines = title_text.count("<br>") + 1
    subplot_titles = any(a.yref == "paper" and a.y is not None and a.y >= 1 for a in fig.layout.annotations)
    top = 24 + title_lines * TITLE_SIZE * LINE_HEIGHT + (26 if subplot_titles else 8)
    margin = dict(MARGIN, t=int(max(MARGIN["t"], top)))
    fig.update_layout(title=dict(text=title_text, x=0.01, xanchor="left", yref="container", y=1, yanchor="top",
                                 pad=dict(t=14), font=dict(size=TITLE_SIZE)),
                      template="plotly_white", font=FONT, colorway=list(PALETTE), height=height)
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    plot_height = height - margin["t"] - margin["b"]
    margin["l"] = max(margin["l"], _fit_y_titles(fig, plot_height, side="left"))
    margin["r"] = max(margin["r"], _fit_y_titles(fig, plot_height, side="right"))
    fig.update_layout(margin=margin)
    _place_colorbars(fig)
    fig.for_each_trace(lambda t: t.update(textfont_size=CELL_TEXT_SIZE),
                       selector=lambda t: t.type == "heatmap" and (t.texttemplate or t.text is not None))
    return fig


def _fit_y_titles(fig: go.Figure, plot_height: float, side: str) -> int:
    """Wraps every y-axis title on `side` to the height of its axis; returns the margin in px
    (tick labels, then the title's lines) that side needs."""
    need = 0
    for name in [k for k in fig.layout if k.startswith("yaxis")]:
        axis = fig.layout[name]
        if (axis.side or "left") != side or axis.visible is False:
            continue
        span = (axis.domain[1] - axis.domain[0]) if axis.domain else 1.0
        ticks = _tick_label_width(fig, "y" + name[5:])
        text = axis.title.text if axis.title and axis.title.text else ""
        if text:
            axis.title.text = wrap(text, max(plot_height * span - 10, 60))
        lines = axis.title.text.count("<br>") + 1 if text else 0
        need = max(need, int(20 + ticks + lines * FONT["size"] * LINE_HEIGHT))
    return need


def _tick_label_width(fig: go.Figure, axis_id: str) -> float:
    """Estimated width in px of the widest tick label on y axis `axis_id` ("y", "y2", ...): the
    longest category of the traces on it, or a number's width."""
    widest = 5 * CHAR_WIDTH * FONT["size"]
    for trace in fig.data:
        if getattr(trace, "yaxis", None) in (axis_id, None if axis_id == "y" else "-") and trace.y is not None:
            labels = [v for v in np.asarray(trace.y, dtype=object).ravel() if isinstance(v, str)]
            if labels:
                widest = max(widest, max(text_width(v) for v in labels))
    if fig.layout[axis_id.replace("y", "yaxis", 1)].ticktext:
        widest = max(widest, max(text_width(v) for v in fig.layout[axis_id.replace("y", "yaxis", 1)].ticktext))
    return widest


def _place_colorbars(fig: go.Figure) -> None:
    """Every colour bar (of traces and of layout colour axes) right of every subplot; a legend
    beside one moves right of it."""
    shown = False
    for trace in fig.data:
        if "colorbar" in trace and trace.showscale is not False and trace.type in ("heatmap", "contour", "histogram2d"):
            trace.colorbar.update(x=COLORBAR_X, xanchor="left", xref="paper")
            shown = shown or not trace.coloraxis
    for name in [k for k in fig.layout if k.startswith("coloraxis")]:
        if fig.layout[name].showscale is not False:
            fig.layout[name].colorbar.update(x=COLORBAR_X, xanchor="left", xref="paper")
            shown = True
    if shown and any(getattr(t, "showlegend", False) is not False and getattr(t, "name", None) for t in fig.data):
        fig.update_layout(legend=dict(x=COLORBAR_X + 0.16, xanchor="left"))


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
    layer_axis(fig, "y", len(set(means["layer"])))
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
                             colorscale=DIVERGING, colorbar=dict(title=value),
                             hovertemplate="layer %{y} head %{x}<br>%{z:.4f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=grid.mean(axis=1), y=grid.index, orientation="h", marker_color="#264653", showlegend=False,
                         hovertemplate="layer %{y}<br>mean %{x:.4f}<extra></extra>"), row=1, col=2)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    layer_axis(fig, "y", len(grid))
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
    layer_axis(fig, "x", means["layer"].nunique())
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
    layer_axis(fig, "x", counts["layer"].nunique())
    fig.update_yaxes(title_text="instances", row=1, col=1)
    return style(fig, title, height=420)


def mha_vs_mlp(table: pd.DataFrame, title: str) -> go.Figure:
    """Grouped bars of mean IAE per layer (and the average) for MHA and MLP. `table`: layer, MHA, MLP."""
    fig = go.Figure([go.Bar(x=table["layer"], y=table[c], name=c, marker_color=COMPONENT_COLOURS[c]) for c in ("MHA", "MLP")])
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="layer", type="category")
    fig.update_yaxes(title_text="mean IAE")
    return style(fig, title, height=400)
