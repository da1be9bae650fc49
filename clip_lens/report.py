"""One self-contained HTML report per run: text, tables and plotly figures, plotly.js inlined once,
so the file opens anywhere without a network."""

from __future__ import annotations

import html
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable, Mapping, Optional, Union

import pandas as pd
import plotly.graph_objects as go

STYLE = """
body { font-family: Inter, Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
h1 { font-size: 1.7em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0 1.5em; }
th, td { border-bottom: 1px solid #eee; padding: .25em .7em; text-align: right; }
th { background: #f6f6f6; } td:first-child, th:first-child { text-align: left; }
.note { color: #666; font-size: .9em; } .figure { margin: 1em 0 2em; }
"""


class Report:
    """Collects sections and writes them as one HTML file.

        report = Report("Negation in CLIP's text encoder")
        report.section("Causal tracing").text("...").table(frame).figure(fig)
        report.write("out/report.html")
    """

    def __init__(self, title: str):
        self.title = title
        self._parts: list[str] = []
        self._plotly_included = False

    def section(self, heading: str) -> "Report":
        self._parts.append(f"<h2>{html.escape(heading)}</h2>")
        return self

    def text(self, text: str, note: bool = False) -> "Report":
        cls = ' class="note"' if note else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def setup(self, *lines: str) -> "Report":
        """Put `lines` first, under "Setup" (the runner adds the model and the data this way)."""
        parts = ["<h2>Setup</h2>"] + [f"<p>{html.escape(line)}</p>" for line in lines if line]
        if self._parts[:1] == ["<h2>Setup</h2>"]:  # the study opened a Setup section: add to its top
            self._parts[1:1] = parts[1:]
        else:
            self._parts[:0] = parts
        return self

    def table(self, frame: pd.DataFrame, max_rows: int = 25, caption: str = "",
              links: Optional[dict] = None) -> "Report":
        """The first `max_rows` rows of `frame`; with `links` ({column: address column}), each cell
        of a column is a link to the address in its row (the address columns are not shown)."""
        shown = frame.head(max_rows)
        more = f" (first {max_rows} of {len(frame)} rows)" if len(frame) > max_rows else ""
        if caption or more:
            self._parts.append(f'<p class="note">{html.escape(caption)}{more}</p>')
        if links:
            shown = _linked(shown, links)
        self._parts.append(shown.to_html(index=False, escape=not links, float_format=lambda x: f"{x:.4g}", border=0,
                                         na_rep="–"))
        return self

    def figure(self, fig: go.Figure) -> "Report":
        include = "inline" if not self._plotly_included else False
        self._plotly_included = True
        self._parts.append(f'<div class="figure">{fig.to_html(full_html=False, include_plotlyjs=include)}</div>')
        return self

    def to_html(self) -> str:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        body = "\n".join(self._parts)
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"
                f"<p class='note'>Written by clip_lens on {stamp}.</p>{body}</body></html>")

    def write(self, path: Union[str, Path]) -> Path:
        return write_text_atomically(path, self.to_html())


def _linked(frame: pd.DataFrame, links: dict) -> pd.DataFrame:
    """`frame` with each cell of the columns in `links` an HTML link to its row's address, every
    other text cell escaped, and the address columns dropped (for `to_html(escape=False)`)."""
    shown = frame.drop(columns=list(links.values()))
    for column in shown.columns:
        if column in links:
            shown[column] = [f'<a href="{html.escape(str(url))}">{html.escape(str(value))}</a>'
                             for value, url in zip(shown[column], frame[links[column]])]
        elif shown[column].dtype == object:
            shown[column] = [html.escape(str(value)) for value in shown[column]]
    return shown


def write_atomically(path: Union[str, Path], write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call `write(handle)` on a temporary file beside `path` (named ".<name>.*.tmp"), then rename
    it into place: a reader (or a killed run) never sees a partial file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: Union[str, Path], text: str) -> Path:
    """`text` written to `path` atomically (`write_atomically`)."""
    return write_atomically(path, lambda handle: handle.write(text))


MANIFEST = "manifest.json"
RESULT_FILES = ("*.csv", "report.html", MANIFEST, "sae.safetensors", "sae.json", "latents.html")  # what a study writes into its folder


def claim_output(out: Union[str, Path], *, overwrite: bool = False) -> Path:
    """Make `out` ready for a new run, before any work: a folder that holds another run's results
    (tables, report, manifest) is refused unless `overwrite`, which removes them first, so that no
    table of an older run is left beside the new ones."""
    out = Path(out)
    previous = sorted({p for pattern in RESULT_FILES for p in out.glob(pattern)}) if out.is_dir() else []
    if previous and not overwrite:
        names = ", ".join(p.name for p in previous[:4]) + (f" and {len(previous) - 4} more" if len(previous) > 4 else "")
        raise FileExistsError(f"{out} holds another run's results ({names}); choose another output folder, or "
                              "overwrite them (overwrite=True, CLI --overwrite)")
    for path in previous:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_study(out: Union[str, Path], tables: Mapping[str, pd.DataFrame], report: Optional[Report] = None,
                manifest: Optional[dict] = None) -> Path:
    """A study's outputs: each table as out/<name>.csv, the report as out/report.html and, last,
    out/manifest.json recording the run (`manifest`, plus the files, the time and the clip_lens
    version); each file written atomically. Returns `out`."""
    from clip_lens import __version__

    out = Path(out)
    for name, table in tables.items():
        write_text_atomically(out / f"{name}.csv", table.to_csv(index=False))
    if report is not None:
        report.write(out / "report.html")
    record = {**(manifest or {}), "tables": [f"{name}.csv" for name in tables],
              "report": "report.html" if report is not None else None,
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "clip_lens": __version__}
    write_text_atomically(out / MANIFEST, json.dumps(record, indent=2, default=str))
    return out


def add_to_manifest(out: Union[str, Path], **fields) -> None:
    """Record more about a finished run (the CLI adds its command line and seed)."""
    path = Path(out) / MANIFEST
    record = json.loads(path.read_text()) if path.is_file() else {}
    write_text_atomically(path, json.dumps({**record, **fields}, indent=2, default=str))


def write_index(out: Union[str, Path], title: str, rows: list[tuple[str, str]], notes: tuple[str, ...] = ()) -> Path:
    """out/README.md: what each output of a reproduction is and which result of its source it
    reproduces (`rows`: (output path relative to `out`, what it reproduces)); written atomically."""
    lines = [f"# {title}", "", *notes, "" if notes else "", "| output | reproduces |", "| --- | --- |"]
    lines += [f"| `{path}` | {what} |" for path, what in rows if (Path(out) / path).exists()]
    missing = [path for path, _ in rows if not (Path(out) / path).exists()]
    if missing:
        lines += ["", "Not run this time: " + ", ".join(f"`{path}`" for path in missing) + "."]
    return write_text_atomically(Path(out) / "README.md", "\n".join(lines) + "\n")
