"""Study "pairs": the text studies on a user's minimal pairs (docs/pairs.md): selective heads,
causal tracing around the differing span, and ablation of the most selective heads (zero, and
their output scaled by each alpha) against random heads. Tables and one report.

`data` is a list of `PairsFile` (`read_files`): each file's pairs (the foil marked) and, where a
study needs them, the image embeddings [pairs, d_embed].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd
import plotly.express as px
from torch import Tensor

from clip_lens.data import MinimalPairs, read_pairs_file, refuse_if_none_kept
from clip_lens.model import HookedCLIP
from clip_lens.plot import DIVERGING, head_heatmap, layer_axis, seed_lines, style
from clip_lens.report import Report
from clip_lens.scores import encode_images
from clip_lens.studies.analyses import head_interventions, minimal_pairs
from clip_lens.studies.options import StudyOptions, option
from clip_lens.studies.runner import Study, Tables

STUDIES = ("causal-tracing", "heads", "ablate-heads")
NEED_IMAGES = ("causal-tracing", "ablate-heads")


@dataclass(frozen=True, kw_only=True)
class Options(StudyOptions):
    studies: str = option("all", "the studies to run", choices=(*STUDIES, "all"), flags=None)
    top_k: int = option(3, "heads to ablate", minimum=1)
    choose: str = option("selectivity", "choose the heads by selectivity or by attribution patching",
                         choices=("selectivity", "attribution"))
    alphas: tuple[float, ...] = option((1.0, 0.5, 0.0, -1.0), "factors the chosen heads' output is scaled by",
                                       min_items=1)
    limit: Optional[int] = option(None, "use the first N pairs of each file", minimum=1)

    def chosen(self) -> tuple[str, ...]:
        return STUDIES if self.studies == "all" else (self.studies,)


@dataclass
class PairsFile:
    """One pairs file: its path, its pairs (kept and excluded) and the image embeddings
    [pairs, d_embed] (None where no chosen study needs them or the file has no image column)."""

    path: Path
    pairs: MinimalPairs
    image_emb: Optional[Tensor] = None


def read_files(model: HookedCLIP, files: Sequence[Union[str, Path]], options: Options,
               images: Optional[Union[str, Path]] = None) -> list[PairsFile]:
    """Each file read and tokenized (`clip_lens.data.read_pairs_file`, image paths relative to
    `images`), its first `options.limit` pairs kept, its images encoded if a chosen study needs them."""
    found = []
    for path in files:
        pairs = read_pairs_file(path, lambda texts: model.to_tokens(texts, trim=False), images=images)
        if options.limit:
            pairs.pairs = pairs.pairs.head(options.limit).reset_index(drop=True)
        usable = len(pairs) and set(NEED_IMAGES) & set(options.chosen()) and not pairs.pairs["image"].isna().any()
        emb = encode_images(model, list(pairs.pairs["image"]), progress=False) if usable else None
        found.append(PairsFile(Path(path), pairs, emb))
    return found


def compute(model: HookedCLIP, data: Sequence[PairsFile], options: Options, *, checkpoints=None,
            progress: bool = True) -> Tables:
    """pairs and excluded (per file, column task), heads, causal_tracing, ablation (each for the
    chosen studies), files (each file's path and counts)."""
    refuse_if_none_kept([item.pairs for item in data])
    chosen = options.chosen()
    parts: dict[str, list] = {"pairs": [], "excluded": [], "heads": [], "causal_tracing": [], "ablation": []}
    for item in data:
        name = item.pairs.name
        parts["pairs"].append(item.pairs.pairs.assign(task=name))
        parts["excluded"].append(item.pairs.excluded.assign(task=name))
        if len(item.pairs) == 0:
            continue
        needs = set(NEED_IMAGES) & set(chosen)
        if needs and item.pairs.pairs["image"].isna().any():
            raise ValueError(f"{item.path} has no image column: {', '.join(sorted(needs))} score each pair against "
                             "its image")
        for key, table in _one_file(model, item, options).items():
            parts[key].append(table.assign(task=name))
    tables = {key: pd.concat(value, ignore_index=True) for key, value in parts.items() if value}
    tables["files"] = pd.DataFrame({"task": [item.pairs.name for item in data], "path": [str(item.path) for item in data],
                                    "pairs": [len(item.pairs) for item in data],
                                    "excluded": [len(item.pairs.excluded) for item in data]})
    return tables


def _one_file(model: HookedCLIP, item: PairsFile, options: Options) -> dict[str, pd.DataFrame]:
    """The chosen studies on one file's pairs."""
    chosen, pairs, out = options.chosen(), item.pairs, {}
    table = minimal_pairs.selective_heads(model, pairs, progress=False).head_table()
    if "heads" in chosen:
        out["heads"] = table
    if "causal-tracing" in chosen:
        out["causal_tracing"] = minimal_pairs.trace(model, pairs, item.image_emb, progress=False).frame()
    if "ablate-heads" in chosen:
        if options.choose == "attribution":
            top = head_interventions.top_heads_by_attribution(model, pairs, item.image_emb, options.top_k)
        else:
            top = [(int(r.layer), int(r.head)) for r in table.head(options.top_k).itertuples()]
        zero = head_interventions.intervention_study(model, pairs, item.image_emb, top, intervention="zero")
        scaled = head_interventions.intervention_study(model, pairs, item.image_emb, top, intervention="scale",
                                                       alphas=options.alphas, random_seeds=(0,))
        out["ablation"] = pd.concat([zero.assign(intervention="zero"), scaled.assign(intervention="scale")],
                                    ignore_index=True)
    return out


# --- report --------------------------------------------------------------------------------------
def report(tables: Tables, options: Options) -> Report:
    out = Report("Minimal pairs")
    for row in tables["files"].itertuples():
        out.section(row.task).text(f"{row.pairs} pairs kept from {row.path}, {row.excluded} excluded "
                                   "(excluded.csv says why).")
        if row.pairs == 0:
            continue
        if "heads" in tables:
            heads = _of(tables["heads"], row.task)
            out.figure(head_heatmap(heads, f"{row.task}: selectivity for the differing tokens (foil minus caption)"))
        if "causal_tracing" in tables:
            _tracing_figure(out, _of(tables["causal_tracing"], row.task), row.task)
        if "ablation" in tables:
            _ablation_part(out, _of(tables["ablation"], row.task), row.task, options)
    return out


def _of(table: pd.DataFrame, task: str) -> pd.DataFrame:
    """One file's rows, without the task column."""
    return table[table["task"] == task].drop(columns="task").reset_index(drop=True)


def _tracing_figure(out: Report, traced: pd.DataFrame, name: str) -> None:
    grid = traced.pivot(index="layer", columns="position", values="cte").reindex(columns=list(minimal_pairs.RELATIVE))
    fig = px.imshow(grid, color_continuous_scale=DIVERGING, zmin=-1, zmax=1, aspect="auto",
                    labels=dict(x="position (from the differing span)", y="layer", color="CTE"))
    layer_axis(fig, "y", len(grid))
    out.figure(style(fig, f"{name}: causal tracing around the differing span", height=460))


def _ablation_part(out: Report, ablation: pd.DataFrame, name: str, options: Options) -> None:
    scaled = ablation[ablation["intervention"] == "scale"].drop(columns="intervention")
    zero = ablation[ablation["intervention"] == "zero"].drop(columns="intervention").reset_index(drop=True)
    sweep = scaled[scaled["condition"] != "none"]
    out.figure(seed_lines(sweep, x="alpha", y="accuracy", group="condition",
                          title=f"{name}: accuracy as the top {options.top_k} heads by {options.choose} are scaled",
                          x_title="alpha (the heads' output times alpha)"))
    out.table(zero, caption="Zero ablation of the chosen heads and of random heads")


STUDY = Study("pairs", Options, compute, report, data="a list of PairsFile (read_files)")
