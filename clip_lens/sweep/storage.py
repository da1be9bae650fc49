"""Where a sweep keeps its results: one folder per task with its tables as Parquet, and a manifest.

    out/tasks/<task id>/<table>.parquet    each written under a temporary name, then renamed
    out/tasks/<task id>/task.json          the task's full configuration (what its id hashes)
    out/manifest.sqlite                    one row per task: status, attempts, timings, peak memory,
                                           host, error

The manifest is SQLite: it comes with Python (nothing to install), every update is a transaction
(a killed driver leaves the last committed state, never half a file), and it can be queried with
any SQLite tool. Only the driver writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import pandas as pd

MANIFEST = "manifest.sqlite"

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


def write_table(path: Path, frame: pd.DataFrame) -> None:
    """`frame` as Parquet at `path`, written whole under a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def write_task_tables(out: Union[str, Path], task: Task, tables: dict[str, pd.DataFrame]) -> list[str]:
    """Each table with the task's columns (task_id, model, dataset, study) first; returns their names."""
    folder = task_folder(out, task)
    for name, table in tables.items():
        labelled = table.copy()
        for i, (column, value) in enumerate((("task_id", task.task_id), ("model", task.model),
                                             ("dataset", task.dataset), ("study", task.study))):
            if column in labelled:
                labelled = labelled.drop(columns=column)
            labelled.insert(i, column, value)
        write_table(folder / f"{name}.parquet", labelled)
    tmp = folder / ".task.json.tmp"
    tmp.write_text(json.dumps(task.config, indent=1, sort_keys=True, default=str))
    os.replace(tmp, folder / "task.json")
    return sorted(tables)


class Manifest:
    """The sweep's task table in out/manifest.sqlite."""

    def __init__(self, out: Union[str, Path]):
        self.path = Path(out) / MANIFEST
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS tasks (task_id TEXT PRIMARY KEY, model TEXT, dataset TEXT, study TEXT, "
                       "status TEXT, attempts INTEGER, started REAL, finished REAL, seconds REAL, peak_rss_mb REAL, "
                       "host TEXT, worker TEXT, model_loads INTEGER, error TEXT, tables TEXT, config TEXT)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def done(self, out: Union[str, Path]) -> set[str]:
        """Tasks recorded done whose table files are all still there."""
        with self._connect() as db:
            rows = db.execute("SELECT task_id, tables FROM tasks WHERE status = 'done'").fetchall()
        return {task_id for task_id, tables in rows
                if all((task_folder(out, task_id) / f"{name}.parquet").is_file() for name in json.loads(tables or "[]"))}

    def start(self, task: Task, worker: str = "") -> None:
        with self._connect() as db:
            db.execute("INSERT INTO tasks (task_id, model, dataset, study, status, attempts, started, worker, config) "
                       "VALUES (?, ?, ?, ?, 'running', 1, ?, ?, ?) ON CONFLICT(task_id) DO UPDATE SET status='running', "
                       "attempts=attempts + 1, started=excluded.started, worker=excluded.worker, error=NULL",
                       (task.task_id, task.model, task.dataset, task.study, time.time(), worker,
                        json.dumps(task.config, sort_keys=True, default=str)))

    def finish(self, task: Task, record: dict) -> None:
        """Record a task's outcome: `record` from `clip_lens.sweep.executors.run_task`."""
        with self._connect() as db:
            db.execute("UPDATE tasks SET status=?, finished=?, seconds=?, peak_rss_mb=?, host=?, worker=?, model_loads=?, "
                       "error=?, tables=?, attempts=MAX(attempts, ?) WHERE task_id=?",
                       (record["status"], time.time(), record.get("seconds"), record.get("peak_rss_mb"),
                        record.get("host"), record.get("worker", ""), record.get("model_loads"), record.get("error"),
                        json.dumps(record.get("tables", [])), record.get("attempts", 1), task.task_id))

    def frame(self, task_ids: Optional[Iterable[str]] = None) -> pd.DataFrame:
        with self._connect() as db:
            frame = pd.read_sql_query("SELECT * FROM tasks ORDER BY model, dataset, study", db)
        if task_ids is not None:
            frame = frame[frame["task_id"].isin(set(task_ids))]
        return frame.reset_index(drop=True)


def load(out: Union[str, Path], tasks: Optional[Iterable[str]] = None) -> dict[str, pd.DataFrame]:
    """Every table of a sweep's finished tasks, one long DataFrame per table name (with columns
    task_id, model, dataset, study), plus "manifest". `tasks`: only these task ids."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise FileNotFoundError(f"{out} holds no sweep (no {MANIFEST})")
    manifest = Manifest(out)
    done = manifest.done(out)
    if tasks is not None:
        done &= set(tasks)
    parts: dict[str, list[pd.DataFrame]] = {}
    for task_id in sorted(done):
        for path in sorted(task_folder(out, task_id).glob("*.parquet")):
            parts.setdefault(path.stem, []).append(pd.read_parquet(path))
    tables = {name: pd.concat(frames, ignore_index=True).sort_values(["model", "dataset", "study"], kind="stable")
              .reset_index(drop=True) for name, frames in sorted(parts.items())}
    tables["manifest"] = manifest.frame(done if tasks is not None else None)
    return tables
