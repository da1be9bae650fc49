"""Where a sweep keeps its results: one folder per task with its tables as Parquet, and a manifest.

    out/tasks/<task id>/<table>.parquet    each written under a unique temporary name, then renamed
    out/tasks/<task id>/task.json          the task's full configuration (what its id hashes)
    out/manifest.sqlite                    one row per task: status, attempts, timings, peak memory,
                                           host, error, and its tables with the SHA-256 of each file
    out/.sweep.lock                        held by the one process writing the folder (`output_lock`)

The manifest is SQLite: it comes with Python (nothing to install), every update is a transaction
(a killed driver leaves the last committed state, never half a file), and it can be queried with
any SQLite tool. Only the driver writes it, and only one driver at a time writes a folder.

A table counts only when its file's SHA-256 equals the one the manifest recorded: a rerun recomputes
a task whose table is missing or changed (`Manifest.verify`), and `load` reads only the tables the
manifest lists, refusing a damaged one by name.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import socket
import sqlite3
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import pandas as pd

from clip_lens.model_sources import file_digest
from clip_lens.report import write_atomically, write_text_atomically

MANIFEST = "manifest.sqlite"
LOCK = ".sweep.lock"
REPAIR = "rerun the sweep (clip-lens sweep SPEC): it recomputes every task whose tables are missing or damaged"


class StorageError(RuntimeError):
    """A sweep's stored files are damaged or in use; the message names the file and what to do."""


class SweepLocked(StorageError):
    """Another live process is writing the sweep's output folder."""


@dataclass(frozen=True)
class Task:
    """One (model, dataset, study) with its full configuration; `task_id` hashes its identity
    (`identify`)."""

    model: str
    dataset: str
    study: str
    config: dict
    task_id: str


def identify(identity: dict) -> str:
    """16 hex digits of the SHA-256 of the identity's canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_folder(out: Union[str, Path], task: Union[Task, str]) -> Path:
    return Path(out) / "tasks" / (task.task_id if isinstance(task, Task) else task)


def write_table(path: Path, frame: pd.DataFrame) -> str:
    """`frame` as Parquet at `path`, written whole under a unique temporary name and renamed into
    place; returns the SHA-256 of the bytes written (what the manifest records)."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    data = buffer.getvalue()
    write_atomically(path, lambda handle: handle.write(data), binary=True)
    return hashlib.sha256(data).hexdigest()


