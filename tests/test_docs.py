"""The README's Python examples run as written (in order, sharing one namespace)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def run_python_blocks(doc: Path, at_least: int) -> dict:
    """Execute a Markdown file's ```python blocks in order in one namespace; return the namespace."""
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) >= at_least
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)  # noqa: S102 - the examples are ours
    return namespace


def test_readme_python_examples_run():
    namespace = run_python_blocks(README, 2)
    assert namespace["result"].effects.shape[1] == namespace["model"].text.cfg.n_layers + 1


def test_attribution_docs_examples_run():
    namespace = run_python_blocks(ROOT / "docs" / "attribution.md", 2)
    assert namespace["res"].effects.shape == (3, 2, 3)
    assert namespace["exact"].effects.shape == (3, 1, 1, 64)
    assert set(namespace["faith"].areas["method"]) == {"attribution patching", "logit lens", "random"}


def test_circuits_docs_examples_run():
    namespace = run_python_blocks(ROOT / "docs" / "circuits.md", 2)
    assert len(namespace["exact"].table()) == 10
    assert set(namespace["curve"]["kind"]) == {"circuit", "random"}
    assert namespace["circuit"].n_edges <= 50
    assert namespace["vision_scores"].graph.n_edges == 262


def test_pairs_docs_example_runs(monkeypatch):
    monkeypatch.chdir(ROOT)  # the example reads ../shared/data, beside the repository
    namespace = run_python_blocks(ROOT / "docs" / "pairs.md", 1)
    assert len(namespace["pieces"]) == 11 and len(namespace["existence"]) == 490
    assert set(namespace["foil_it"].summary()["outcome"]) >= {"kept"}
    mine = namespace["mine"].pairs  # a user's file, read with the model's tokenize
    assert mine["a"].tolist() == ["There is a dog.", "A red car."] and (mine["span_end"] > mine["span_start"]).all()


def test_captioning_docs_examples_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the example writes its scenes into the working directory
    namespace = run_python_blocks(ROOT / "docs" / "captioning.md", 3)
    assert namespace["features"].shape == (4, 17, 64) and namespace["ids"].shape[0] == 4
    summary = namespace["result"].summary()
    assert summary["setting"].tolist()[0] == "baseline" and summary["mean_generated_cosine"].notna().all()
    assert namespace["result"].caption_table(0)["generated"].nunique() >= 2


def test_sweeps_docs_spec_reads_and_python_example_runs(monkeypatch, tmp_path):
    from clip_lens import sweep

    spec_text = re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "sweeps.md").read_text(), flags=re.S)[0]
    spec = sweep.read_spec(spec_text, base=tmp_path)
    assert [m.name for m in spec.models] == ["tiny", "b32-openai", "l14-random", "hf-b16"]
    assert len(spec.datasets) == 5 and len(spec.studies) == 8
    monkeypatch.chdir(tmp_path)  # the example loads runs/sweep: a small sweep of the tiny model writes it
    small = ('out = "runs/sweep"\n[[models]]\nname = "tiny"\narchitecture = "clip_lens/tiny-shapes"\n'
             '[[datasets]]\nname = "scenes"\nkind = "shapes"\nscenes = 4\n'
             + "".join(f'[[studies]]\nname = "{s}"\n' for s in ("accuracy", "causal-tracing", "selective-heads", "image-ablation")))
    assert sweep.run(sweep.read_spec(small, base=tmp_path), progress=False).ok
    namespace = run_python_blocks(ROOT / "docs" / "sweeps.md", 1)
    assert set(namespace["tables"]) >= {"accuracy", "localisation", "heads", "image_ablation", "manifest"}


def test_transformer_lens_docs_examples_run():
    namespace = run_python_blocks(ROOT / "docs" / "transformer_lens.md", 6)
    assert namespace["attrs"].shape == (len(namespace["labels"]), 2)
    assert namespace["at_eot"].shape == (4, 2, 64)


def test_sae_docs_examples_run():
    namespace = run_python_blocks(ROOT / "docs" / "sae.md", 6)
    assert (len(namespace["store"]), namespace["store"].d) == (3120, 64)
    assert namespace["latents"].shape == (2, 65, 128)
    assert set(namespace["table"].columns) >= {"S_recovered", "accuracy_recovered"}
    assert len(namespace["read_browser_data"](namespace["page"])["latents"]) == 128
