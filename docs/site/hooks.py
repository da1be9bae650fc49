"""Build steps of the documentation site (mkdocs.yml names this file under `hooks`).

- The API reference: one page per package, generated from the package's `__all__` (the one list of
  its public names), each name rendered by mkdocstrings from its docstring and signature.
- The report gallery: `clip-lens demo` runs once per build (the shipped tiny CLIP, offline) and its
  HTML reports are published under `gallery/`, linked from docs/gallery.md.
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

from mkdocs.structure.files import File, Files

# page (docs/api/<page>.md) -> the package it documents, in the order of the navigation
API_PAGES = {
    "clip_lens": "clip_lens",
    "patching": "clip_lens.patching",
    "circuits": "clip_lens.circuits",
    "data": "clip_lens.data",
    "studies": "clip_lens.studies",
    "sae": "clip_lens.sae",
    "sweep": "clip_lens.sweep",
    "captioning": "clip_lens.captioning",
}

# the demo's reports as the gallery publishes them: path under the demo's output folder -> title
GALLERY = {
    "report.html": "Negation in the text encoder",
    "attention_cancellation/report.html": "Attention cancellation in the vision tower",
    "attribution/report.html": "Attribution to heads, neurons and SAE latents",
    "attribution/latents.html": "The SAE latent browser",
    "circuit/report.html": "The negation circuit of the text tower",
}

_demo_out: Path | None = None  # one demo run per mkdocs process (`mkdocs serve` rebuilds reuse it)


def api_page(package: str) -> str:
    """The Markdown of one API page: the package's docstring summary, then every name of its
    `__all__` rendered by mkdocstrings (`::: package.name`)."""
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    if not names:
        raise ValueError(f"{package} has no __all__: the API reference lists a package's public names from it")
    summary = (module.__doc__ or "").strip().split("\n\n")[0]
    lines = [f"# `{package}`", "", summary, ""]
    for name in names:
        lines += [f"::: {package}.{name}", ""]
    return "\n".join(lines)


def api_index() -> str:
    """The API reference's first page: each package with its one-paragraph summary."""
    lines = ["# API reference", "",
             "Every public name of clip_lens, package by package (each package's `__all__`), with its "
             "signature and docstring. Tensor shapes are written in the docstrings as "
             "`[batch, pos, d_model]`.", ""]
    for page, package in API_PAGES.items():
        summary = (importlib.import_module(package).__doc__ or "").strip().split("\n")[0]
        lines += [f"- [`{package}`]({page}.md): {summary}"]
    return "\n".join(lines) + "\n"


def run_demo() -> Path:
    """Run `clip-lens demo` into a temporary folder (once per process) and return that folder."""
    global _demo_out
    if _demo_out is None:
        from clip_lens.cli import main

        out = Path(tempfile.mkdtemp(prefix="clip_lens_gallery_")) / "demo"
        if main(["demo", "--out", str(out), "--quiet"]) != 0:
            raise RuntimeError("clip-lens demo failed while building the report gallery")
        missing = [name for name in GALLERY if not (out / name).is_file()]
        if missing:
            raise RuntimeError(f"clip-lens demo wrote no {missing} for the report gallery")
        _demo_out = out
    return _demo_out


def on_files(files: Files, config) -> Files:
    """Add the generated API pages and the gallery's reports to the site's files."""
    files.append(File.generated(config, "api/index.md", content=api_index()))
    for page, package in API_PAGES.items():
        files.append(File.generated(config, f"api/{page}.md", content=api_page(package)))
    out = run_demo()
    for name in GALLERY:
        files.append(File.generated(config, f"gallery/{name}", abs_src_path=str(out / name)))
    return files
