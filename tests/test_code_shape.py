"""The study layer and its front ends stay readable: no function in clip_lens/studies/ (its
analyses included), the CLI or the sweep is over 60 lines (its def line to its last) or takes more
than 8 parameters (self and cls not counted)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("clip_lens/studies", "clip_lens/cli", "clip_lens/sweep")
MAX_LINES, MAX_PARAMETERS = 60, 8


def functions(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


def parameters(node: ast.FunctionDef) -> int:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return len([n for n in names if n not in ("self", "cls")])


def test_the_measure_counts_what_it_should():
    tree = ast.parse("def f(self, a, b=1, *args, c, d=2, **kw):\n    x = 1\n    return x\n")
    node = tree.body[0]
    assert parameters(node) == 6 and node.end_lineno - node.lineno + 1 == 3


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_long_function_and_no_long_signature(folder):
    found = list(functions(folder))
    assert found, f"no function found under {folder}"
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)" for path, node in found
            if node.end_lineno - node.lineno + 1 > MAX_LINES]
    wide = [f"{path}:{node.lineno} {node.name} ({parameters(node)} parameters)" for path, node in found
            if parameters(node) > MAX_PARAMETERS]
    assert not long and not wide, "\n".join(long + wide)
