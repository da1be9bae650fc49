"""Loaders that name every problem (issue 27): sizes in a file's metadata checked against the file
before anything is allocated, pairs files read without guessing, malformed captioner and Hugging
Face directories refused by name, `EdgeScores.top` bounded by the graph, and `hooks()` entered
so that an interrupt at any step leaves the context level as it was."""

from __future__ import annotations

import sys

import pytest


# hooks(): an interrupt at every step of entering ----------------------------------------------------
def _entry_lines(model) -> int:
    """How many line events the `hooks()` generator runs until it yields."""
    code, count = type(model).hooks.__wrapped__.__code__, [0]

    def trace(frame, event, arg):
        if frame.f_code is not code:
            return None

        def local(frame, event, arg):
            if event == "line":
                count[0] += 1
            return local
        return local

    sys.settrace(trace)
    try:
        with model.hooks():
            sys.settrace(None)
    finally:
        sys.settrace(None)
    return count[0]


def _enter_interrupted_at(model, k: int, fwd_hooks) -> None:
    """Enter `model.hooks(fwd_hooks)` with a KeyboardInterrupt raised at its k-th line event."""
    code, count = type(model).hooks.__wrapped__.__code__, [0]

    def trace(frame, event, arg):
        if frame.f_code is not code:
            return None

        def local(frame, event, arg):
            if event == "line":
                count[0] += 1
                if count[0] == k:
                    raise KeyboardInterrupt
            return local
        return local

    sys.settrace(trace)
    try:
        with model.hooks(fwd_hooks=fwd_hooks):
            sys.settrace(None)
            raise AssertionError("the block was entered: no interrupt was injected")
    finally:
        sys.settrace(None)


def test_an_interrupt_at_every_step_of_entering_hooks_leaves_the_level_and_no_hook(tiny_model):
    tower = tiny_model.vision
    fwd_hooks = [("blocks.0.hook_resid_post", lambda x, hook: x)]
    n = _entry_lines(tower)
    assert n >= 3
    for k in range(1, n + 1):
        with pytest.raises(KeyboardInterrupt):
            _enter_interrupted_at(tower, k, fwd_hooks)
        assert tower.context_level == 0, f"interrupt at line event {k} of {n} left the level at {tower.context_level}"
        assert not any(m._forward_hooks for m in tower.modules()), f"interrupt at line event {k} left a hook"
    with tower.hooks(fwd_hooks=fwd_hooks):  # still usable, and levels still nest
        assert tower.context_level == 1
    assert tower.context_level == 0


# EdgeScores.top: never an edge off the graph --------------------------------------------------------
def _edge_scores(graph):
    import torch

    from clip_lens.circuits import EdgeScores

    scores = torch.where(graph.valid, torch.rand(graph.valid.shape, generator=torch.Generator().manual_seed(0)),
                         torch.tensor(float("nan")))
    return EdgeScores(graph, scores, "eap", 1, None, baseline=torch.zeros(2), corrupted=torch.ones(2))


@pytest.mark.parametrize("signed", [False, True])
def test_edge_scores_top_returns_at_most_the_graphs_edges(signed):
    from clip_lens.circuits.graph import Graph

    graph = Graph(2, 2)
    scores = _edge_scores(graph)
    for n in (graph.n_edges, graph.n_edges + 1, graph.n_edges * 10):
        top = scores.top(n, signed=signed)
        assert len(top) == graph.n_edges
        assert all(bool(graph.valid[s, r]) for s, r in top)
        assert len(set(top)) == len(top)
    assert scores.top(0, signed=signed) == []


@pytest.mark.parametrize("n", [-1, 1.5, "3", None])
def test_edge_scores_top_refuses_a_count_that_is_not_a_non_negative_integer(n):
    from clip_lens.circuits.graph import Graph

    with pytest.raises(ValueError, match=r"n="):
        _edge_scores(Graph(1, 1)).top(n)


