"""Running a sweep's tasks: in this process, one after another (`local`), or on Ray workers that
each keep their loaded model for the next task of the same model (`ray`).

Both call `run_task`, which runs one task, writes its tables and returns a record for the
manifest; a task that raises is recorded with its error and the sweep goes on. On Ray a worker
process that dies is restarted, and its task retried, up to `spec.retries` times. A task's warnings
are shown once each, prefixed with the task, however often its study raised them. Ctrl-C records
the running tasks as interrupted and propagates; a Ray instance started for the run is shut down.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
import warnings
from collections import deque
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator, Optional

from tqdm.auto import tqdm

from clip_lens.report import write_text_atomically
from clip_lens.sweep.spec import Entry
from clip_lens.sweep.storage import Manifest, StorageError, Task, task_folder, write_task_tables

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
    attempts = _read_count(counter) + 1
    write_text_atomically(counter, str(attempts))  # a kill never leaves half a count behind
    return attempts


def _read_count(counter: Path) -> int:
    """The count in a task's .attempts file (0 when there is none)."""
    if not counter.is_file():
        return 0
    text = counter.read_text(errors="replace").strip()
    if not text.isdigit():
        raise StorageError(f"{counter} holds {text[:40]!r}, not a count of attempts: delete it (the task's count "
                           "restarts at 1) and rerun the sweep")
    return int(text)


@contextmanager
def warnings_once(label: str) -> Iterator[None]:
    """Collect the block's warnings and show each distinct one once, prefixed with `label` (a study
    that tokenizes several times would otherwise repeat, for example, a truncation warning per call).
    Shown through the caller's filters, so an "ignore" or "error" filter still applies."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen = set()
    for warning in caught:
        key = (warning.category, str(warning.message))
        if key not in seen:
            seen.add(key)
            warnings.warn_explicit(f"{label}: {warning.message}", warning.category, warning.filename, warning.lineno)


def _failed(record: Record, error: BaseException) -> Record:
    return {**record, "status": "failed", "error": f"{type(error).__name__}: {error}", "tables": {}}


def run_task(task: Task, out: Path, cache: ModelCache, worker: str = "local", threads: Optional[int] = None) -> Record:
    """Run one task; never raises for the task's own errors (they are returned in the record)."""
    import torch

    from clip_lens.sweep.studies import as_plain, run_study

    record: Record = {"task_id": task.task_id, "host": socket.gethostname(), "worker": worker, "attempts": 1}
    try:
        record["attempts"] = _attempt(out, task)
    except StorageError as error:  # a damaged counter: the task fails, naming the file and the fix
        return _failed(record, error)
    marker = task.config["study"]["options"].get("crash_once_marker")
    if marker and not Path(marker).exists():  # fault injection for tests: the process dies, once
        Path(marker).write_text(f"{task.task_id} crashed its worker (pid {os.getpid()}) on purpose\n")
        os._exit(3)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        with warnings_once(_label(task)):
            model = cache.get(Entry(task.model, task.config["model"]["options"]))
            tables = run_study(model, Entry(task.dataset, task.config["dataset"]["options"]),
                               Entry(task.study, task.config["study"]["options"]))
        record["tables"] = write_task_tables(out, task, {name: as_plain(t) for name, t in tables.items()})
        record["status"] = "done"
    except Exception as error:  # noqa: BLE001 - recorded with its type; the sweep goes on
        record = _failed(record, error)
    record["seconds"] = time.perf_counter() - start
    record["model_loads"] = cache.loads  # models this worker has loaded so far
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak so far
    return record


INTERRUPTED = {"status": "interrupted", "error": "KeyboardInterrupt: the run was stopped (Ctrl-C) during this task",
               "tables": {}}


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
            try:
                record = run_task(task, out, cache, "local", threads)
            except KeyboardInterrupt:
                manifest.finish(task, {**INTERRUPTED, "worker": "local"})
                raise
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
    resources = resources or {}
    cpus, gpus = resources.get("cpus", 1), resources.get("gpus", 0)
    with ray_session(address) as ray:
        options = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=retries, max_task_retries=retries)
        if resources.get("memory_gb"):
            options["memory"] = int(resources["memory_gb"] * 2**30)
        Worker = ray.remote(**options)(_Worker)
        n_workers = max(1, min(len(tasks), workers or ray_capacity(ray, cpus, gpus)))
        actors = [Worker.remote(str(out), int(cpus) if cpus >= 1 else 1) for _ in range(n_workers)]
        return _dispatch(ray, actors, tasks, manifest, progress)


