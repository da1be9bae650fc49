"""docs/methods.md is the one home of the studies' definitions: nothing points elsewhere, each
definition has one heading, and every link into it lands on a heading."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".ipynb", ".toml", ".txt", ".json")) and (ROOT / n).is_file()]


def _headings() -> list[str]:
    return [m.group(1) for m in re.finditer(r"^#{2,4} (.+)$", METHODS.read_text(), flags=re.M)]


def test_anchor_rule():
    assert _anchor("Causal tracing effect (CTE)") == "causal-tracing-effect-cte"
    assert _anchor("Restored difference d*") == "restored-difference-d"


def test_each_definition_has_one_heading():
    anchors = [_anchor(h) for h in _headings()]
    assert len(anchors) == len(set(anchors))
    for needed in ("the-score-s", "the-difference-d", "segments", "layer-numbering", "causal-tracing",
                   "causal-tracing-effect-cte", "aligned-positions", "localisation", "negator-selective-attention",
                   "image-ablation-effect-iae", "attention-cancellation", "attribution-patching", "logit-lens",
                   "deletion-curves-and-their-area", "semantic-alignment-of-a-latent"):
        assert needed in anchors


def test_nothing_points_to_a_methods_file_outside_the_package():
    old_name = "METHODS" + ".md"  # spelled apart so this file does not name it
    offenders = [str(p.relative_to(ROOT)) for p in _tracked_text_files() if old_name in p.read_text(errors="replace")]
    assert offenders == []


def test_every_link_into_methods_lands_on_a_heading():
    anchors = {_anchor(h) for h in _headings()}
    links = []
    for path in _tracked_text_files():
        links += [(str(path.relative_to(ROOT)), a) for a in re.findall(r"methods\.md#([\w\-]+)", path.read_text(errors="replace"))]
    assert len(links) >= 20
    broken = [(where, a) for where, a in links if a not in anchors]
    assert broken == []


def test_readme_links_to_the_methods():
    assert "docs/methods.md" in (ROOT / "README.md").read_text()