# pairs files: read without guessing, every problem named by file and line ---------------------------
def _tokenize(texts):
    """A word tokenizer (ids from each word's characters, EOT the largest id), padded to 40."""
    import torch

    ids = torch.zeros(len(texts), 40, dtype=torch.long)
    for i, text in enumerate(texts):
        codes = [1 + sum(map(ord, word)) % 900 for word in text.split()[:38]]
        ids[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        ids[i, len(codes)] = 1000
    return ids


def _read(path):
    from clip_lens.data import read_pairs_file

    return read_pairs_file(path, _tokenize)


BAD_PAIRS = {  # file name, bytes, what the error must say
    "unquoted comma": ("p.csv", b"caption,foil\nthe red dog.,the blue dog.\na dog, big.,a cat.\n", r"p\.csv, line 3: 3 fields"),
    "unquoted comma on every row": ("p.csv", b"caption,foil\na dog, big.,a cat.\na cat, big.,a dog.\n",
                                    r"p\.csv, line 2: 3 fields.*must be quoted"),
    "unterminated quote": ("p.csv", b'caption,foil\n"a dog.,a cat.\n', r"p\.csv, line \d+: not valid CSV"),
    "latin-1 csv": ("p.csv", "caption,foil\na caf\u00e9.,a bar.\n".encode("latin-1"), r"p\.csv, line 2: not UTF-8.*UTF-8"),
    "empty csv": ("p.csv", b"", r"p\.csv holds no pairs"),
    "header only csv": ("p.csv", b"caption,foil\n", r"p\.csv holds no pairs"),
    "repeated column": ("p.csv", b"caption,foil,foil\na,b,c\n", r"p\.csv, line 1: .*'foil' more than once"),
    "bad jsonl line": ("p.jsonl", b'{"caption": "a dog.", "foil": "a cat."}\n{"caption": "a dog.", \n',
                       r"p\.jsonl, line 2: not valid JSON"),
    "jsonl line not an object": ("p.jsonl", b'{"caption": "a dog.", "foil": "a cat."}\n["a", "b"]\n',
                                 r"p\.jsonl, line 2: expected a JSON object"),
    "empty jsonl": ("p.jsonl", b"\n\n", r"p\.jsonl holds no pairs"),
}


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_a_malformed_pairs_file_is_named_with_its_line(tmp_path, case):
    name, content, message = BAD_PAIRS[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        _read(tmp_path / name)


def test_a_folder_given_as_a_pairs_file_is_named(tmp_path):
    (tmp_path / "p.csv").mkdir()
    with pytest.raises(ValueError, match=r"p\.csv is a folder, not a pairs file"):
        _read(tmp_path / "p.csv")


@pytest.mark.parametrize("name, content", [
    ("bom.jsonl", b'\xef\xbb\xbf{"caption": "the red dog.", "foil": "the blue dog."}\n'),
    ("bom.csv", b"\xef\xbb\xbfcaption,foil\nthe red dog.,the blue dog.\n"),
    ("utf16.csv", "caption,foil\nthe red dog.,the blue dog.\n".encode("utf-16")),
    ("quoted.csv", b'caption,foil\n"the red dog, big.","the blue dog, big."\n'),
    ("crlf.csv", b"caption,foil\r\nthe red dog.,the blue dog.\r\n\r\n"),
    ("line_separator.jsonl", '{"caption": "the red\u2028dog.", "foil": "the blue\u2028dog."}\n'.encode()),
])
def test_a_pairs_file_with_a_bom_utf16_or_quoted_commas_is_read(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    pairs = _read(tmp_path / name)
    assert len(pairs.pairs) == 1 and pairs.pairs["a"].iloc[0].startswith("the red")
    assert pairs.pairs["b"].iloc[0].startswith("the blue")


def test_csv_values_are_kept_as_written(tmp_path):
    (tmp_path / "p.csv").write_text("id,caption,foil\n007,the red dog.,the blue dog.\n")
    assert _read(tmp_path / "p.csv").pairs["id"].tolist() == ["007"]


def test_the_cli_reports_a_malformed_pairs_file_in_one_line(tmp_path, capsys):
    from clip_lens.cli import main

    (tmp_path / "p.csv").write_bytes(BAD_PAIRS["unquoted comma"][1])
    assert main(["pairs", "heads", "--model", "clip_lens/tiny-shapes", "--pairs", str(tmp_path / "p.csv"),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "p.csv, line 3: 3 fields" in err and "Traceback" not in err
