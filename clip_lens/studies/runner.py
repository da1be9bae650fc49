"""The one runner every study goes through, from the command line, a sweep, the demo or Python.

    from clip_lens.studies import covariates, run_study, Target
    tables = run_study(covariates.STUDY, model, None, covariates.Options(n_per_cell=20),
                       Target("runs/covariates"), model_label="tiny")

It claims the output folder (another run's results there are refused unless `overwrite`), derives
the run's resume identity from the study, its options, the weights' fingerprint and the data's
digest, hands the study its checkpoints (a killed run resumes from them), writes the tables and the
report atomically, and records the run in the folder's manifest.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import pandas as pd
import torch

from clip_lens.checkpoints import Checkpoints, claim_resumable_output, weights_fingerprint
from clip_lens.report import Report, write_study
from clip_lens.studies.options import StudyOptions

Tables = dict[str, pd.DataFrame]


@dataclass(frozen=True)
class Study:
    """A study's contract.

    Attributes:
        name: its command and sweep name ("valse-existence").
        Options: its frozen options dataclass (`clip_lens.studies.options.StudyOptions`).
        compute: `compute(model, data, options, *, checkpoints, progress) -> {name: DataFrame}`;
            writes no file (`checkpoints` saves finished chunks for the runner).
        report: `report(tables, options) -> Report`, from the tables alone.
        data: what `data` is, in words (for errors and docs).
    """

    name: str
    Options: type
    compute: Callable[..., Tables]
    report: Callable[[Tables, Any], Report]
    data: str = ""


@dataclass(frozen=True)
class Target:
    """Where a run writes and how: `out` folder, `overwrite` another run's results there, show
    `progress` bars, and `setup` lines for the report's first section."""

    out: Union[str, Path]
    overwrite: bool = False
    progress: bool = True
    setup: Sequence[str] = field(default_factory=tuple)


def digest_sources(sources: Mapping[str, Any]) -> str:
    """SHA-256 over a run's data: each file's bytes, each folder's file names and sizes, other
    values as written; so a changed data file is a different run."""
    from clip_lens.model_sources import file_digest

    h = hashlib.sha256()
    for key in sorted(sources):
        values = sources[key] if isinstance(sources[key], (list, tuple)) else [sources[key]]
        for value in values:
            h.update(f"{key}={value};".encode())
            path = Path(value) if isinstance(value, (str, Path)) else None
            if path is not None and path.is_file():
                h.update(file_digest(path).encode())
            elif path is not None and path.is_dir():
                listing = sorted((f.relative_to(path).as_posix(), f.stat().st_size) for f in path.rglob("*") if f.is_file())
                h.update(repr(listing).encode())
    return h.hexdigest()


def run_identity(study: Study, model, options: StudyOptions, model_label: str, sources: Mapping[str, Any]) -> dict:
    """What makes two runs the same run (resume) or different ones (refused in one folder)."""
    # options flat beside the rest, so that a refused resume names the option that differs
    changes_numbers = {k: v for k, v in options.as_dict().items() if k not in options.NOT_IN_IDENTITY}
    return dict(study=study.name, model=model_label, dtype=str(model.dtype), device=str(model.device),
                weights=weights_fingerprint(model), data=digest_sources(sources), **changes_numbers)


def run_study(study: Study, model, data, options: StudyOptions, target: Target, *, model_label: str,
              sources: Optional[Mapping[str, Any]] = None) -> Tables:
    """Run `study` on `data` with `options` into `target.out`; returns its tables.

    Args:
        sources: the files and folders `data` was read from (and anything else that tells two
            datasets apart), digested into the run's identity and listed in the manifest.
    """
    if not isinstance(options, study.Options):
        raise TypeError(f"study {study.name!r} takes {study.Options.__module__}.Options, not {type(options).__name__}")
    sources = dict(sources or {})
    start = time.perf_counter()
    checkpoints = claim_resumable_output(target.out, run_identity(study, model, options, model_label, sources),
                                         overwrite=target.overwrite)
    torch.manual_seed(getattr(options, "seed", 0))  # a study that draws from torch's generator draws the same
    tables = study.compute(model, data, options, checkpoints=checkpoints, progress=target.progress)
    report = study.report(tables, options)
    data_line = "; ".join(f"{key}: {', '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                          for key, v in sources.items() if v is not None)
    report.setup(f"Model: {model_label}.", f"Data: {data_line}." if data_line else "", *target.setup)
    manifest = dict(study=study.name, model=model_label, options=options.as_dict(), data=sources,
                    checkpoints=checkpoints.summary(), seconds=round(time.perf_counter() - start, 1))
    write_study(target.out, tables, report, manifest=manifest)
    checkpoints.finish()
    return tables


def no_checkpoints() -> Checkpoints:
    """Checkpoints that save nothing (a study's `compute` called outside the runner)."""
    return Checkpoints(None)
