"""Study "compare-tasks": whether the same heads serve different tasks (docs/pairs.md, "Comparing tasks").

For N minimal-pair tasks (VALSE pieces, CANNOT, a user's files): every head's selectivity for the
differing span side by side, with the Spearman correlation of the selectivities between every two
tasks; causal-tracing localisation per layer (tasks with images); and the effect of ablating each
task's own most selective heads on its accuracy, next to random heads. One set of tables and one
report. `data` is a `TaskSet` (`build_tasks`, the data preparation of the front ends).
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.data import MinimalPairs, refuse_if_none_kept
from clip_lens.model import HookedCLIP
from clip_lens.plot import DIVERGING, heatmap_height, layer_axis, style
from clip_lens.report import Report
from clip_lens.scores import encode_images
from clip_lens.studies import pair_tasks
from clip_lens.studies.analyses import head_interventions, minimal_pairs
from clip_lens.studies.options import StudyOptions, option
from clip_lens.studies.pair_tasks import TAIL, TaskInput
from clip_lens.studies.runner import Study, Tables

__all__ = ["TAIL", "TaskInput", "TaskSet", "TaskSources", "Options", "build_tasks", "compute", "report", "STUDY"]


@dataclass
class TaskSet:
    """The tasks of a comparison (`build_tasks`) and what the report says about them."""

    tasks: list[TaskInput]
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class Options(StudyOptions):
    top_k: int = option(3, "each task's most selective heads to ablate", minimum=1)
    random_seeds: tuple[int, ...] = option((0, 1, 2), "seeds of the random heads ablated for comparison", minimum=0,
                                           min_items=1)
    limit: Optional[int] = option(None, "use the first N pairs of each task", minimum=1)
    seed: int = option(0, "seed of the generated noise images (--generated-images)", minimum=0)


def compute(model: HookedCLIP, data: TaskSet, options: Options, *, checkpoints=None, progress: bool = True) -> Tables:
    """tasks (pairs kept and excluded, whether there are images), selectivity (every head's a^N per
    task), selectivity_correlation (Spearman between every two tasks), localisation (per layer, tasks
    with images), ablation (each task's top_k heads against random heads), about (the tasks in words),
    stages (seconds per task and stage of this run)."""
    names = [task.name for task in data.tasks]
    if len(names) < 1:
        raise ValueError("give at least one task")
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {names}")
    refuse_if_none_kept([task.pairs for task in data.tasks], what="task")
    parts: dict[str, list] = {"selectivity": [], "localisation": [], "ablation": []}
    counts, stages = [], StageClock()
    for task in tqdm(data.tasks, desc="tasks", disable=not progress):
        counts.append({"task": task.name, "pairs": len(task.pairs), "excluded": len(task.pairs.excluded),
                       "images": task.image_emb is not None})
        for key, table in (_one_task(model, task, options, stages) if len(task.pairs) else {}).items():
            parts[key].append(table.assign(task=task.name))
    tables = {"tasks": pd.DataFrame(counts), "stages": stages.table()}
    for key in ("selectivity", "localisation", "ablation"):
        tables[key] = pd.concat(parts[key], ignore_index=True) if parts[key] else pd.DataFrame()
        if key == "selectivity":
            tables["selectivity_correlation"] = _correlations(tables["selectivity"])
    tables["about"] = pd.DataFrame({"description": [data.description]})
    return tables


class StageClock:
    """Seconds per (task, stage) of a run, for the stage table every run ends with."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @contextmanager
    def stage(self, task: str, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.rows.append({"task": task, "stage": name, "seconds": time.perf_counter() - start})

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["task", "stage", "seconds"])


def _one_task(model: HookedCLIP, task: TaskInput, options: Options, clock: StageClock) -> dict[str, pd.DataFrame]:
    """One task's selectivity, and with images its localisation and head ablation, each stage timed."""
    with clock.stage(task.name, "selectivity"):
        heads = pair_tasks.head_table(model, task)
    if task.image_emb is None:
        return {"selectivity": heads}
    with clock.stage(task.name, "causal tracing"):
        traced = minimal_pairs.trace(model, task.pairs, task.image_emb, task.marked, progress=False).frame()
    with clock.stage(task.name, "head ablation"):
        ablation = head_interventions.intervention_study(model, task.pairs, task.image_emb,
                                                         pair_tasks.top_heads(heads, options.top_k),
                                                         random_seeds=options.random_seeds)
    return {"selectivity": heads, "localisation": pair_tasks.localisation(traced), "ablation": ablation}


def stage_summary(stages: pd.DataFrame) -> pd.DataFrame:
    """Seconds and share of the run per stage, summed over the tasks (largest first)."""
    totals = stages.groupby("stage", sort=False)["seconds"].sum().sort_values(ascending=False)
    return pd.DataFrame({"stage": totals.index, "seconds": totals.to_numpy().round(1),
                         "share": (totals / totals.sum()).to_numpy().round(3) if totals.sum() else 0.0})


@dataclass(frozen=True)
class TaskSources:
    """Where a comparison's tasks come from.

    Attributes:
        valse: the folder with VALSE's pieces (<piece>.json); pieces: which (default: all eleven).
        images: the folder with VALSE's image files; generated_images: noise images made per image
            file instead (to run the machinery without the image set; scores against them mean
            nothing). Either way each file is encoded once, however many pairs and pieces show it.
        cannot: CANNOT .tsv files or folders; spacy_model: the spaCy pipeline of CANNOT's parse.
        pairs_files: a user's minimal-pair files (CSV or JSONL: caption, foil and maybe image).
    """

    valse: Optional[Union[str, Path]] = None
    pieces: Optional[Sequence[str]] = None
    images: Optional[Union[str, Path]] = None
    generated_images: bool = False
    cannot: Optional[Sequence[Union[str, Path]]] = None
    spacy_model: str = "en_core_web_sm"
    pairs_files: Sequence[Union[str, Path]] = ()


def build_tasks(model: HookedCLIP, sources: TaskSources, *, limit: Optional[int] = None, seed: int = 0,
                progress: bool = True) -> list[TaskInput]:
    """The tasks of a comparison: VALSE pieces (existence through its rephrasing, the negated sentence
    marked; the others with the foil marked), CANNOT (the negated sentence marked, no images) and
    a user's pairs files (the foil marked, their own images); the first `limit` pairs of each.

    VALSE's images come from `sources.images` (a pair whose file is missing there is excluded with
    that reason), or, with `generated_images`, are noise images made per image file from `seed`;
    each file is encoded once for all the pieces (`ImageEmbeddings`)."""
    from clip_lens.data import cannot_pairs, read_pairs_file

    def tokenize(texts):
        return model.to_tokens(texts, trim=False)

    tasks = _valse_tasks(model, sources, limit, seed) if sources.valse is not None else []
    if sources.cannot:
        found = _limited(cannot_pairs(sources.cannot, tokenize, spacy_model=sources.spacy_model, progress=progress), limit)
        tasks.append(TaskInput("cannot", found, "a", None))
    for path in sources.pairs_files:
        found = _limited(read_pairs_file(path, tokenize), limit)
        if found.pairs["image"].isna().any():
            tasks.append(TaskInput(found.name, found, "b", None))
        else:
            tasks.append(TaskInput(found.name, found, "b", encode_images(model, list(found.pairs["image"]), progress=False)))
    if not tasks:
        raise ValueError("no task: give --valse, --cannot or --pairs")
    return tasks


class ImageEmbeddings:
    """Image embeddings by file, each file encoded the first time a task asks for it: VALSE's pieces
    share many images (6,813 files for 8,782 instances), and a piece may show one image in several
    pairs. With `generated`, a file's stand-in is noise seeded by (`seed`, file name), so pairs and
    pieces that share an image share its stand-in, as they would share the real image."""

    def __init__(self, model: HookedCLIP, generated: bool, seed: int = 0, batch_size: int = 32):
        self.model, self.generated, self.seed, self.batch_size = model, generated, seed, batch_size
        self._by_file: dict[str, Tensor] = {}
        self.encoded = 0  # files encoded so far

    def __call__(self, files: Sequence[str]) -> Optional[Float[Tensor, "n d_embed"]]:
        """[len(files), d_embed], row i the embedding of files[i] (None for no file)."""
        files = [str(f) for f in files]
        new = [f for f in dict.fromkeys(files) if f not in self._by_file]
        for lo in range(0, len(new), self.batch_size):
            batch = new[lo : lo + self.batch_size]
            images = torch.stack([self.noise(f) for f in batch]).to(self.model.vision.device) if self.generated else batch
            self._by_file.update(zip(batch, encode_images(self.model, images, batch_size=self.batch_size, progress=False)))
        self.encoded += len(new)
        return torch.stack([self._by_file[f] for f in files]) if files else None

    def noise(self, file: str) -> Float[Tensor, "3 height width"]:
        """The stand-in of one image file: standard normal pixels (clamped at 2.5) from a generator
        seeded by the SHA-256 of (seed, file name)."""
        key = int.from_bytes(hashlib.sha256(f"{self.seed}:{file}".encode()).digest()[:8], "little") >> 1
        generator = torch.Generator().manual_seed(key)
        return torch.randn(3, *self.model.vision.cfg.image_size, generator=generator).clamp(-2.5, 2.5)


def _valse_tasks(model: HookedCLIP, sources: TaskSources, limit: Optional[int], seed: int) -> list[TaskInput]:
    """One task per VALSE piece, with image embeddings [pairs, d_embed] of its images or of noise."""
    from clip_lens.data import VALSE_PIECES, valse_existence_pairs, valse_pairs

    if sources.images is None and not sources.generated_images:
        raise ValueError("VALSE tasks need their images: give --images (the image folder) or --generated-images")
    embeddings = ImageEmbeddings(model, sources.generated_images, seed)
    tasks = []
    for piece in sources.pieces or VALSE_PIECES:
        path = Path(sources.valse) / f"{piece}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no VALSE piece {piece!r} in {sources.valse} ({path})")
        tokenize = lambda texts: model.to_tokens(texts, trim=False)  # noqa: E731
        found = valse_existence_pairs(path, tokenize) if piece == "existence" else valse_pairs(path, tokenize)
        found = _limited(_with_images(found, sources.images) if sources.images is not None else found, limit)
        emb = embeddings(list(found.pairs["image"]))
        marked = minimal_pairs.existence_marked(found) if piece == "existence" else "b"
        tasks.append(TaskInput(f"valse/{piece}", found, marked, emb))
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


