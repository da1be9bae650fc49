"""Checkpoints of long studies: each finished chunk of instances is saved as it finishes, so that a
killed run, started again into the same output folder, resumes where it stopped.

A run's checkpoints live in `out/.partial/`, beside the run's identity (`run.json`: the study, the
model, the data and every option that changes a number). The folder goes once the run's tables
are written. Chunks are NumPy `.npz` files of plain arrays, written under a temporary name and
renamed into place (a kill never leaves a partial chunk under its final name) and read back with
`allow_pickle=False` (loading runs no code).

Every run, interrupted or not, computes the same chunks from the same inputs, so a resumed run's
tables equal an uninterrupted run's exactly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from clip_lens.checks import is_integer
from clip_lens.report import claim_output, write_atomically, write_text_atomically

PARTIAL = ".partial"
RUN = "run.json"
Arrays = dict[str, np.ndarray]


class Checkpoints:
    """The finished chunks of one run, in `folder` (None: nothing is saved, every chunk computed).

    Attributes:
        loaded, computed: instances per study read from checkpoints / computed in this process.
    """

    def __init__(self, folder: Optional[Union[str, Path]]):
        self.folder = Path(folder) if folder is not None else None
        self.loaded: dict[str, int] = {}
        self.computed: dict[str, int] = {}
        self.chunk: Optional[int] = None  # instances per saved chunk; None: each analysis's own

    def sized(self, chunk: Optional[int]) -> "Checkpoints":
        """These checkpoints, saving every `chunk` instances whatever chunk an analysis asks for
        (its engine may then run smaller batches inside each chunk); the counts are shared."""
        if chunk is not None and (not is_integer(chunk) or chunk < 1):
            raise ValueError(f"checkpoint chunk {chunk!r}: give a number of instances >= 1")
        view = copy.copy(self)
        view.chunk = chunk
        return view

    def summary(self) -> dict:
        """{study: {"loaded": instances read from checkpoints, "computed": instances computed}}."""
        return {study: {"loaded": self.loaded[study], "computed": self.computed[study]} for study in self.loaded}

    def finish(self) -> None:
        """The run's tables are written: its checkpoints go."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def chunks(self, study: str, n: int, size: int, compute: Callable[[int, int], Arrays],
               progress: bool = True, ids: Optional[Sequence] = None) -> list[Arrays]:
        """compute(lo, hi) -> {name: array} for instances lo..hi - 1, for every chunk of `size`
        instances out of `n` (`self.chunk` instead, when set); chunks saved by an earlier run of the
        same study (and, with `ids`, of the same instances) are read instead."""
        size = self.chunk or size
        if size < 1:
            raise ValueError(f"{study}: chunk size {size} must be at least 1")
        if n < 1:
            raise ValueError(f"{study}: no instances to run")
        if ids is not None and len(ids) != n:
            raise ValueError(f"{study}: {len(ids)} ids for {n} instances")
        ids = list(ids) if ids is not None else None
        self.loaded.setdefault(study, 0)
        self.computed.setdefault(study, 0)
        bar = tqdm(total=n, desc=study, unit="instance", disable=not progress)
        out = []
        for lo in range(0, n, size):
            hi = min(lo + size, n)
            path = self._path(study, lo, hi, ids)
            if path is not None and path.is_file():
                arrays = self._load(path)
                self.loaded[study] += hi - lo
            else:
                arrays = compute(lo, hi)
                self._save(path, arrays)
                self.computed[study] += hi - lo
            out.append(arrays)
            bar.update(hi - lo)
        bar.close()
        return out

    def _path(self, study: str, lo: int, hi: int, ids: Optional[Sequence]) -> Optional[Path]:
        """The chunk's file: named by its rows and, with `ids`, by a digest of its instances' ids, so
        that a changed instance list never reuses another list's chunk."""
        if self.folder is None:
            return None
        digest = "" if ids is None else "-" + hashlib.sha1("\n".join(map(str, ids[lo:hi])).encode()).hexdigest()[:12]
        return self.folder / study / f"{lo:07d}-{hi:07d}{digest}.npz"

    def _save(self, path: Optional[Path], arrays: Arrays) -> None:
        if path is not None:
            write_atomically(path, lambda handle: np.savez(handle, **arrays), binary=True)

    @staticmethod
    def _load(path: Path) -> Arrays:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}


def concatenate(chunks: list[Arrays], name: str, fill: float = np.nan) -> np.ndarray:
    """Array `name` of every chunk joined along the first axis; chunks whose later axes are shorter
    (texts trimmed to each chunk's own longest) are padded with `fill`."""
    parts = [chunk[name] for chunk in chunks]
    shape = np.max([part.shape for part in parts], axis=0)
    padded = []
    for part in parts:
        pad = [(0, 0)] + [(0, int(target - have)) for target, have in zip(shape[1:], part.shape[1:])]
        padded.append(np.pad(part, pad, constant_values=fill) if any(p[1] for p in pad) else part)
    return np.concatenate(padded)


def claim_resumable_output(out: Union[str, Path], identity: dict, *, overwrite: bool = False) -> Checkpoints:
    """`claim_output` for a study that checkpoints: `out` may also hold an unfinished run with the
    same `identity` (the study, model, data and every option that changes a number), which is then
    resumed from its checkpoints. An unfinished run with another identity is refused, naming what
    differs, unless `overwrite` (which discards it) or unless it saved nothing yet. Call `Checkpoints.finish` once the tables are
    written."""
    out = Path(out)
    partial, plain = out / PARTIAL, _plain(identity)
    record = partial / RUN
    if overwrite:
        shutil.rmtree(partial, ignore_errors=True)
    saved = [path for path in partial.rglob("*") if path.is_file() and path != record and not path.name.startswith(".")]
    if record.is_file() and not saved:
        shutil.rmtree(partial)  # an unfinished run that saved nothing (it stopped early, e.g. on bad input)
    if record.is_file():
        found = json.loads(record.read_text())
        if found != plain:
            changed = sorted(k for k in set(found) | set(plain) if found.get(k) != plain.get(k))
            raise FileExistsError(f"{out} holds an unfinished run with other settings ({', '.join(changed)}); rerun "
                                  "with the same settings to finish it, or overwrite it (CLI --overwrite)")
        return Checkpoints(partial)
    claim_output(out, overwrite=overwrite)
    write_text_atomically(record, json.dumps(plain, indent=2))
    return Checkpoints(partial)


def weights_fingerprint(module) -> float:
    """The sum of every weight of `module` in float64: part of a run's identity, since a label
    ("ViT-B-32, random weights") does not tell two sets of weights apart."""
    return float(sum(param.detach().double().sum() for param in module.parameters()))


def _plain(identity: dict) -> dict:
    """`identity` as JSON would give it back (paths and tuples as strings and lists)."""
    return json.loads(json.dumps(identity, default=str))
