"""Killed studies resume (clip_lens.checkpoints): `clip-lens valse-existence all` interrupted at
several points and run again into the same folder recomputes no finished instance, and its tables
equal an uninterrupted run's; no partial file is ever visible under a final name."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA, write_noise_images

from clip_lens import checkpoints as checkpoints_module
from clip_lens import report as report_module
from clip_lens.checkpoints import PARTIAL, Checkpoints, concatenate
from clip_lens.cli import main
from clip_lens.studies.analyses.existence import load_valse

VALSE = SHARED_DATA / "valse" / "existence.json"
LIMIT, CHUNK = 150, 32  # causal tracing and image ablation in 5 chunks, negator attention (batches of 64) in 3
STUDIES = ("causal_tracing", "negator_attention", "image_ablation")


def test_chunks_are_computed_once_and_read_back(tmp_path):
    calls = []

    def compute(lo, hi):
        calls.append((lo, hi))
        return {"x": np.arange(lo, hi, dtype=float)[:, None] * np.ones((1, hi - lo))}  # widths differ per chunk

    first = Checkpoints(tmp_path).chunks("s", 7, 3, compute, progress=False)
    again = Checkpoints(tmp_path)
    second = again.chunks("s", 7, 3, compute, progress=False)
    assert calls == [(0, 3), (3, 6), (6, 7)] and again.summary() == {"s": {"loaded": 7, "computed": 0}}
    joined = concatenate(second, "x")
    assert joined.shape == (7, 3) and np.isnan(joined[6, 1:]).all()
    np.testing.assert_array_equal(concatenate(first, "x"), joined)


def test_an_interrupted_save_leaves_no_chunk_under_its_final_name(tmp_path, monkeypatch):
    def broken_savez(handle, **arrays):
        handle.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        Checkpoints(tmp_path).chunks("s", 4, 2, lambda lo, hi: {"x": np.zeros(hi - lo)}, progress=False)
    assert list(tmp_path.rglob("*")) == [tmp_path / "s"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_noise_images(load_valse(VALSE)["image_file"], tmp_path_factory.mktemp("v7w"))


def _args(images, out):
    return ["valse-existence", "all", "--model", "clip_lens/tiny-shapes", "--valse", str(VALSE), "--images", str(images),
            "--out", str(out), "--limit", str(LIMIT), "--pair-chunk", str(CHUNK), "--checkpoint-chunk", str(CHUNK),
            "--quiet"]


def _tables(out):
    return {path.name: pd.read_csv(path) for path in sorted(out.glob("*.csv"))}


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    assert main(_args(images, out)) == 0
    assert not (out / PARTIAL).exists()
    return _tables(out), json.loads((out / "manifest.json").read_text())


def _assert_same_tables(out, expected):
    got = _tables(out)
    assert sorted(got) == sorted(expected)
    for name, table in expected.items():
        pd.testing.assert_frame_equal(got[name], table, check_exact=True, obj=name)


def _chunk_instances(out) -> dict:
    """Instances held by the chunk files of each study in out/.partial."""
    held = {}
    for path in (out / PARTIAL).glob("*/*.npz"):
        lo, hi = (int(x) for x in path.stem.split("-")[:2])  # "<lo>-<hi>-<digest of the ids>"
        held[path.parent.name] = held.get(path.parent.name, 0) + hi - lo
    return held


def _kill_after(chunks: int, argv: list, monkeypatch) -> None:
    """Run `clip-lens argv`, stopped as by Ctrl-C right after its `chunks`-th chunk lands."""
    save, saved = Checkpoints._save, []

    def save_then_die(self, *args):
        save(self, *args)
        saved.append(args[0])
        if len(saved) == chunks:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoints, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(Checkpoints, "_save", save)


# image ablation runs first (its target runs give the image embeddings), in 5 chunks; then causal
# tracing (5) and negator attention (3)
@pytest.mark.parametrize("kill_after", [1, 7, 12])  # in image ablation, causal tracing, negator attention
def test_a_run_interrupted_after_k_chunks_resumes_them(images, tmp_path, monkeypatch, uninterrupted, kill_after):
    expected, whole_manifest = uninterrupted
    out = tmp_path / "out"
    _kill_after(kill_after, _args(images, out), monkeypatch)
    assert not list(out.glob("*.csv")) and not (out / "report.html").exists()
    held = _chunk_instances(out)
    assert sum(1 for _ in (out / PARTIAL).glob("*/*.npz")) == kill_after

    assert main(_args(images, out)) == 0
    _assert_same_tables(out, expected)
    counts = json.loads((out / "manifest.json").read_text())["checkpoints"]
    n = len(expected["instances.csv"])
    for study in STUDIES:
        assert counts[study]["loaded"] == held.get(study, 0)          # every finished instance read back ...
        assert counts[study]["loaded"] + counts[study]["computed"] == n  # ... and none computed twice
    assert sum(c["loaded"] for c in counts.values()) > 0
    assert whole_manifest["checkpoints"]["causal_tracing"] == {"loaded": 0, "computed": n}
    assert not (out / PARTIAL).exists()


def test_a_run_resumes_with_a_smaller_engine_chunk(images, tmp_path, monkeypatch, uninterrupted):
    """The checkpoint chunk is its own option: shrinking the engine's pair chunk to fit memory keeps
    the chunks a killed run saved. The engine's chunking is not part of a run's identity, so the
    tables agree to float rounding (relative where CTE divides by a small d)."""
    expected, _ = uninterrupted
    out = tmp_path / "out"
    _kill_after(2, _args(images, out), monkeypatch)
    smaller = _args(images, out)
    smaller[smaller.index("--pair-chunk") + 1] = "8"
    assert main(smaller) == 0
    counts = json.loads((out / "manifest.json").read_text())["checkpoints"]
    assert counts["image_ablation"]["loaded"] == 2 * CHUNK
    got = _tables(out)
    for name in ("causal_tracing_instances.csv", "image_ablation.csv"):
        pd.testing.assert_frame_equal(got[name], expected[name], check_exact=False, atol=1e-4, rtol=1e-4, obj=name)


def test_a_run_interrupted_while_writing_its_tables_finishes(images, tmp_path, monkeypatch, uninterrupted):
    expected, _ = uninterrupted
    out = tmp_path / "out"
    write, written = report_module.write_text_atomically, []

    def write_then_die(path, text):
        if path.suffix == ".csv" and len(written) == 3:
            raise KeyboardInterrupt
        written.append(path)
        return write(path, text)

    monkeypatch.setattr(report_module, "write_text_atomically", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(_args(images, out))
    monkeypatch.setattr(report_module, "write_text_atomically", write)
    assert len(list(out.glob("*.csv"))) == 3 and (out / PARTIAL).is_dir()
    assert main(_args(images, out)) == 0  # its own unfinished folder is accepted without --overwrite
    _assert_same_tables(out, expected)
    counts = json.loads((out / "manifest.json").read_text())["checkpoints"]
    assert all(counts[study]["computed"] == 0 for study in STUDIES)


def test_an_unfinished_run_with_other_settings_is_refused(images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    save = Checkpoints._save

    def save_once_then_die(self, *args):
        save(self, *args)
        raise KeyboardInterrupt

    other = _args(images, out)
    other[other.index("--limit") + 1] = "40"
    monkeypatch.setattr(Checkpoints, "_save", lambda self, *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        main(_args(images, out))  # stopped before its first chunk landed: nothing to keep
    monkeypatch.setattr(Checkpoints, "_save", save_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(other)  # so other settings may take the folder
    monkeypatch.setattr(Checkpoints, "_save", save)
    assert main(_args(images, out)) == 2  # but not once that run has saved a chunk
    assert "unfinished run with other settings (limit)" in capsys.readouterr().err
    assert checkpoints_module.RUN in os.listdir(out / PARTIAL)


def test_a_killed_process_resumes(images, tmp_path, uninterrupted):
    """A real SIGKILL at an arbitrary moment once some chunks exist; every file left is whole."""
    expected, _ = uninterrupted
    out = tmp_path / "out"
    command = [sys.executable, "-c", "import sys; from clip_lens.cli import main; sys.exit(main(sys.argv[1:]))",
               *_args(images, out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / PARTIAL).glob("*/*.npz"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    for path in (out / PARTIAL).glob("*/*.npz"):  # under a final name, only whole chunks
        with np.load(path, allow_pickle=False) as data:
            assert data.files
    held = _chunk_instances(out)
    assert sum(held.values()) > 0
    assert main(_args(images, out)) == 0
    _assert_same_tables(out, expected)
    counts = json.loads((out / "manifest.json").read_text())["checkpoints"]
    assert {study: counts[study]["loaded"] for study in held} == held


def test_a_changed_instance_list_reuses_no_chunk(tmp_path):
    calls = []

    def compute(lo, hi):
        calls.append((lo, hi))
        return {"x": np.arange(lo, hi)}

    Checkpoints(tmp_path).chunks("s", 4, 2, compute, progress=False, ids=["a", "b", "c", "d"])
    again = Checkpoints(tmp_path)
    again.chunks("s", 4, 2, compute, progress=False, ids=["a", "b", "x", "d"])  # the second chunk's instances changed
    assert calls == [(0, 2), (2, 4), (2, 4)] and again.summary() == {"s": {"loaded": 2, "computed": 2}}
    with pytest.raises(ValueError, match="s: no instances to run"):
        again.chunks("s", 0, 2, compute, progress=False)


def test_a_run_that_left_only_temporary_files_saved_nothing(tmp_path):
    from clip_lens.checkpoints import claim_resumable_output

    out = tmp_path / "out"
    checkpoints = claim_resumable_output(out, {"limit": 1})
    (checkpoints.folder / "s").mkdir()
    (checkpoints.folder / "s" / ".0000000-0000002.npz.abc.tmp").write_bytes(b"half")  # killed mid-write
    claim_resumable_output(out, {"limit": 2})  # other settings may take the folder
    np.savez(out / PARTIAL / "chunk.npz", x=np.zeros(1))
    with pytest.raises(FileExistsError, match=r"other settings \(limit\)"):
        claim_resumable_output(out, {"limit": 3})
