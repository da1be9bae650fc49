"""One figure style (clip_lens.plot): each defect a new user found in the figures, pinned by reading
the figure's JSON. Small hand-made tables, no model: the whole file runs in seconds."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pandas as pd
import pytest
import torch

from clip_lens import plot
from clip_lens.circuits.figures import faithfulness_figure
from clip_lens.report import Report
from clip_lens.studies import compare_tasks, covariates, pairs
from clip_lens.studies.analyses.component_attribution import logit_lens_figure, reliance_figure
from clip_lens.sweep import report as sweep_report

FONT_SIZE = 13        # px, the project's font
CHAR = 0.6            # a character's mean width as a share of the font size
COLORBAR_DEFAULT_X = 1.02  # plotly's default colour-bar position (paper coordinates)


# --- reading a figure's JSON ---------------------------------------------------------------------
def axes(fig, letter: str) -> list:
    """The figure's x (or y) axes as layout objects."""
    return [fig.layout[name] for name in fig.layout if re.fullmatch(f"{letter}axis\\d*", name)]


def integer_ticks(axis) -> bool:
    """Whether the axis can only show integer ticks: a linear tick mode from an integer with an
    integer step, or an explicit list of integer tick values."""
    if axis.tickmode == "linear" or (axis.tickmode is None and axis.dtick is not None):  # a dtick alone: linear
        return float(axis.tick0 or 0).is_integer() and axis.dtick is not None and float(axis.dtick).is_integer()
    return axis.tickvals is not None and all(float(v).is_integer() for v in axis.tickvals)


def colorbar_xs(fig) -> list[float]:
    """The x (paper coordinates) of every colour bar drawn: traces' own and layout colour axes'."""
    xs = [t.colorbar.x if t.colorbar.x is not None else COLORBAR_DEFAULT_X for t in fig.data
          if t.type == "heatmap" and t.showscale is not False and not t.coloraxis]
    xs += [fig.layout[n].colorbar.x if fig.layout[n].colorbar.x is not None else COLORBAR_DEFAULT_X
           for n in fig.layout if n.startswith("coloraxis") and fig.layout[n].showscale is not False]
    return xs


def plot_height(fig) -> float:
    m = fig.layout.margin
    return fig.layout.height - m.t - m.b


def assert_y_titles_fit(fig) -> None:
    """Each line of each y title is no longer than its axis; the left margin holds the title's lines
    beside the tick labels; the top margin holds the title."""
    for axis in axes(fig, "y"):
        if not (axis.title and axis.title.text):
            continue
        span = axis.domain[1] - axis.domain[0] if axis.domain else 1.0
        lines = axis.title.text.split("<br>")
        longest = max(len(line) for line in lines) * CHAR * FONT_SIZE
        assert longest <= plot_height(fig) * span, f"y title {axis.title.text!r} is {longest:.0f} px on a " \
                                                   f"{plot_height(fig) * span:.0f} px axis"
        assert fig.layout.margin.l >= 30 + len(lines) * FONT_SIZE * 1.2
    title_lines = fig.layout.title.text.count("<br>") + 1
    assert fig.layout.margin.t >= title_lines * (fig.layout.title.font.size or 17) * 1.2 + 20


def report_figures(monkeypatch, build) -> list:
    """The figures a report puts on its page while `build(report)` runs."""
    drawn = []
    monkeypatch.setattr(Report, "figure", lambda self, fig: drawn.append(fig) or self)
    build(Report("test"))
    return drawn


