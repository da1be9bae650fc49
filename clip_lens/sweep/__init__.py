"""Sweeps over models x datasets x studies: in this process by default, on a Ray cluster when asked;
results that survive a kill; one cross-model report (docs/sweeps.md).

    result = clip_lens.sweep.run("sweep.toml")                     # executor="local"
    result = clip_lens.sweep.run("sweep.toml", executor="ray")     # a local Ray instance
    tables = clip_lens.sweep.load("runs/sweep")                    # one long DataFrame per table

- `spec`: the TOML spec, checked entry by entry;
- `storage`: task ids, Parquet tables written atomically with their checksums, the SQLite manifest,
  the output folder's lock, `load`;
- `executors`: `run_task`, the local and Ray executors;
- `studies`: what a task runs (the only library module besides the CLI that drives the studies);
- `report`: the cross-model report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import pandas as pd

from clip_lens.sweep.spec import Spec, SpecError, read_spec
from clip_lens.sweep.storage import Manifest, StorageError, SweepLocked, Task, identify, load, output_lock, remove_temporary_files

EXECUTORS = ("local", "ray")
__all__ = ["run", "load", "plan", "read_spec", "Spec", "SpecError", "Task", "SweepResult", "StorageError", "SweepLocked",
           "EXECUTORS"]


def plan(spec: Spec) -> list[Task]:
    """Every (model, dataset, study) task, tasks of one model consecutive. A task's id hashes its
    whole configuration: the clip_lens version, the model entry and its weights' digest, the
    dataset entry and its data's digest, the study with its options (a test's crash marker
    excluded) and the thread count."""
    from clip_lens import __version__
    from clip_lens.sweep.studies import data_digest, weights_digest

    data = {dataset.name: data_digest(dataset) for dataset in spec.datasets}
    tasks = []
    for model in spec.models:
        digest = weights_digest(model)
        for dataset in spec.datasets:
            for study in spec.studies:
                identity = {"clip_lens": __version__, "model": {"name": model.name, "options": model.options, "weights": digest},
                            "dataset": {"name": dataset.name, "options": dataset.options, "data": data[dataset.name]},
                            "study": {"name": study.name, "options": {k: v for k, v in study.options.items()
                                                                       if k != "crash_once_marker"}},
                            "threads": spec.resources.get("cpus")}
                config = {**identity, "study": {"name": study.name, "options": study.options}}
                tasks.append(Task(model.name, dataset.name, study.name, config, identify(identity)))
    return tasks


@dataclass
class SweepResult:
    """What a run did: tasks in the spec, skipped (already done, tables verified), ran, failed (a
    frame with each task not done at the end: its status and error), wall seconds, the manifest
    rows of the spec's tasks, and one line per task rerun because a table was missing or damaged."""

    tasks: int
    skipped: int
    ran: int
    failed: pd.DataFrame
    seconds: float
    manifest: pd.DataFrame
    report: Optional[Path] = None
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed.empty

    def summary(self) -> str:
        text = (f"{self.tasks} tasks: {self.skipped} already done, {self.ran} run, {len(self.failed)} failed "
                f"({self.seconds:.1f} s)")
        for line in self.repaired:
            text += f"\n  rerun, its tables did not verify: {line}"
        for row in self.failed.itertuples():
            error = "no error recorded" if pd.isna(row.error) else row.error
            outcome = "failed" if row.status == "failed" else f"not finished ({row.status})"
            text += f"\n  {outcome}: {row.model} / {row.dataset} / {row.study} ({row.task_id}): {error}"
        return text


def run(spec: Union[str, Path, Spec], executor: str = "local", *, ray_address: Optional[str] = None,
        workers: Optional[int] = None, report: bool = True, progress: bool = True) -> SweepResult:
    """Run the spec's tasks that are not done yet (missing, failed, changed since, or whose tables
    no longer match their checksums), then write out/report.html over all of the spec's tasks.
    One process writes an output folder at a time: while another holds its lock, this raises
    `SweepLocked` naming the holder.

    Args:
        executor: "local" (in this process, one task after another) or "ray".
        ray_address: with "ray": an existing cluster ("auto" or "host:port"); None starts a local
            Ray instance for the run.
        workers: with "ray": at most this many workers (default: as many as the resources allow).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r}: use one of {EXECUTORS}")
    if executor == "local" and (ray_address is not None or workers is not None):
        given = "ray_address" if ray_address is not None else "workers"
        raise ValueError(f"{given} is for the ray executor; the local one runs its tasks in this process, one at a time")
    spec = spec if isinstance(spec, Spec) else read_spec(spec)
    with output_lock(spec.out):
        return _run_locked(spec, executor, dict(address=ray_address, workers=workers), report, progress)


def _run_locked(spec: Spec, executor: str, ray_options: dict, report: bool, progress: bool) -> SweepResult:
    """`run` while holding the output folder's lock."""
    from clip_lens.sweep import executors

    start = time.perf_counter()
    tasks = plan(spec)
    ids = [task.task_id for task in tasks]
    remove_temporary_files(spec.out)  # left by a killed run; no one else writes here now
    manifest = Manifest(spec.out)
    done, damaged = manifest.verify(ids)
    todo = [task for task in tasks if task.task_id not in done]
    if executor == "local":
        executors.run_local(todo, spec.out, manifest, threads=spec.resources.get("cpus"), progress=progress)
    elif todo:
        executors.run_ray(todo, spec.out, manifest, resources=spec.resources, retries=spec.retries, progress=progress,
                          **ray_options)
    rows = manifest.frame(ids)
    failed = rows[rows["status"] != "done"][["task_id", "model", "dataset", "study", "status", "error"]]
    written = None
    if report:
        from clip_lens.sweep.report import write_report

        written = write_report(spec.out, ids)
    return SweepResult(len(tasks), len(tasks) - len(todo), len(todo), failed.reset_index(drop=True),
                       time.perf_counter() - start, rows, written, damaged)
