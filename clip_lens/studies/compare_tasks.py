"""Whether the same heads serve different tasks (docs/pairs.md, "Comparing tasks").

For N minimal-pair tasks (VALSE pieces, CANNOT, a user's files): every head's selectivity for the
differing span side by side, with the Spearman correlation of the selectivities between every two
tasks; causal-tracing localisation per layer (tasks with images); and the effect of ablating each
task's own most selective heads on its accuracy, next to random heads. One set of tables and one
report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.data import MinimalPairs
from clip_lens.model import HookedCLIP
from clip_lens.plot import DIVERGING, style
from clip_lens.report import Report, claim_output, write_study
from clip_lens.scores import encode_images
from clip_lens.studies.analyses import head_interventions, minimal_pairs

TAIL = ("span", "+1", "+2", "+3", "EOT")  # positions whose spread is the localisation


@dataclass
class TaskInput:
    """One task: its pairs, which text of each pair is marked (see `minimal_pairs.orient`), and its
    image embeddings [pairs, d_embed] (None for a text-only task such as CANNOT)."""

    name: str
    pairs: MinimalPairs
    marked: Union[str, np.ndarray] = "b"
    image_emb: Optional[Tensor] = None


def compare_tasks(model: HookedCLIP, model_label: str, out: Union[str, Path], tasks: Sequence[TaskInput], *,
                  top_k: int = 3, random_seeds: Sequence[int] = (0, 1, 2), description: str = "",
                  overwrite: bool = False, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Selectivity, localisation and head ablation for every task; tables and report.html in `out`."""
    if len(tasks) < 1:
        raise ValueError("give at least one task")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {names}")
    out = claim_output(out, overwrite=overwrite)
    selectivity, localisation, ablation, counts = [], [], [], []
    for task in tqdm(tasks, desc="tasks", disable=not progress):
        pairs = task.pairs
        counts.append({"task": task.name, "pairs": len(pairs), "excluded": len(pairs.excluded),
                       "images": task.image_emb is not None})
        if len(pairs) == 0:
            continue
        heads = minimal_pairs.selective_heads(model, pairs, task.marked, progress=False).head_table()
        selectivity.append(heads.assign(task=task.name))
        if task.image_emb is None:
            continue
        traced = minimal_pairs.trace(model, pairs, task.image_emb, task.marked, progress=False).frame()
        tail = traced[traced["position"].isin(TAIL)]
        spread = tail.groupby("layer")["cte"].std(ddof=0).rename("localisation").reset_index()
        localisation.append(spread.assign(task=task.name))
        top = [(int(r.layer), int(r.head)) for r in heads.head(top_k).itertuples()]
        table = head_interventions.intervention_study(model, pairs, task.image_emb, top, random_seeds=random_seeds)
        ablation.append(table.assign(task=task.name))
    tables = {"tasks": pd.DataFrame(counts)}
    tables["selectivity"] = pd.concat(selectivity, ignore_index=True) if selectivity else pd.DataFrame()
    tables["selectivity_correlation"] = _correlations(tables["selectivity"])
    tables["localisation"] = pd.concat(localisation, ignore_index=True) if localisation else pd.DataFrame()
    tables["ablation"] = pd.concat(ablation, ignore_index=True) if ablation else pd.DataFrame()
    write_study(out, tables, _report(model_label, description, tables),
                manifest={"study": "compare tasks", "model": model_label, "tasks": names, "top_k": top_k})
    return tables


def build_tasks(model: HookedCLIP, *, valse: Optional[Union[str, Path]] = None, pieces: Optional[Sequence[str]] = None,
                cannot: Optional[Sequence[Union[str, Path]]] = None, pairs_files: Sequence[Union[str, Path]] = (),
                images: Optional[Union[str, Path]] = None, generated_images: bool = False,
                limit: Optional[int] = None, spacy_model: str = "en_core_web_sm", seed: int = 0,
                progress: bool = True) -> list[TaskInput]:
    """The tasks of a comparison: VALSE pieces (existence through its rephrasing, the negated sentence
    marked; the others with the foil marked), CANNOT (the negated sentence marked, no images) and
    a user's pairs files (the foil marked, their own images).

    VALSE's images come from `images` (a pair whose file is missing there is excluded with that
    reason), or, with `generated_images`, are noise images made per pair (to run the machinery
    without the image set; scores against them mean nothing about the data)."""
    import torch

    from clip_lens.data import VALSE_PIECES, cannot_pairs, read_pairs_file, valse_existence_pairs, valse_pairs

    def tokenize(texts):
        return model.to_tokens(texts, trim=False)

    tasks = []
    if valse is not None:
        if images is None and not generated_images:
            raise ValueError("VALSE tasks need their images: give --images (the image folder) or --generated-images")
        for piece in pieces or VALSE_PIECES:
            path = Path(valse) / f"{piece}.json"
            if not path.is_file():
                raise FileNotFoundError(f"no VALSE piece {piece!r} in {valse} ({path})")
            found = valse_existence_pairs(path, tokenize) if piece == "existence" else valse_pairs(path, tokenize)
            found = _limited(_with_images(found, images) if images is not None else found, limit)
            if generated_images:
                gen = torch.Generator().manual_seed(seed)
                pixels = torch.randn(len(found), 3, *model.vision.cfg.image_size, generator=gen).clamp(-2.5, 2.5)
                emb = encode_images(model, pixels.to(model.vision.device), progress=False)
            else:
                emb = encode_images(model, list(found.pairs["image"]), progress=False) if len(found) else None
            marked = minimal_pairs.existence_marked(found) if piece == "existence" else "b"
            tasks.append(TaskInput(f"valse/{piece}", found, marked, emb))
    if cannot:
        found = _limited(cannot_pairs(cannot, tokenize, spacy_model=spacy_model, progress=progress), limit)
        tasks.append(TaskInput("cannot", found, "a", None))
    for path in pairs_files:
        found = _limited(read_pairs_file(path, tokenize), limit)
        if found.pairs["image"].isna().any():
            tasks.append(TaskInput(found.name, found, "b", None))
        else:
            tasks.append(TaskInput(found.name, found, "b", encode_images(model, list(found.pairs["image"]), progress=False)))
    if not tasks:
        raise ValueError("no task: give --valse, --cannot or --pairs")
    return tasks


