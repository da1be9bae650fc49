"""The package's import structure: `import clip_lens` works in a fresh interpreter and from a plain
checkout (every module resolves by its path, no package-dir mapping), no module of clip_lens
imports another that imports it back, only the front ends (the CLI and the sweep) reach into the
studies, and no study imports a front end."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clip_lens"
REPRODUCTIONS = ROOT / "experiments"  # runnable scripts over clip_lens.studies, never imported by clip_lens


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
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
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
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


def test_only_the_front_ends_import_the_studies():
    graph = import_graph()
    assert "clip_lens.studies.analyses.causal_tracing" in graph  # the studies are part of the graph
    outside = [m for m in graph if not m.startswith(("clip_lens.studies", "clip_lens.cli", "clip_lens.sweep"))]
    importers = sorted(m for m in outside if any(d.startswith("clip_lens.studies") for d in graph[m]))
    assert importers == []  # model, engine, circuits, data, reporting know no study
    studies = [m for m in graph if m.startswith("clip_lens.studies")]
    assert not [m for m in studies if any(d.startswith(("clip_lens.cli", "clip_lens.sweep")) for d in graph[m])]
    assert not any(d.split(".")[0] == "experiments" for deps in graph.values() for d in deps)  # no top-level name


def test_the_studies_import_from_a_plain_checkout(tmp_path):
    """`PYTHONPATH=. python -c "import clip_lens.studies"` in a copy of the tree with no install."""
    import shutil

    checkout = tmp_path / "checkout"
    shutil.copytree(PACKAGE, checkout / "clip_lens", ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    code = "import clip_lens.studies, clip_lens.studies.valse_existence as m; print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=checkout, env={**__import__("os").environ, "PYTHONPATH": "."},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().parent == (checkout / "clip_lens" / "studies").resolve()


def test_the_reproductions_import_only_the_package():
    for path in REPRODUCTIONS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("experiments",):
                raise AssertionError(f"{path.name} imports {node.module}: reproductions compose clip_lens.studies only")


def test_import_clip_lens_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", "import clip_lens; print(clip_lens.patch.__module__)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clip_lens.patching.engine"  # the function, not a module of that name


def test_a_users_own_experiments_folder_does_not_shadow_the_studies(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "__init__.py").write_text("raise ImportError('the user experiments package')\n")
    code = "import clip_lens.studies.valse_existence as m, clip_lens.cli; print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == PACKAGE / "studies"
