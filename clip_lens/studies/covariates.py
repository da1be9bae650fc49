"""Study "covariates": negation accuracy by subject size x caption length on synthetic scenes
(docs/pairs.md, "Controlled covariates"). The scenes are generated from `seed`; `data` is None."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from clip_lens.plot import heatmap_height, style
from clip_lens.report import Report
from clip_lens.studies.analyses import covariates as grid
from clip_lens.studies.options import StudyOptions, option
from clip_lens.studies.runner import Study, Tables


@dataclass(frozen=True, kw_only=True)
class Options(StudyOptions):
    scenes: int = option(100, "scenes per subject size", minimum=1)
    seed: int = option(0, "seed of the scenes", minimum=0)
    sizes: tuple[int, ...] = option(grid.SIZES, "the subject's half sizes in pixels (images are 64 x 64)", minimum=1,
                                    maximum=30, min_items=1)


def compute(model, data: None, options: Options, *, checkpoints=None, progress: bool = True) -> Tables:
    """pairs (with d), grid (size x length: pairs, mean_d, accuracy), effects (least-squares fit)."""
    if data is not None:
        raise ValueError("the covariates study generates its own scenes: give data=None")
    pairs, table, effects = grid.covariate_grid(grid.clip_scorer(model), n_per_cell=options.scenes,
                                                sizes=options.sizes, seed=options.seed)
    return {"pairs": pairs, "grid": table, "effects": effects}


def report(tables: Tables, options: Options) -> Report:
    out = Report("Subject size and caption length")
    out.section("The grid").text(
        f"{options.scenes} synthetic scenes per subject size (seed {options.seed}), each with one shape of that half "
        "size (pixels of a 64 x 64 image); every scene's existence pair (negation in the foil) at every caption length, "
        f"the extra words keeping the truth value ({', '.join(repr(s) for s in grid.SUFFIXES)}).")
    for value in ("accuracy", "mean_d"):
        out.figure(grid_figure(tables["grid"], value))
    out.table(tables["effects"], caption="Least-squares fit d ~ 1 + size + length (per pixel, per word)")
    return out


def grid_figure(table: pd.DataFrame, value: str) -> go.Figure:
    """`value` by subject size (rows) and caption length (columns) of the grid table (size, length,
    value): categorical axes, so every column has one width and its tick reads the data's value."""
    cells = table.pivot(index="size", columns="length", values=value)
    fig = px.imshow(cells.to_numpy(), x=[str(v) for v in cells.columns], y=[str(v) for v in cells.index],
                    text_auto=".2f", color_continuous_scale="Viridis", aspect="auto",
                    labels=dict(x="extra words", y="subject half size (px)", color=value))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return style(fig, f"{value} by subject size and caption length", height=heatmap_height(len(cells)))


STUDY = Study("covariates", Options, compute, report, data="none: the study generates its own scenes")
