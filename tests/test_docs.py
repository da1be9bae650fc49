"""The README's Python examples run as written (in order, sharing one namespace)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the examples are ours
    assert namespace["result"].effects.shape[1] == namespace["model"].text.cfg.n_layers + 1


def test_attribution_docs_examples_run():
    doc = Path(__file__).resolve().parents[1] / "docs" / "attribution.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)  # noqa: S102 - the examples are ours
    assert namespace["res"].effects.shape == (3, 2, 3)
    assert namespace["exact"].effects.shape == (3, 1, 1, 64)
    assert set(namespace["faith"].areas["method"]) == {"attribution patching", "logit lens", "random"}


def test_circuits_docs_examples_run():
    doc = Path(__file__).resolve().parents[1] / "docs" / "circuits.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)  # noqa: S102 - the examples are ours
    assert len(namespace["exact"].table()) == 10
    assert set(namespace["curve"]["kind"]) == {"circuit", "random"}
    assert namespace["circuit"].n_edges <= 50
    assert namespace["vision_scores"].graph.n_edges == 262