def write_task_tables(out: Union[str, Path], task: Task, tables: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Each table with the task's columns (task_id, model, dataset, study) first; returns each
    table's name with its file's SHA-256."""
    folder = task_folder(out, task)
    digests = {}
    for name, table in sorted(tables.items()):
        labelled = table.copy()
        for i, (column, value) in enumerate((("task_id", task.task_id), ("model", task.model),
                                             ("dataset", task.dataset), ("study", task.study))):
            if column in labelled:
                labelled = labelled.drop(columns=column)
            labelled.insert(i, column, value)
        digests[name] = write_table(folder / f"{name}.parquet", labelled)
    write_text_atomically(folder / "task.json", json.dumps(task.config, indent=1, sort_keys=True, default=str))
    return digests


def remove_temporary_files(out: Union[str, Path]) -> list[Path]:
    """Delete the temporary files (".*.tmp") a killed process left in the task folders; call it only
    while holding the folder's lock (no other writer can be mid-write)."""
    left = sorted((Path(out) / "tasks").glob("*/.*.tmp"))
    for path in left:
        path.unlink(missing_ok=True)
    return left


def recorded_tables(tables: Optional[str]) -> dict[str, Optional[str]]:
    """The manifest's `tables` cell: each table name with its SHA-256 (None where an older manifest
    recorded the name only)."""
    value = json.loads(tables or "{}")
    return dict.fromkeys(value) if isinstance(value, list) else value


def table_problem(path: Path, digest: Optional[str]) -> Optional[str]:
    """Why the table at `path` cannot be trusted ("missing", "does not match ..."), or None."""
    if not path.is_file():
        return "is missing"
    if digest is None:
        return "has no checksum in the manifest (written by an older clip_lens)"
    if file_digest(path) != digest:
        return "does not match the SHA-256 recorded in the manifest (truncated or changed since it was written)"
    return None


# --- one writer per output folder ----------------------------------------------------------------
@contextmanager
def output_lock(out: Union[str, Path]) -> Iterator[Path]:
    """Hold out/.sweep.lock for the block: one process writes a sweep folder at a time.

    The lock is an exclusive `fcntl.flock` on the file, not a file created with O_EXCL: the kernel
    drops a flock when its process ends however it ends (kill -9 included), so a dead holder never
    leaves a stale lock to judge by PID and host, and a reused PID cannot keep one alive. The file
    holds the holder's host, PID, start time and command, to name it when another run is refused.
    It is removed on release (exit, exception, Ctrl-C); a killed holder's file is simply taken over.
    """
    path = Path(out) / LOCK
    fd = _acquire(path)
    try:
        yield path
    finally:
        _release(path, fd)


def _acquire(path: Path) -> int:
    """An open descriptor of `path` holding its flock, with this process written in as the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SweepLocked(f"{path.parent} is being written by another sweep ({lock_holder(path)}). One "
                              "process writes a sweep folder at a time: wait for that one to finish, or stop "
                              "it, then run this again (its lock ends with its process)") from None
        except OSError as error:
            os.close(fd)
            raise StorageError(f"cannot lock {path}: {error}; the file system of the output folder must "
                               "support file locks (flock)") from None
        if _same_file(fd, path):  # not a file its last holder removed while we waited to lock it
            break
        os.close(fd)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _release(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it, then close it (which drops the flock)."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def lock_holder(path: Path) -> str:
    """The holder recorded in a lock file, in words."""
    for _ in range(20):  # the holder writes itself in just after taking the lock
        try:
            holder = json.loads(path.read_text() or "null")
        except (OSError, ValueError):
            holder = None
        if holder:
            return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}: "
                    f"{holder.get('command')}")
        time.sleep(0.05)
    return f"a process that has not yet written itself into {path}"


# --- the manifest --------------------------------------------------------------------------------
class Manifest:
    """The sweep's task table in out/manifest.sqlite."""

    def __init__(self, out: Union[str, Path]):
        self.out = Path(out)
        self.path = self.out / MANIFEST
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS tasks (task_id TEXT PRIMARY KEY, model TEXT, dataset TEXT, study TEXT, "
                       "status TEXT, attempts INTEGER, started REAL, finished REAL, seconds REAL, peak_rss_mb REAL, "
                       "host TEXT, worker TEXT, model_loads INTEGER, error TEXT, tables TEXT, config TEXT)")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection in a transaction (committed on success); a damaged manifest is named with
        what to do instead of sqlite3's traceback."""
        try:
            with closing(sqlite3.connect(self.path, timeout=30)) as db, db:
                yield db
        except sqlite3.DatabaseError as error:
            if "locked" in str(error):
                raise StorageError(f"{self.path} stayed locked by another process for 30 s ({error})") from None
            raise StorageError(f"{self.path} is not a readable sweep manifest ({error}). Move it aside and rerun "
                               "the sweep: every task then runs again and rewrites its tables") from None

    def _done_rows(self, task_ids: Optional[Iterable[str]] = None) -> list[tuple]:
        with self._db() as db:
            rows = db.execute("SELECT task_id, model, dataset, study, tables FROM tasks WHERE status = 'done' "
                              "ORDER BY model, dataset, study, task_id").fetchall()
        wanted = None if task_ids is None else set(task_ids)
        return [row for row in rows if wanted is None or row[0] in wanted]

    def verify(self, task_ids: Optional[Iterable[str]] = None) -> tuple[set[str], list[str]]:
        """(the tasks recorded done whose tables all match their checksums, one line per task
        whose tables do not: which table, missing or mismatched). `task_ids`: only these."""
        good, problems = set(), []
        for task_id, model, dataset, study, tables in self._done_rows(task_ids):
            found = [f"{path} {problem}" for name, digest in recorded_tables(tables).items()
                     if (problem := table_problem(path := task_folder(self.out, task_id) / f"{name}.parquet", digest))]
            if found:
                problems.append(f"task {model} / {dataset} / {study} ({task_id}): table " + "; ".join(found))
            else:
                good.add(task_id)
        return good, problems

    def done(self) -> set[str]:
        """Tasks recorded done whose tables all match their checksums (`verify`)."""
        return self.verify()[0]

    def start(self, task: Task, worker: str = "") -> None:
        with self._db() as db:
            db.execute("INSERT INTO tasks (task_id, model, dataset, study, status, attempts, started, worker, config) "
                       "VALUES (?, ?, ?, ?, 'running', 1, ?, ?, ?) ON CONFLICT(task_id) DO UPDATE SET status='running', "
                       "attempts=attempts + 1, started=excluded.started, worker=excluded.worker, error=NULL",
                       (task.task_id, task.model, task.dataset, task.study, time.time(), worker,
                        json.dumps(task.config, sort_keys=True, default=str)))

    def finish(self, task: Task, record: dict) -> None:
        """Record a task's outcome: `record` from `clip_lens.sweep.executors.run_task`, whose
        "tables" maps each table to its SHA-256."""
        with self._db() as db:
            db.execute("UPDATE tasks SET status=?, finished=?, seconds=?, peak_rss_mb=?, host=?, worker=?, model_loads=?, "
                       "error=?, tables=?, attempts=MAX(attempts, ?) WHERE task_id=?",
                       (record["status"], time.time(), record.get("seconds"), record.get("peak_rss_mb"),
                        record.get("host"), record.get("worker", ""), record.get("model_loads"), record.get("error"),
                        json.dumps(record.get("tables") or {}, sort_keys=True), record.get("attempts", 1), task.task_id))

    def frame(self, task_ids: Optional[Iterable[str]] = None) -> pd.DataFrame:
        """Every task's row (any status); `task_ids`: only these."""
        with self._db() as db:
            frame = pd.read_sql_query("SELECT * FROM tasks ORDER BY model, dataset, study", db)
        if task_ids is not None:
            frame = frame[frame["task_id"].isin(set(task_ids))]
        return frame.reset_index(drop=True)


def load(out: Union[str, Path], tasks: Optional[Iterable[str]] = None) -> dict[str, pd.DataFrame]:
    """Every table of a sweep's finished tasks, one long DataFrame per table name (with columns
    task_id, model, dataset, study), plus "manifest" (every task's row, failed ones included).
    `tasks`: only these task ids. Only the tables the manifest lists are read (a stray file in a
    task folder is not), each checked against its recorded SHA-256; a damaged or missing one is
    refused by name (`StorageError`): rerun the sweep to recompute its task."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise FileNotFoundError(f"{out} holds no sweep (no {MANIFEST})")
    manifest = Manifest(out)
    tasks = None if tasks is None else set(tasks)
    done, problems = manifest.verify(tasks)
    if problems:
        raise StorageError(f"{out}: " + "\n".join(problems) + f"\nTo repair: {REPAIR}")
    parts: dict[str, list[pd.DataFrame]] = {}
    for task_id, _, _, _, tables in manifest._done_rows(done):
        for name in sorted(recorded_tables(tables)):
            parts.setdefault(name, []).append(pd.read_parquet(task_folder(out, task_id) / f"{name}.parquet"))
    frames = {name: pd.concat(frames, ignore_index=True).sort_values(["model", "dataset", "study"], kind="stable")
              .reset_index(drop=True) for name, frames in sorted(parts.items())}
    frames["manifest"] = manifest.frame(tasks)
    return frames
