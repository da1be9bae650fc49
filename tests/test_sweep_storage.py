"""A sweep's stored results check themselves: table checksums in the manifest (a damaged table is
rerun, never read), one writer per output folder (a lock naming its holder), damaged manifests and
counters named with what to do, every task in the report, Ctrl-C with one line on how to resume,
and a study's repeated warnings shown once per task."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import pandas as pd
import pytest
from test_sweep import comparable, pairs_file, spec_text, write_spec

from clip_lens import sweep
from clip_lens.cli import main
from clip_lens.sweep.storage import Manifest, Task, write_task_tables

# new in this change, imported where used so that the other tests also run against older code:
# LOCK, StorageError, SweepLocked, file_digest, output_lock

STUDIES = ("accuracy", "selective-heads")
LOCK = ".sweep.lock"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clip_lens.cli", *args]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pairs_file(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A finished, uninterrupted sweep of 4 tasks (the tiny model, two datasets, two studies) and its tables."""
    folder = tmp_path_factory.mktemp("finished")
    spec = write_spec(folder / "s.toml", spec_text(folder / "out", *data, studies=STUDIES))
    assert sweep.run(spec, progress=False).ok
    return folder / "out", comparable(sweep.load(folder / "out"))


def copy_of(finished, tmp_path, data):
    """A copy of the finished sweep in tmp_path/out, with a spec that writes there."""
    shutil.copytree(finished[0], tmp_path / "out")
    return write_spec(tmp_path / "s.toml", spec_text(tmp_path / "out", *data, studies=STUDIES))


def assert_same_tables(out, reference):
    ours = comparable(sweep.load(out))
    assert ours.keys() == reference.keys() == {"accuracy", "pair_scores", "heads"}
    for name in ours:
        pd.testing.assert_frame_equal(ours[name], reference[name], check_exact=True)


def heads_table(out):
    """The heads table of tiny / shapes / selective-heads, and that task's id."""
    row = Manifest(out).frame().set_index(["dataset", "study"]).loc[("shapes", "selective-heads")]
    return out / "tasks" / row["task_id"] / "heads.parquet", row["task_id"]


# --- checksums ---------------------------------------------------------------------------------------
def test_the_manifest_records_each_tables_sha256(finished):
    from clip_lens.sweep.storage import file_digest

    out, _ = finished
    for row in Manifest(out).frame().itertuples():
        tables = json.loads(row.tables)
        assert tables and all(file_digest(out / "tasks" / row.task_id / f"{n}.parquet") == d for n, d in tables.items())


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [(truncate, "does not match"), (flip_a_byte, "does not match"),
                                             (lambda p: p.unlink(), "is missing")])
def test_a_damaged_table_reruns_exactly_its_task(finished, tmp_path, data, damage, problem):
    spec = copy_of(finished, tmp_path, data)
    path, task_id = heads_table(tmp_path / "out")
    damage(path)
    result = sweep.run(spec, progress=False)
    assert result.ok and (result.ran, result.skipped) == (1, 3)
    assert len(result.repaired) == 1 and str(path) in result.repaired[0] and problem in result.repaired[0]
    assert f"rerun, its tables did not verify: task tiny / shapes / selective-heads ({task_id})" in result.summary()
    attempts = Manifest(tmp_path / "out").frame().set_index("task_id")["attempts"]
    assert attempts[task_id] == 2 and (attempts.drop(task_id) == 1).all()  # the other tasks did not run again
    assert_same_tables(tmp_path / "out", finished[1])


def test_load_refuses_a_damaged_table_by_name(finished, tmp_path, data):
    from clip_lens.sweep.storage import StorageError

    copy_of(finished, tmp_path, data)
    path, _ = heads_table(tmp_path / "out")
    flip_a_byte(path)
    with pytest.raises(StorageError, match=rf"(?s){path} does not match the SHA-256.*rerun the sweep"):
        sweep.load(tmp_path / "out")