def _limited(pairs: MinimalPairs, limit: Optional[int]) -> MinimalPairs:
    return MinimalPairs(pairs.name, pairs.pairs.head(limit).reset_index(drop=True), pairs.excluded) if limit else pairs


def _with_images(pairs: MinimalPairs, folder: Union[str, Path]) -> MinimalPairs:
    """Pairs whose image file is in `folder` (image column made its path); the others excluded."""
    paths = [Path(folder) / str(name) for name in pairs.pairs["image"]]
    found = np.array([p.is_file() for p in paths], dtype=bool)
    kept = pairs.pairs[found].assign(image=[str(p) for p, ok in zip(paths, found) if ok]).reset_index(drop=True)
    missing = pairs.pairs[~found]
    excluded = pd.DataFrame({"id": missing["id"], "a": missing["a"], "b": missing["b"],
                             "reason": [f"image {name} not in {folder}" for name in missing["image"]]})
    return MinimalPairs(pairs.name, kept, pd.concat([pairs.excluded, excluded], ignore_index=True))


def _correlations(selectivity: pd.DataFrame) -> pd.DataFrame:
    """Spearman correlation of the heads' a^N between every two tasks (long format)."""
    if selectivity.empty:
        return pd.DataFrame(columns=["task_a", "task_b", "spearman"])
    grid = selectivity.pivot_table(index=["layer", "head"], columns="task", values="a_N", sort=False)
    ranks = grid.rank()
    corr = ranks.corr()
    return pd.DataFrame([(a, b, float(corr.loc[a, b])) for a in corr.index for b in corr.columns],
                        columns=["task_a", "task_b", "spearman"])


def _report(model_label: str, description: str, tables: dict) -> Report:
    report = Report(f"Comparing tasks on {model_label}")
    report.section("Tasks").text(description or "Minimal-pair tasks side by side.")
    report.table(tables["tasks"], caption="Pairs kept and excluded per task")
    selectivity = tables["selectivity"]
    if not selectivity.empty:
        report.section("Which heads are selective for the differing tokens")
        report.figure(_selectivity_figure(selectivity))
        top = selectivity.sort_values("a_N", ascending=False).groupby("task", sort=False).head(3)
        report.table(top[["task", "layer", "head", "a_N", "instances"]], caption="The three most selective heads per task")
        correlation = tables["selectivity_correlation"]
        grid = correlation.pivot(index="task_a", columns="task_b", values="spearman")
        fig = px.imshow(grid, zmin=-1, zmax=1, color_continuous_scale=DIVERGING, text_auto=".2f",
                        labels=dict(color="Spearman"))
        report.figure(style(fig, "Spearman correlation of head selectivity between tasks", height=480))
    if not tables["localisation"].empty:
        report.section("Causal-tracing localisation per layer").text(
            "Per layer, the spread (standard deviation) of the mean causal-tracing effect over the differing span, "
            "the three positions after it and EOT: high where one position carries the effect.")
        fig = px.line(tables["localisation"], x="layer", y="localisation", color="task", markers=True)
        report.figure(style(fig, "Localisation by layer", height=420))
    if not tables["ablation"].empty:
        report.section("Ablating each task's most selective heads").text(
            "Accuracy (the correct text scoring higher against the image) with no intervention, with the task's own "
            "most selective heads zeroed, and with as many random heads (mean over seeds).")
        ablation = tables["ablation"]
        summary = ablation.groupby(["task", "condition"], sort=False)["accuracy"].mean().reset_index()
        fig = px.bar(summary, x="task", y="accuracy", color="condition", barmode="group")
        report.figure(style(fig, "Accuracy before and after ablation", height=420))
        report.table(ablation, caption="Every condition")
    return report


def _selectivity_figure(selectivity: pd.DataFrame) -> go.Figure:
    tasks = list(dict.fromkeys(selectivity["task"]))
    fig = px.imshow(np.stack([selectivity[selectivity["task"] == t].pivot(index="layer", columns="head", values="a_N")
                              .sort_index().to_numpy() for t in tasks]),
                    facet_col=0, facet_col_wrap=min(4, len(tasks)), color_continuous_scale=DIVERGING,
                    zmin=-1, zmax=1, labels=dict(color="a^N", x="head", y="layer"))
    for annotation, task in zip(fig.layout.annotations, tasks):
        annotation.text = task
    return style(fig, "Selectivity a^N per head and task", height=320 * ((len(tasks) + 3) // 4))
