"""The documentation site (mkdocs.yml): every public name in the API reference, every notebook's
figures on its page, no broken internal link, and (slow) the main pages rendered in headless
Chromium with every figure's plot area drawn.

The site is read from $CLIP_LENS_SITE when set (.ci/run builds it with `mkdocs build --strict`
before the tests), else built here into a temporary folder (needs `pip install -e ".[docs]"`).
"""

from __future__ import annotations

import functools
import http.server
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import clip_lens

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MIN_FIGURES_PER_NOTEBOOK = 5   # as tests/test_notebooks.py asks of each executed notebook


def load_hooks():
    """docs/site/hooks.py, the build steps mkdocs.yml names (imported by path, as mkdocs does)."""
    spec = importlib.util.spec_from_file_location("clip_lens_site_hooks", ROOT / "docs" / "site" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    given = os.environ.get("CLIP_LENS_SITE")
    if given:
        path = Path(given)
        assert (path / "index.html").is_file(), f"CLIP_LENS_SITE={given} holds no built site (no index.html)"
        return path
    pytest.importorskip("mkdocs", reason='the docs tools are not installed: pip install -e ".[docs]"')
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-4000:]}"
    return out


def page(site: Path, url: str) -> str:
    """The HTML of the page at site-relative `url` ("api/sae/", "index.html")."""
    path = site / url
    return (path / "index.html" if path.is_dir() else path).read_text(encoding="utf-8")


class _Links(HTMLParser):
    """Collects a page's ids and the targets of its href and src attributes (script bodies are data,
    not tags, so the plotly.js source adds none)."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs):
        stylesheet = tag == "link" and dict(attrs).get("rel") == "stylesheet"  # other <link>s name no file
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)
            elif name in ("href", "src") and value and (tag != "link" or stylesheet):
                self.targets.append(value)


@functools.lru_cache(maxsize=None)
def parse(path: Path) -> _Links:
    links = _Links()
    links.feed(path.read_text(encoding="utf-8", errors="replace"))
    return links


def broken_links(site: Path) -> list[str]:
    """Every internal href/src of every HTML page whose file, or whose #anchor in that file, is missing."""
    broken = []
    for path in sorted(site.rglob("*.html")):
        for target in parse(path).targets:
            parts = urlsplit(target)
            if parts.scheme or target.startswith("//"):
                continue  # external: http(s), mailto, data, javascript
            base = site if parts.path.startswith("/") else path.parent  # the 404 page links from the root
            resolved = path if not parts.path else (base / unquote(parts.path.lstrip("/"))).resolve()
            if resolved.is_dir():
                resolved = resolved / "index.html"
            if not resolved.is_file():
                broken.append(f"{path.relative_to(site)}: {target} (no such file)")
            elif parts.fragment and resolved.suffix == ".html" and unquote(parts.fragment) not in parse(resolved).ids:
                broken.append(f"{path.relative_to(site)}: {target} (no id {parts.fragment!r} there)")
    return broken


def test_every_package_with_public_names_has_an_api_page():
    hooks = load_hooks()
    packages = {"clip_lens"} | {info.name for info in pkgutil.walk_packages(clip_lens.__path__, "clip_lens.")
                                if info.ispkg and hasattr(importlib.import_module(info.name), "__all__")}
    assert packages == set(hooks.API_PAGES.values())


def test_api_pages_list_every_name_of_each_all(site):
    hooks = load_hooks()
    missing = []
    for slug, package in hooks.API_PAGES.items():
        html = page(site, f"api/{slug}/")
        missing += [f"{package}.{name}" for name in importlib.import_module(package).__all__
                    if f'id="{package}.{name}"' not in html]
    assert not missing, f"public names without an entry in the API reference: {missing}"
    # rendered by mkdocstrings from the docstring, not a bare heading: patch's signature and arguments
    patching = page(site, "api/patching/")
    assert "positions" in patching and "intervention" in patching and "Args" not in patching


def test_api_page_generator_refuses_a_package_without_all():
    with pytest.raises(ValueError, match="clip_lens.plot has no __all__"):
        load_hooks().api_page("clip_lens.plot")


@pytest.mark.parametrize("notebook", [path.stem for path in NOTEBOOKS])
def test_notebook_pages_carry_their_figures(site, notebook):
    html = page(site, f"notebooks/{notebook}/")
    figures = len(re.findall(r"Plotly\.newPlot\(", html))
    assert figures >= MIN_FIGURES_PER_NOTEBOOK, f"{notebook}: {figures} figures on its page"
    assert html.count("* plotly.js v") == 1, f"{notebook}: plotly.js must be inlined once (offline pages)"
    stderr = re.findall(r'data-mime-type="application/vnd\.jupyter\.stderr" tabindex[^>]*>(.{0,300})', html, re.S)
    assert not stderr, f"{notebook}: output on stderr (a warning, IProgress): {stderr}"
    assert "Traceback" not in html


def test_gallery_publishes_every_demo_report(site):
    hooks = load_hooks()
    gallery = page(site, "gallery/")
    for name in hooks.GALLERY:
        assert (site / "gallery" / name).is_file(), name
        assert f'href="{name}"' in gallery or f'href="../gallery/{name}"' in gallery, name
    assert len(re.findall(r"Plotly\.newPlot\(", page(site, "gallery/report.html"))) >= 5


def test_no_internal_link_is_broken(site):
    broken = broken_links(site)
    assert not broken, "\n".join(broken[:30])


def test_the_link_check_finds_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index.html").write_text('<h2 id="here">x</h2><a href="../b/">b</a><a href="#here">ok</a>'
                                              '<a href="#gone">x</a><a href="../index.html#top">t</a>')
    (tmp_path / "index.html").write_text('<p id="top">home</p><a href="https://example.org">out</a>')
    assert broken_links(tmp_path) == ["a/index.html: ../b/ (no such file)", "a/index.html: #gone (no id 'gone' there)"]


# --- in a real browser -------------------------------------------------------------------------

MAIN_PAGES = {"home": "", "guide": "patching/", "api": "api/patching/", "notebook": "notebooks/vision/",
              "gallery": "gallery/", "report": "gallery/report.html"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=15000"]


@pytest.fixture(scope="module")
def served(site):
    """The site on a localhost port, as a browser reaches it."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()


def chromium(args: list[str], profile: Path) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    done = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120)
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MAIN_PAGES))
def test_main_pages_render_their_figures_in_chromium(served, site, name, tmp_path):
    """Each main page, loaded from a localhost server in headless Chromium: its DOM after the scripts
    ran holds one drawn plot area per figure the page creates, and a screenshot is kept
    ($CLIP_LENS_SCREENSHOTS, else the test's temporary folder)."""
    url = served + MAIN_PAGES[name]
    dom = chromium(["--dump-dom", url], tmp_path / "profile")
    created = len(re.findall(r"Plotly\.newPlot\(", page(site, MAIN_PAGES[name] or "index.html")))
    drawn = len(re.findall(r'<svg class="main-svg"[^>]*>.*?<g class="cartesianlayer"><g class="subplot', dom, re.S))
    drawn_any = dom.count('class="plot-container plotly"')
    assert "clip_lens" in dom
    assert drawn_any == created, f"{name}: {drawn_any} plot areas drawn for {created} figures"
    if created:
        assert drawn > 0, f"{name}: no subplot drawn"
    shots = Path(os.environ.get("CLIP_LENS_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    chromium([f"--screenshot={shots / (name + '.png')}", "--window-size=1280,1600", url], tmp_path / "profile2")
    assert (shots / f"{name}.png").stat().st_size > 10_000