@contextmanager
def ray_session(address: Optional[str] = None) -> Iterator:
    """Ray, initialised: a local instance started here (and shut down, its processes reaped,
    however the block ends: an exception, Ctrl-C) or the cluster at `address`; a session already
    open in this process is used as it is."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("this needs Ray: pip install 'clip_lens[ray]'") from None
    started_here = not ray.is_initialized()
    with _ray_reaper(enabled=started_here and not address) as watch:
        try:
            if started_here:
                kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
                if address:
                    kwargs["address"] = address
                ray.init(**kwargs)
            watch()
            yield ray
        finally:
            if started_here:
                ray.shutdown()


def ray_capacity(ray, cpus: float, gpus: float = 0) -> int:
    """How many workers of `cpus` CPUs (and `gpus` GPUs) the cluster holds at once."""
    capacity = int(ray.cluster_resources().get("CPU", 1) // max(cpus, 1e-9))
    if gpus:
        capacity = min(capacity, int(ray.cluster_resources().get("GPU", 0) // gpus))
    return capacity


# Run as its own process beside a driver that started a local Ray instance: it reads the PIDs of
# Ray's processes, and if the driver's end of the pipe closes without "done" (the driver was killed
# and shut nothing down), it kills those still running a Ray program. Ray's raylet and GCS die with
# the driver on their own, but its dashboard and runtime-env agents do not.
REAPER = """
import os, signal, sys
pids = set()
for line in sys.stdin:
    if line.strip() == "done":
        sys.exit(0)
    pids.update(int(pid) for pid in line.split())
for pid in pids:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if b"ray" in cmdline.read():
                os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def _descendants(root: int) -> set[int]:
    """The PIDs of every process below `root` (from /proc; empty where there is none)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@contextmanager
def _ray_reaper(enabled: bool) -> Iterator[Callable[[], None]]:
    """Yield `watch()`, which hands the reaper (`REAPER`) the PIDs of the processes this driver has
    started so far; on a normal end (an exception and Ctrl-C included) the reaper is told "done"."""
    if not enabled or not Path("/proc").is_dir():
        yield lambda: None
        return
    reaper = subprocess.Popen([sys.executable, "-c", REAPER], stdin=subprocess.PIPE, text=True, start_new_session=True)

    def send(line: str) -> None:
        try:
            reaper.stdin.write(line + "\n")
            reaper.stdin.flush()
        except OSError:  # the reaper is gone; nothing to hand over
            pass

    try:
        yield lambda: send(" ".join(map(str, _descendants(os.getpid()) - {reaper.pid})))
    finally:
        send("done")
        with suppress(OSError):
            reaper.stdin.close()
        reaper.wait(timeout=30)


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
    try:
        while running:
            bar.set_postfix_str("; ".join(f"w{i}: {label}" for i, label in sorted(doing.items())))
            ready, _ = ray.wait(list(running), num_returns=1)
            i, task = running.pop(ready[0])
            doing.pop(i, None)
            try:
                record = ray.get(ready[0])
            except ray.exceptions.RayError as error:  # the worker died more often than it may be restarted
                record = {"task_id": task.task_id, "status": "failed", "worker": f"worker {i}", "tables": {},
                          "error": f"{type(error).__name__}: worker lost ({str(error).splitlines()[0][:300]})"}
            manifest.finish(task, record)
            records.append(record)
            bar.update(1)
            assign(i)
    except KeyboardInterrupt:
        for i, task in running.values():
            manifest.finish(task, {**INTERRUPTED, "worker": f"worker {i}"})
        raise
    finally:
        bar.close()
    return records