# --- small tables -------------------------------------------------------------------------------
def head_table(n_layers: int = 3, n_heads: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame([dict(layer=l, head=h, a_N=float(rng.normal())) for l in range(n_layers) for h in range(n_heads)])


def cte_tables():
    slots = ("subject", "negator", "eot")
    means = pd.DataFrame([dict(segment=s, layer=l, position=p, cte=0.1 * l - 0.05, instances=5)
                          for s in ("correct", "incorrect") for l in range(3) for p in slots])
    localisation = means.groupby(["segment", "layer"], as_index=False)["cte"].std().rename(columns={"cte": "localisation"})
    return means, localisation, slots


def layer_figures() -> dict:
    means, localisation, slots = cte_tables()
    iae = pd.DataFrame([dict(negation_in=n, segment="correct", component=c, layer=l, iae=0.1 * l, instances=4)
                        for n in ("caption", "foil") for c in ("MHA", "MLP") for l in range(3)])
    outcomes = pd.DataFrame([dict(component=c, layer=l, change="worse", ends="correct", instances=3)
                             for c in ("MHA", "MLP") for l in range(3)])
    sweep_localisation = pd.DataFrame([dict(model=m, dataset="d", layer=l, localisation=0.1 * l)
                                       for m in ("a", "b") for l in range(3)])
    return {"head heatmap": (plot.head_heatmap(head_table(), "heads"), "y"),
            "cte heatmaps": (plot.cte_heatmaps(means, localisation, slots, "cte"), "y"),
            "iae by layer": (plot.iae_by_layer(iae, "iae"), "x"),
            "outcome bars": (plot.outcome_bars(outcomes, "outcomes"), "x"),
            "logit lens": (logit_lens_figure(torch.randn(4, 3), list("abcd"), torch.randn(4)), "x"),
            "sweep localisation": (sweep_report.localisation_figure(sweep_localisation), "x")}


# --- 1. colour bars beside the plot, never over another subplot ----------------------------------
def test_the_head_heatmaps_colour_bar_lies_right_of_its_layer_mean_bars():
    fig = plot.head_heatmap(head_table(), "per head")
    ends = [axis.domain[1] for axis in axes(fig, "x")]
    assert colorbar_xs(fig) and all(x > max(ends) for x in colorbar_xs(fig)), (colorbar_xs(fig), ends)


def test_every_heatmaps_colour_bar_lies_right_of_every_subplot():
    means, localisation, slots = cte_tables()
    for fig in (plot.cte_heatmaps(means, localisation, slots, "cte"), plot.head_heatmap(head_table(), "heads")):
        ends = [axis.domain[1] if axis.domain else 1.0 for axis in axes(fig, "x")]
        assert all(x >= max(ends) for x in colorbar_xs(fig))


# --- 2. layer axes show integer ticks only ---------------------------------------------------------
@pytest.mark.parametrize("name", list(layer_figures()))
def test_layer_axes_show_integer_ticks_only(name):
    fig, letter = layer_figures()[name]
    layer_axes = [a for a in axes(fig, letter) if a.tickmode or a.tickvals or (a.title.text or "").startswith("layer")]
    assert layer_axes and all(integer_ticks(a) for a in layer_axes), [a.to_plotly_json() for a in axes(fig, letter)]


# --- 3. Logit Lens: the y title fits beside the plot, under the figure title -----------------------
def test_the_logit_lens_y_title_fits_its_axis_and_margin():
    assert_y_titles_fit(logit_lens_figure(torch.randn(5, 4), list("abcde"), torch.randn(5)))


# --- 4. faithfulness: the y title fits, the log axis shows the sizes, not minor labels -------------
def faithfulness_curve() -> pd.DataFrame:
    rows = [dict(size=s, kind="circuit", faithfulness=s / 64, edges=s) for s in (8, 16, 32, 64)]
    rows += [dict(size=s, kind="random", faithfulness=0.1, edges=s) for s in (8, 16, 32, 64) for _ in range(2)]
    return pd.DataFrame(rows)


def test_the_faithfulness_y_title_fits_its_axis_and_margin():
    assert_y_titles_fit(faithfulness_figure(faithfulness_curve()))


def test_the_faithfulness_log_axis_ticks_are_the_circuit_sizes():
    axis = faithfulness_figure(faithfulness_curve()).layout.xaxis
    assert axis.type == "log"
    assert list(axis.tickvals or ()) == [8, 16, 32, 64] and list(axis.ticktext) == ["8", "16", "32", "64"]


# --- 5. sweep report: the top heads' labels stand apart ---------------------------------------------
def test_the_top_heads_labels_of_one_layer_do_not_share_a_place():
    heads = pd.concat([head_table(2, 4).assign(model=m, dataset=d) for m in ("tiny", "other") for d in ("x", "y")])
    fig = sweep_report.heads_figure(sweep_report.top_heads(heads))
    placed = {}
    for trace in fig.data:
        for x, label in zip(trace.x, trace.text):
            placed.setdefault((trace.xaxis, round(float(x), 6)), set()).add(label)
    assert all(len(labels) == 1 for labels in placed.values()), placed
    assert all(integer_ticks(a) for a in axes(fig, "x"))


# --- 6. compare tasks: the correlation heatmap's numbers are readable ------------------------------
def test_the_task_correlation_heatmap_writes_readable_numbers(monkeypatch):
    tasks = ["existence", "counting", "plurals", "relations", "actions"]
    correlation = pd.DataFrame([dict(task_a=a, task_b=b, spearman=1.0 if a == b else 0.3)
                                for a, b in itertools.product(tasks, tasks)])
    selectivity = pd.concat([head_table(2, 2).assign(task=t, instances=4) for t in tasks])
    drawn = report_figures(monkeypatch, lambda out: compare_tasks._selectivity_section(
        out, {"selectivity": selectivity, "selectivity_correlation": correlation}))
    fig = next(f for f in drawn if "Spearman" in f.layout.title.text)
    size = fig.data[0].textfont.size
    assert size is not None and size >= 11
    assert plot_height(fig) / len(tasks) >= 2 * size  # a cell holds its number
    assert all(x >= 1.0 for x in colorbar_xs(fig))


# --- 7. SAE latents: a distinct colour per class ----------------------------------------------------
def test_the_latent_scatter_gives_each_class_its_own_colour():
    classes = [f"class {i}" for i in range(12)]
    table = pd.DataFrame([dict(**{"class": c}, latent=10 * i + j, alignment=0.1, best_concept=c,
                               alignment_percentile=j / 2, mean_attribution=0.1 * j, unexpected=j == 1)
                          for i, c in enumerate(classes) for j in range(2)])
    fig = reliance_figure(table)
    colours: dict[str, set] = {}
    for trace in fig.data:
        for point in trace.customdata:
            colours.setdefault(point[0], set()).add(trace.marker.color)
    assert set(colours) == set(classes) and all(len(c) == 1 for c in colours.values())
    assert len({next(iter(c)) for c in colours.values()}) == len(classes)


# --- 8. covariates: equal categorical columns whose ticks are the data's values ---------------------
def test_the_covariate_heatmaps_columns_are_the_datas_lengths(monkeypatch):
    lengths, sizes = (0, 1, 3), (4, 8)
    table = pd.DataFrame([dict(size=s, length=n, pairs=10, mean_d=0.1 * n, accuracy=0.5)
                          for s in sizes for n in lengths])
    drawn = report_figures(monkeypatch, lambda out: covariates.report(
        {"grid": table, "effects": pd.DataFrame({"term": ["size"], "coefficient": [0.1]})}, covariates.Options()))
    assert len(drawn) == 2
    for fig in drawn:
        assert fig.layout.xaxis.type == "category"
        assert [str(v) for v in fig.data[0].x] == [str(n) for n in lengths]
        assert fig.data[0].textfont.size is not None and fig.data[0].textfont.size >= 11


# --- 9. the alpha sweep: one line per seed -----------------------------------------------------------
def test_the_alpha_sweep_draws_one_line_per_seed(monkeypatch):
    alphas = (1.0, 0.5, 0.0, -1.0)
    rows = [dict(intervention="scale", condition=c, alpha=a, seed=s, accuracy=0.5 + 0.1 * a + 0.05 * s)
            for c, seeds in (("none", (-1,)), ("chosen", (-1,)), ("random", (0, 1))) for s in seeds for a in alphas]
    drawn = report_figures(monkeypatch, lambda out: pairs._ablation_part(out, pd.DataFrame(rows), "pairs", pairs.Options()))
    fig = drawn[0]
    names = [t.name for t in fig.data]
    assert len(names) == len(set(names)) == 3  # chosen, random seed 0, random seed 1
    for trace in fig.data:
        x = list(trace.x)
        assert x == sorted(x), f"{trace.name}: x goes back and forth {x}"


# --- the style itself --------------------------------------------------------------------------------
def test_the_palette_holds_24_distinct_colours():
    assert len(set(plot.PALETTE)) >= 24


def test_layer_axis_refuses_an_axis_other_than_x_or_y():
    with pytest.raises(ValueError, match="axis='z'"):
        plot.layer_axis(plot.head_heatmap(head_table(), "heads"), "z")


def test_wrap_keeps_each_line_within_its_width():
    text = plot.wrap("S of the residual read out through the final norm and projection", 200)
    assert all(plot.text_width(line) <= 200 for line in text.split("<br>"))
    assert text.replace("<br>", " ") == "S of the residual read out through the final norm and projection"
