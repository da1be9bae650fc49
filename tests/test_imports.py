"""The package's import structure: `import clip_lens` works in a fresh interpreter, no module of
clip_lens (the studies included, installed as clip_lens.experiments from the top-level
experiments/ folder) imports another that imports it back, and only the CLI reaches into the
studies."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clip_lens"
STUDIES = PACKAGE.parent / "experiments"  # installed as clip_lens.experiments


def _module_name(path: Path) -> str:
    if STUDIES in path.parents:
        parts = ("clip_lens", "experiments", *path.relative_to(STUDIES).with_suffix("").parts)
    else:
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The modules `path` imports, at any depth of its code (function-level imports included)."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in [*PACKAGE.rglob("*.py"), *STUDIES.rglob("*.py")]}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    internal = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(internal[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(internal):
        if node not in state:
            visit(node)
    return cycles


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "clip_lens.towers" in graph["clip_lens.model"]
    assert "clip_lens.patching.sites" in graph["clip_lens.patching.request"]
    assert "clip_lens.data.shapes" in graph["clip_lens.tiny"]  # `from clip_lens.data import shapes`
    # the finder itself finds a planted cycle
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle_in_clip_lens():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_the_cli_and_the_sweep_import_the_experiments():
    graph = import_graph()
    assert "clip_lens.studies.analyses.causal_tracing" in graph  # the studies are part of the graph
    library = [m for m in graph if not m.startswith("clip_lens.experiments")]
    importers = sorted(m for m in library if any(d.startswith("clip_lens.experiments") or d.split(".")[0] == "experiments"
                                                 for d in graph[m]))
    assert importers == ["clip_lens.cli", "clip_lens.sweep.studies"]  # the two drivers of the studies
    assert not any(d.split(".")[0] == "experiments" for deps in graph.values() for d in deps)  # no top-level name


def test_import_clip_lens_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", "import clip_lens; print(clip_lens.patch.__module__)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clip_lens.patching"


def test_a_users_own_experiments_folder_does_not_shadow_the_studies(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "__init__.py").write_text("raise ImportError('the user experiments package')\n")
    (tmp_path / "experiments" / "negation_study.py").write_text("raise ImportError('the user study')\n")
    code = "import clip_lens.studies.negation as m, clip_lens.cli; print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == STUDIES