def test_load_reads_only_the_tables_the_manifest_lists(finished, tmp_path, data):
    copy_of(finished, tmp_path, data)
    path, _ = heads_table(tmp_path / "out")
    shutil.copy(path, path.with_name("stray.parquet"))  # a file no task wrote
    other = next((tmp_path / "out" / "tasks").glob("*/accuracy.parquet"))
    shutil.copy(other, path.with_name("accuracy.parquet"))  # a table name of other tasks, not this one's
    tables = sweep.load(tmp_path / "out")
    assert "stray" not in tables and "accuracy" in tables
    assert_same_tables(tmp_path / "out", finished[1])


# --- damaged manifest and counters ---------------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_manifest_is_named_with_what_to_do(finished, tmp_path, data, damage, capsys):
    from clip_lens.sweep.storage import StorageError

    spec = copy_of(finished, tmp_path, data)
    manifest = tmp_path / "out" / "manifest.sqlite"
    if damage == "garbage":
        manifest.write_bytes(b"these are not the bytes of an SQLite database\n" * 50)
    else:
        manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    with pytest.raises(StorageError, match=rf"{manifest} is not a readable sweep manifest .*Move it aside"):
        sweep.load(tmp_path / "out")
    assert main(["sweep", str(spec), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{manifest} is not a readable sweep manifest" in err and "Traceback" not in err
    assert not (tmp_path / "out" / LOCK).exists()  # released on the way out


def test_an_empty_attempts_file_fails_its_task_naming_the_file(tmp_path, data):
    spec = write_spec(tmp_path / "s.toml", spec_text(tmp_path / "out", *data, studies=("accuracy",)))
    task = sweep.plan(sweep.read_spec(spec))[0]
    counter = tmp_path / "out" / "tasks" / task.task_id / ".attempts"
    counter.parent.mkdir(parents=True)
    counter.write_text("")
    result = sweep.run(spec, progress=False, report=False)
    assert result.failed["task_id"].tolist() == [task.task_id]
    assert f"{counter} holds '', not a count of attempts: delete it" in result.failed["error"].iloc[0]
    counter.unlink()
    assert sweep.run(spec, progress=False, report=False).ok


# --- one writer per folder -----------------------------------------------------------------------
def test_a_held_lock_refuses_a_second_writer_naming_the_holder(tmp_path):
    from clip_lens.sweep.storage import SweepLocked, output_lock

    with output_lock(tmp_path) as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(SweepLocked, match=rf"is being written by another sweep \(pid {os.getpid()} on host "):
            with output_lock(tmp_path):
                pass
    assert not path.exists()


@pytest.mark.parametrize("ending", [RuntimeError, KeyboardInterrupt])
def test_the_lock_is_released_on_an_exception_and_on_ctrl_c(tmp_path, ending):
    from clip_lens.sweep.storage import output_lock

    with pytest.raises(ending):
        with output_lock(tmp_path):
            raise ending()
    with output_lock(tmp_path):  # free again
        pass


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    """A holder killed with kill -9 leaves the lock file behind with itself written in; the kernel
    has dropped its flock, so the next writer takes the lock over. (The child takes the lock as
    `output_lock` does, without importing clip_lens, to stay fast.)"""
    from clip_lens.sweep.storage import output_lock

    code = ("import fcntl, json, os, signal, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.write(fd, json.dumps({'pid': os.getpid()}).encode()); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path / LOCK)], timeout=60)
    assert killed.returncode == -signal.SIGKILL and "pid" in json.loads((tmp_path / LOCK).read_text())
    with output_lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_concurrent_table_writes_use_unique_temporary_names(tmp_path):
    """Eight threads write the same task's tables and task.json 40 times each: none fails (a fixed
    temporary name made concurrent writes fail) and no temporary file is left."""
    task = Task("m", "d", "s", {"x": 1}, "t" * 16)
    frame = pd.DataFrame({"a": range(50)})
    errors = []

    def write():
        try:
            for _ in range(40):
                write_task_tables(tmp_path, task, {"one": frame, "two": frame})
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert sorted(p.name for p in (tmp_path / "tasks" / task.task_id).iterdir()) == ["one.parquet", "task.json", "two.parquet"]


def test_a_rerun_removes_temporary_files_a_killed_run_left(finished, tmp_path, data):
    spec = copy_of(finished, tmp_path, data)
    path, _ = heads_table(tmp_path / "out")
    left = path.with_name(".heads.parquet.abc123.tmp")
    left.write_bytes(b"half a table")
    assert sweep.run(spec, progress=False, report=False).ran == 0
    assert not list((tmp_path / "out").rglob("*.tmp"))


def wait_for_lock(out, process, timeout=120):
    """Until `process` holds out's lock (its pid written in)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads((out / LOCK).read_text() or "{}").get("pid") == process.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"process {process.pid} never took the lock: {process.communicate()}")


def test_a_sweep_started_while_another_runs_is_refused(finished, tmp_path, data):
    """A `clip-lens sweep` process holds the folder: a second sweep started meanwhile (in this
    process) is refused naming it; the first finishes, and its tables equal an uninterrupted run's."""
    from clip_lens.sweep.storage import SweepLocked

    spec = write_spec(tmp_path / "s.toml", spec_text(tmp_path / "out", *data, studies=STUDIES, scenes=6))
    first = subprocess.Popen(cli("sweep", str(spec), "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lock(tmp_path / "out", first)
    with pytest.raises(SweepLocked, match=rf"is being written by another sweep \(pid {first.pid} on host .*wait for"):
        sweep.run(spec, progress=False)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0 and "4 tasks: 0 already done, 4 run, 0 failed" in out and "nan" not in out, err
    assert_same_tables(tmp_path / "out", finished[1])
    assert not (tmp_path / "out" / LOCK).exists()


@pytest.mark.slow
def test_two_sweeps_on_one_folder_the_second_is_refused(finished, tmp_path, data):
    """Two `clip-lens sweep` processes on one folder: while the first holds the lock, the second is
    refused naming it (exit 2); the first finishes, and its tables equal an uninterrupted run's."""
    spec = write_spec(tmp_path / "s.toml", spec_text(tmp_path / "out", *data, studies=STUDIES))
    first = subprocess.Popen(cli("sweep", str(spec), "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(cli("sweep", str(spec), "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = {p.pid: (p, *p.communicate(timeout=300)) for p in (first, second)}
    codes = sorted(p.returncode for p, _, _ in outputs.values())
    assert codes == [0, 2], outputs
    refused = next(v for v in outputs.values() if v[0].returncode == 2)
    winner = next(v for v in outputs.values() if v[0].returncode == 0)
    assert f"is being written by another sweep (pid {winner[0].pid} on host " in refused[2], refused[2]
    assert "Traceback" not in refused[2] and "nan" not in winner[1]
    assert "4 tasks: 0 already done, 4 run, 0 failed" in winner[1]
    assert_same_tables(tmp_path / "out", finished[1])
    assert not (tmp_path / "out" / LOCK).exists()


def test_a_task_another_writer_marked_running_is_not_reported_as_failed_nan(finished, tmp_path, data, monkeypatch):
    """The cause of "failed: nan": a second writer's `start` set a finished task back to running
    with no error, read back as NaN among other tasks' error strings (None otherwise). The lock
    stops the second writer; the summary names an unfinished task's status and never says nan."""
    from clip_lens.sweep import executors

    spec = copy_of(finished, tmp_path, data)
    _, task_id = heads_table(tmp_path / "out")
    original = executors.run_local

    def and_another_writer(tasks, out, manifest, **kwargs):
        original(tasks, out, manifest, **kwargs)
        task = next(t for t in sweep.plan(sweep.read_spec(spec)) if t.task_id == task_id)
        Manifest(out).start(task, "another sweep")
        manifest.finish(task, {"status": "failed", "error": "RuntimeError: a real failure", "tables": {}})
        Manifest(out).start(task, "another sweep")

    monkeypatch.setattr(executors, "run_local", and_another_writer)
    summary = sweep.run(spec, progress=False, report=False).summary()
    assert "nan" not in summary and f"not finished (running): tiny / shapes / selective-heads ({task_id}): " \
                                      "no error recorded" in summary


# --- the report, Ctrl-C, warnings ------------------------------------------------------------------
def test_the_report_lists_every_task_with_its_status_and_error(tmp_path, data):
    spec = write_spec(tmp_path / "s.toml", spec_text(tmp_path / "out", *data, studies=("image-ablation",)))
    result = sweep.run(spec, progress=False)
    assert result.failed["dataset"].tolist() == ["mine"]
    report = (tmp_path / "out" / "report.html").read_text()
    assert "2 tasks over 1 models, 2 datasets and 1 studies; 1 done, 1 failed or not finished." in report
    assert report.count("<td>image-ablation</td>") == 2 and "<td>failed</td>" in report
    assert "existence" in result.failed["error"].iloc[0] and result.failed["error"].iloc[0][:40] in report


def test_ctrl_c_ends_a_run_with_one_line_on_how_to_resume(tmp_path, data, monkeypatch, capsys):
    from clip_lens.sweep import studies

    spec = write_spec(tmp_path / "s.toml", spec_text(tmp_path / "out", *data, studies=STUDIES))
    real, calls = studies.run_study, []

    def interrupted_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(studies, "run_study", interrupted_second_time)
    assert main(["sweep", str(spec), "--quiet"]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == f"clip-lens sweep: stopped; finished tasks are kept. Resume with the same command: " \
                                   f"clip-lens sweep {spec} --quiet"
    assert not (tmp_path / "out" / LOCK).exists()
    statuses = Manifest(tmp_path / "out").frame()["status"].tolist()
    assert sorted(statuses) == ["done", "interrupted"]
    monkeypatch.setattr(studies, "run_study", real)
    resumed = sweep.run(spec, progress=False, report=False)
    assert resumed.ok and (resumed.skipped, resumed.ran) == (1, 3)


@pytest.mark.slow
def test_a_signalled_sweep_process_exits_130_without_a_traceback(tmp_path, data):
    spec = write_spec(tmp_path / "s.toml", spec_text(tmp_path / "out", *data, studies=STUDIES, scenes=40))
    process = subprocess.Popen(cli("sweep", str(spec), "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lock(tmp_path / "out", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err and "Resume with the same command" in err, err
    assert not (tmp_path / "out" / LOCK).exists()


def test_a_repeated_warning_is_shown_once_per_task(tmp_path, data, monkeypatch):
    """A study that tokenizes a too-long caption four times warns once per task, naming the task."""
    from clip_lens.sweep import studies

    spec = write_spec(tmp_path / "s.toml", spec_text(tmp_path / "out", *data, studies=STUDIES))
    real = studies.run_study

    def tokenizing_four_times(model, *args, **kwargs):
        for _ in range(4):
            model.to_tokens(["a caption far too long for the tiny model's sixteen slots " * 4])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(studies, "run_study", tokenizing_four_times)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sweep.run(spec, progress=False, report=False).ok
    truncations = [str(w.message) for w in caught if "token slots" in str(w.message)]
    assert len(truncations) == 4 and len({m.split(":")[0] for m in truncations}) == 4, truncations
    assert truncations[0].startswith("tiny/")


def ray_processes(root: int) -> dict[int, str]:
    """Processes below `root` running a Ray program, with their command lines."""
    from clip_lens.sweep.executors import _descendants

    found = {}
    for pid in _descendants(root):
        try:
            found[pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return {pid: line for pid, line in found.items() if "ray" in line}


@pytest.mark.slow
def test_ray_processes_end_with_a_killed_driver(tmp_path, data):
    """kill -9 on a `--ray` driver: Ray's dashboard and runtime-env agents used to outlive it."""
    pytest.importorskip("ray")
    spec = write_spec(tmp_path / "s.toml", spec_text(tmp_path / "out", *data, studies=STUDIES, scenes=200))
    driver = subprocess.Popen(cli("sweep", str(spec), "--ray", "--quiet"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any("RuntimeEnvAgent" in c for c in ray_processes(driver.pid).values()):
        time.sleep(0.5)
    time.sleep(3)  # past ray.init: the driver has handed the reaper Ray's PIDs
    started = ray_processes(driver.pid)
    assert started, "Ray never started"
    driver.kill()
    driver.wait(timeout=60)
    time.sleep(8)
    alive = {pid: line for pid, line in started.items() if os.path.exists(f"/proc/{pid}")
             and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"}
    for pid in alive:  # leave nothing behind even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive, alive
