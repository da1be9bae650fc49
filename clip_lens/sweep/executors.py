"""Running a sweep's tasks: in this process, one after another (`local`), or on Ray workers that
each keep their loaded model for the next task of the same model (`ray`).

Both call `run_task`, which runs one task, writes its tables and returns a record for the
manifest; a task that raises is recorded with its error and the sweep goes on. On Ray a worker
process that dies is restarted, and its task retried, up to `spec.retries` times.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from clip_lens.sweep.spec import Entry
from clip_lens.sweep.storage import Manifest, Task, task_folder, write_task_tables

Record = dict


class ModelCache:
    """The last model loaded (one at a time: a worker moves on to another model only when the
    tasks of this one are done)."""

    def __init__(self) -> None:
        self.key: Optional[str] = None
        self.model = None
        self.loads = 0

    def get(self, entry: Entry):
        from clip_lens.sweep.studies import load_model

        key = json.dumps([entry.name, entry.options], sort_keys=True, default=str)
        if key != self.key:
            self.model, self.key = None, None  # free the previous model before loading the next
            self.model, self.key = load_model(entry), key
            self.loads += 1
        return self.model


def _attempt(out: Path, task: Task) -> int:
    """Count this attempt in the task's folder (so retries by Ray and reruns are both counted)."""
    counter = task_folder(out, task) / ".attempts"
    counter.parent.mkdir(parents=True, exist_ok=True)
    attempts = int(counter.read_text()) + 1 if counter.is_file() else 1
    tmp = counter.with_name(f".attempts.{os.getpid()}.tmp")  # a kill never leaves half a count behind
    tmp.write_text(str(attempts))
    os.replace(tmp, counter)
    return attempts


def run_task(task: Task, out: Path, cache: ModelCache, worker: str = "local", threads: Optional[int] = None) -> Record:
    """Run one task; never raises for the task's own errors (they are returned in the record)."""
    import torch

    from clip_lens.sweep.studies import as_plain, run_study

    attempts = _attempt(out, task)
    marker = task.config["study"]["options"].get("crash_once_marker")
    if marker and not Path(marker).exists():  # fault injection for tests: the process dies, once
        Path(marker).write_text(f"{task.task_id} crashed its worker (pid {os.getpid()}) on purpose\n")
        os._exit(3)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    record: Record = {"task_id": task.task_id, "host": socket.gethostname(), "worker": worker, "attempts": attempts}
    try:
        model = cache.get(Entry(task.model, task.config["model"]["options"]))
        tables = run_study(model, Entry(task.dataset, task.config["dataset"]["options"]),
                           Entry(task.study, task.config["study"]["options"]))
        record["tables"] = write_task_tables(out, task, {name: as_plain(t) for name, t in tables.items()})
        record["status"] = "done"
    except Exception as error:  # noqa: BLE001 - recorded with its type; the sweep goes on
        record.update(status="failed", error=f"{type(error).__name__}: {error}", tables=[])
    record["seconds"] = time.perf_counter() - start
    record["model_loads"] = cache.loads  # models this worker has loaded so far
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak so far
    return record


def _label(task: Task) -> str:
    return f"{task.model}/{task.dataset}/{task.study}"


def run_local(tasks: list[Task], out: Path, manifest: Manifest, *, threads: Optional[int] = None,
              progress: bool = True, on_record: Optional[Callable[[Task, Record], None]] = None) -> list[Record]:
    """Every task in this process, in order (tasks of one model are consecutive), with `threads`
    torch threads (the process's own count is restored afterwards)."""
    import torch

    cache, records, before = ModelCache(), [], torch.get_num_threads()
    bar = tqdm(tasks, desc="sweep", unit="task", disable=not progress)
    try:
        for task in bar:
            bar.set_postfix_str(_label(task))
            manifest.start(task, "local")
            record = run_task(task, out, cache, "local", threads)
            manifest.finish(task, record)
            records.append(record)
            if on_record:
                on_record(task, record)
    finally:
        bar.close()
        torch.set_num_threads(before)
    return records


class _Worker:
    """A Ray actor: runs tasks and keeps its last model loaded between them."""

    def __init__(self, out: str, threads: Optional[int]):
        self.out, self.threads, self.cache = Path(out), threads, ModelCache()

    def run(self, task: Task, worker: str) -> Record:
        return run_task(task, self.out, self.cache, worker, self.threads)


def run_ray(tasks: list[Task], out: Path, manifest: Manifest, *, address: Optional[str] = None,
            resources: Optional[dict] = None, retries: int = 2, workers: Optional[int] = None,
            progress: bool = True) -> list[Record]:
    """Tasks on Ray actors: a local instance (`address` None) or an existing cluster ("auto" or
    "host:port"). Each worker declares `resources` (cpus, default 1; gpus; memory_gb) and runs with
    that many torch threads; it takes the next task of its current model while there is one."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("the ray executor needs Ray: pip install 'clip_lens[ray]'") from None
    resources = resources or {}
    cpus, gpus = resources.get("cpus", 1), resources.get("gpus", 0)
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address:
            kwargs["address"] = address
        ray.init(**kwargs)
    try:
        options = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=retries, max_task_retries=retries)
        if resources.get("memory_gb"):
            options["memory"] = int(resources["memory_gb"] * 2**30)
        Worker = ray.remote(**options)(_Worker)
        capacity = int(ray.cluster_resources().get("CPU", 1) // max(cpus, 1e-9))
        if gpus:
            capacity = min(capacity, int(ray.cluster_resources().get("GPU", 0) // gpus))
        n_workers = max(1, min(len(tasks), workers or capacity))
        actors = [Worker.remote(str(out), int(cpus) if cpus >= 1 else 1) for _ in range(n_workers)]
        return _dispatch(ray, actors, tasks, manifest, progress)
    finally:
        if started_here:
            ray.shutdown()


def _dispatch(ray, actors, tasks: list[Task], manifest: Manifest, progress: bool) -> list[Record]:
    """Give each idle worker the next task of the model it last ran, else one of the model with the
    most tasks left; record every result as it arrives."""
    queues: dict[str, deque] = {}
    for task in tasks:
        queues.setdefault(task.model, deque()).append(task)
    last_model: dict[int, Optional[str]] = {i: None for i in range(len(actors))}
    running: dict = {}
    doing: dict[int, str] = {}
    records: list[Record] = []
    bar = tqdm(total=len(tasks), desc="sweep (ray)", unit="task", disable=not progress)

    def assign(i: int) -> None:
        model = last_model[i] if queues.get(last_model[i]) else max(queues, key=lambda m: len(queues[m]), default=None)
        if model is None or not queues[model]:
            return
        task = queues[model].popleft()
        if not queues[model]:
            del queues[model]
        last_model[i] = task.model
        manifest.start(task, f"worker {i}")
        running[actors[i].run.remote(task, f"worker {i}")] = (i, task)
        doing[i] = _label(task)

    for i in range(len(actors)):
        assign(i)
    while running:
        bar.set_postfix_str("; ".join(f"w{i}: {label}" for i, label in sorted(doing.items())))
        ready, _ = ray.wait(list(running), num_returns=1)
        i, task = running.pop(ready[0])
        doing.pop(i, None)
        try:
            record = ray.get(ready[0])
        except ray.exceptions.RayError as error:  # the worker died more often than it may be restarted
            record = {"task_id": task.task_id, "status": "failed", "worker": f"worker {i}", "tables": [],
                      "error": f"{type(error).__name__}: worker lost ({str(error).splitlines()[0][:300]})"}
        manifest.finish(task, record)
        records.append(record)
        bar.update(1)
        assign(i)
    bar.close()
    return records