def report(tables: Tables, options: Options) -> Report:
    out = Report("Comparing tasks")
    description = tables["about"]["description"].iloc[0] if "about" in tables else ""
    out.section("Tasks").text(description or "Minimal-pair tasks side by side.")
    out.table(tables["tasks"], caption="Pairs kept and excluded per task")
    if not tables["selectivity"].empty:
        _selectivity_section(out, tables)
    _ablation_sections(out, tables)
    return out


def _selectivity_section(report: Report, tables: Tables) -> None:
    selectivity = tables["selectivity"]
    report.section("Which heads are selective for the differing tokens")
    report.figure(_selectivity_figure(selectivity))
    top = selectivity.sort_values("a_N", ascending=False).groupby("task", sort=False).head(3)
    report.table(top[["task", "layer", "head", "a_N", "instances"]], caption="The three most selective heads per task")
    report.figure(correlation_figure(tables["selectivity_correlation"]))


def correlation_figure(correlation: pd.DataFrame) -> go.Figure:
    """Spearman correlation of head selectivity between tasks, the value written in each cell at a
    readable size. `correlation`: task_a, task_b, spearman."""
    grid = correlation.pivot(index="task_a", columns="task_b", values="spearman")
    fig = px.imshow(grid, zmin=-1, zmax=1, color_continuous_scale=DIVERGING, text_auto=".2f",
                    labels=dict(color="Spearman", x="", y=""))
    return style(fig, "Spearman correlation of head selectivity between tasks", height=heatmap_height(len(grid), 60))


