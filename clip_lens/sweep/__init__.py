"""Sweeps over models x datasets x studies: in this process by default, on a Ray cluster when asked;
results that survive a kill; one cross-model report (docs/sweeps.md).

    result = clip_lens.sweep.run("sweep.toml")                     # executor="local"
    result = clip_lens.sweep.run("sweep.toml", executor="ray")     # a local Ray instance
    tables = clip_lens.sweep.load("runs/sweep")                    # one long DataFrame per table

- `spec`: the TOML spec, checked entry by entry;
- `storage`: task ids, Parquet tables written atomically, the SQLite manifest, `load`;
- `executors`: `run_task`, the local and Ray executors;
- `studies`: what a task runs (the only library module besides the CLI that drives the studies);
- `report`: the cross-model report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import pandas as pd

from clip_lens.sweep.spec import Spec, SpecError, read_spec
from clip_lens.sweep.storage import Manifest, Task, identify, load

EXECUTORS = ("local", "ray")
__all__ = ["run", "load", "plan", "read_spec", "Spec", "SpecError", "Task", "SweepResult", "EXECUTORS"]


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
    """What a run did: tasks in the spec, skipped (already done), ran, failed (a frame with the
    task and its error), wall seconds, and the manifest rows of the spec's tasks."""

    tasks: int
    skipped: int
    ran: int
    failed: pd.DataFrame
    seconds: float
    manifest: pd.DataFrame
    report: Optional[Path] = None

    @property
    def ok(self) -> bool:
        return self.failed.empty

    def summary(self) -> str:
        text = (f"{self.tasks} tasks: {self.skipped} already done, {self.ran} run, {len(self.failed)} failed "
                f"({self.seconds:.1f} s)")
        for row in self.failed.itertuples():
            text += f"\n  failed: {row.model} / {row.dataset} / {row.study} ({row.task_id}): {row.error}"
        return text


def run(spec: Union[str, Path, Spec], executor: str = "local", *, ray_address: Optional[str] = None,
        workers: Optional[int] = None, report: bool = True, progress: bool = True) -> SweepResult:
    """Run the spec's tasks that are not done yet (missing, failed, or changed since), then write
    out/report.html over all of the spec's finished tasks.

    Args:
        executor: "local" (in this process, one task after another) or "ray".
        ray_address: with "ray": an existing cluster ("auto" or "host:port"); None starts a local
            Ray instance for the run.
        workers: with "ray": at most this many workers (default: as many as the resources allow).
    """
    from clip_lens.sweep import executors

    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r}: use one of {EXECUTORS}")
    if executor == "local" and (ray_address is not None or workers is not None):
        given = "ray_address" if ray_address is not None else "workers"
        raise ValueError(f"{given} is for the ray executor; the local one runs its tasks in this process, one at a time")
    spec = spec if isinstance(spec, Spec) else read_spec(spec)
    start = time.perf_counter()
    tasks = plan(spec)
    manifest = Manifest(spec.out)
    done = manifest.done(spec.out)
    todo = [task for task in tasks if task.task_id not in done]
    if executor == "local":
        executors.run_local(todo, spec.out, manifest, threads=spec.resources.get("cpus"), progress=progress)
    elif todo:
        executors.run_ray(todo, spec.out, manifest, address=ray_address, resources=spec.resources,
                          retries=spec.retries, workers=workers, progress=progress)
    ids = [task.task_id for task in tasks]
    rows = manifest.frame(ids)
    failed = rows[rows["status"] != "done"][["task_id", "model", "dataset", "study", "error"]].reset_index(drop=True)
    written = None
    if report:
        from clip_lens.sweep.report import write_report

        written = write_report(spec.out, ids)
    return SweepResult(len(tasks), len(tasks) - len(todo), len(todo), failed, time.perf_counter() - start, rows, written)
