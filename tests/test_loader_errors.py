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