def _ablation_sections(report: Report, tables: Tables) -> None:
    if not tables["localisation"].empty:
        report.section("Causal-tracing localisation per layer").text(
            "Per layer, the spread (standard deviation) of the mean causal-tracing effect over the differing span, "
            "the three positions after it and EOT: high where one position carries the effect.")
        fig = px.line(tables["localisation"], x="layer", y="localisation", color="task", markers=True)
        layer_axis(fig, "x", tables["localisation"]["layer"].nunique())
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


def _selectivity_figure(selectivity: pd.DataFrame) -> go.Figure:
    tasks = list(dict.fromkeys(selectivity["task"]))
    fig = px.imshow(np.stack([selectivity[selectivity["task"] == t].pivot(index="layer", columns="head", values="a_N")
                              .sort_index().to_numpy() for t in tasks]),
                    facet_col=0, facet_col_wrap=min(4, len(tasks)), color_continuous_scale=DIVERGING,
                    zmin=-1, zmax=1, labels=dict(color="a^N", x="head", y="layer"))
    for annotation, task in zip(fig.layout.annotations, tasks):
        annotation.text = task
    layer_axis(fig, "y", selectivity["layer"].nunique())
    return style(fig, "Selectivity a^N per head and task", height=320 * ((len(tasks) + 3) // 4))


STUDY = Study("compare-tasks", Options, compute, report, data="a TaskSet (build_tasks)")
