"""Circuits: sets of edges, chosen from edge scores, pruned, and measured by faithfulness
(docs/methods.md#faithfulness).

A circuit's model computes every edge inside the circuit normally and gives every edge outside
it the corrupted run's value. Its faithfulness is (m_circuit - m_corrupt) / (m_clean - m_corrupt)
of the metric's means over pairs: 1 when the circuit carries the whole clean-corrupt difference,
0 when it carries none of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.checks import is_integer
from clip_lens.circuits.edge_attribution import EdgeScores
from clip_lens.circuits.forward import cached_run, check_count, removed_edges, run_circuit
from clip_lens.circuits.graph import Graph
from clip_lens.circuits.path_patching import Edge, resolve_edges
from clip_lens.circuits.task import Task


@dataclass(frozen=True)
class Circuit:
    """A set of edges of a graph. `edges` is [n_senders, n_receivers] bool."""

    graph: Graph
    edges: Bool[Tensor, "sender receiver"]

    @classmethod
    def from_edges(cls, graph: Graph, edges: Sequence[Edge]) -> "Circuit":
        """A circuit of the named (or indexed) edges; no edges is the empty circuit."""
        return _circuit(graph, resolve_edges(graph, edges) if len(edges) else [])

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    def edge_list(self) -> list[tuple[int, int]]:
        return [(int(s), int(r)) for s, r in self.edges.nonzero()]

    def edge_names(self) -> list[str]:
        return [self.graph.edge_name(s, r) for s, r in self.edge_list()]

    def nodes(self) -> list[str]:
        """The nodes the circuit's edges join, in graph order (senders, then "output")."""
        names = {self.graph.senders[s] for s, _ in self.edge_list()}
        names |= {self.graph.node_of_receiver(r) for _, r in self.edge_list()}
        return [n for n in [*self.graph.senders, "output"] if n in names]

    def pruned(self) -> "Circuit":
        """The circuit without edges that cannot matter: those into a node with no edge out of it
        (its output reaches the metric through no kept edge) and those out of a node with no edge
        into it (all its inputs are corrupted, so it computes its corrupted output exactly), until
        none is left. The output node needs no edge out, the input none in. Faithfulness is
        unchanged (up to float rounding)."""
        g, edges = self.graph, self.edges.clone()
        node_of_receiver = [g.node_of_receiver(r) for r in range(g.n_receivers)]
        sender_of_node = {name: i for i, name in enumerate(g.senders)}
        receivers_of_node: dict[str, list[int]] = {}
        for r, name in enumerate(node_of_receiver):
            receivers_of_node.setdefault(name, []).append(r)
        while True:
            before = int(edges.sum())
            has_out = edges.any(1)                                            # [sender]
            has_in = {name: bool(edges[:, rs].any()) for name, rs in receivers_of_node.items()}
            for r, name in enumerate(node_of_receiver):
                if name != "output" and not has_out[sender_of_node[name]]:
                    edges[:, r] = False
            for name, s in sender_of_node.items():
                if name != "input" and not has_in[name]:
                    edges[s, :] = False
            if int(edges.sum()) == before:
                return Circuit(g, edges)

    def table(self, scores: Optional[EdgeScores] = None) -> pd.DataFrame:
        frame = pd.DataFrame({"edge": self.edge_names(),
                              "sender": [self.graph.senders[s] for s, _ in self.edge_list()],
                              "receiver": [self.graph.receivers[r] for _, r in self.edge_list()]})
        if scores is not None:
            frame["score"] = [float(scores.scores[s, r]) for s, r in self.edge_list()]
            frame = frame.reindex(frame["score"].abs().sort_values(ascending=False).index).reset_index(drop=True)
        return frame


def top_edges(scores: EdgeScores, n: int, signed: bool = False) -> Circuit:
    """The n most important edges (`EdgeScores.importance`)."""
    _check_size(n, scores.graph)
    return _circuit(scores.graph, scores.top(n, signed))


def threshold_edges(scores: EdgeScores, threshold: float, signed: bool = False) -> Circuit:
    """Every edge whose importance (`EdgeScores.importance`) is at least `threshold`."""
    if not threshold >= 0:
        raise ValueError(f"threshold={threshold!r}: give a non-negative number (edges are kept by |score|)")
    return Circuit(scores.graph, scores.graph.valid & (scores.importance(signed) >= threshold))


def greedy_edges(scores: EdgeScores, n: int, signed: bool = False) -> Circuit:
    """Grow a circuit from the output: at each step add the most important edge
    (`EdgeScores.importance`) among
    those whose receiver belongs to the output or to a node that already sends into the circuit,
    so that every edge chosen has a path to the output."""
    graph = scores.graph
    _check_size(n, graph)
    no = torch.tensor(-1.0, device="cpu")
    magnitude = scores.importance(signed)
    receiver_nodes = [graph.node_of_receiver(r) for r in range(graph.n_receivers)]
    edges = torch.zeros_like(graph.valid)
    reached = torch.tensor([name == "output" for name in receiver_nodes], device="cpu")  # [receiver]
    for _ in range(n):
        candidates = torch.where(reached[None] & ~edges, magnitude, no)
        s, r = divmod(int(candidates.flatten().argmax()), graph.n_receivers)
        if candidates[s, r] < 0:
            break
        edges[s, r] = True
        # the sender's own receivers now lead to the output
        reached |= torch.tensor([name == graph.senders[s] for name in receiver_nodes], device="cpu")
    return Circuit(graph, edges)


def path_edges(scores: EdgeScores, n: int, signed: bool = False) -> Circuit:
    """Grow a circuit path by path: repeatedly add the input-to-output path whose weakest new edge
    is strongest (largest min importance over the edges it adds; edges already in the circuit cost
    nothing), stopping at the first path that would take the circuit past n edges.

    Every edge chosen lies on a path from the input to the output. A set of top-scoring edges may
    not: an edge out of a node that no kept edge feeds carries the corrupted value anyway (see
    `Circuit.pruned`), so it adds nothing to faithfulness. The circuits of growing n are nested."""
    _check_size(n, scores.graph)
    return _circuit(scores.graph, [edge for path in path_sequence(scores, n, signed) for edge in path])


def path_sequence(scores: EdgeScores, n: int, signed: bool = False) -> list[list[tuple[int, int]]]:
    """The new edges of each path `path_edges` adds, in order, while they fit in n edges in all."""
    graph = scores.graph
    magnitude = scores.importance(signed).numpy().astype(np.float64)
    edges = np.zeros(tuple(graph.valid.shape), dtype=bool)
    paths, total = [], 0
    while True:
        path = _strongest_new_path(graph, magnitude, edges)
        if path is None or total + len(path) > n:
            return paths
        for s, r in path:
            edges[s, r] = True
        paths.append(path)
        total += len(path)


def _receivers_by_node(graph: Graph) -> list[tuple[int, np.ndarray]]:
    """(upstream senders, receiver indices) of every node after the input, in graph order: all
    receivers of one node read the same senders 0..upstream-1. The output is node n_senders."""
    nodes = []
    for layer in range(graph.n_layers):
        upstream = graph.senders_before(layer)
        for head in range(graph.n_heads):
            nodes.append((upstream, np.array([graph.head_receiver(layer, head, x) for x in "qkv"])))
        nodes.append((upstream + graph.n_heads, np.array([graph.mlp_receiver(layer)])))
    return nodes + [(graph.n_senders, np.array([graph.output_receiver]))]


def _strongest_new_path(graph: Graph, magnitude: np.ndarray, edges: np.ndarray) -> Optional[list[tuple[int, int]]]:
    """The new edges of the input-to-output path with at least one edge outside `edges` whose
    weakest such edge is strongest (dynamic programming over the nodes in order), or None.

    Per node, state 0: reached from the input through circuit edges only (+inf, or -inf if not);
    state 1: through at least one new edge, valued by the weakest new edge on the way."""
    inf = np.inf
    best = np.full((graph.n_senders + 1, 2), -inf)
    back: dict[tuple[int, int], tuple[int, int, int]] = {}  # (node, state) -> (sender, receiver, sender state)
    best[0, 0] = inf
    for node, (upstream, receivers) in enumerate(_receivers_by_node(graph), start=1):
        old = edges[:upstream, receivers]                                     # [sender, receiver]
        reach = best[:upstream]                                               # [sender, state]
        for state in (0, 1):  # through circuit edges only, keeping the sender's state
            values = np.where(old, reach[:, state, None], -inf)
            if values.max() > best[node, state]:
                s, i = np.unravel_index(values.argmax(), values.shape)
                best[node, state], back[(node, state)] = values[s, i], (int(s), int(receivers[i]), state)
        from_state = (reach[:, 1] > reach[:, 0]).astype(int)                  # [sender]
        via = np.minimum(reach[np.arange(upstream), from_state][:, None], magnitude[:upstream, receivers])
        values = np.where(~old & (magnitude[:upstream, receivers] > 0), via, -inf)
        if values.max() > best[node, 1]:
            s, i = np.unravel_index(values.argmax(), values.shape)
            best[node, 1], back[(node, 1)] = values[s, i], (int(s), int(receivers[i]), int(from_state[s]))
    if best[graph.n_senders, 1] == -inf:
        return None
    path, node, state = [], graph.n_senders, 1
    while node != 0:
        s, r, from_state = back[(node, state)]
        if not edges[s, r]:
            path.append((s, r))
        node, state = s, from_state
    return path


def random_circuit(graph: Graph, n: int, seed: int) -> Circuit:
    """n edges drawn uniformly from the graph's edges (the control for a circuit of that size)."""
    _check_size(n, graph)
    valid = graph.valid.nonzero()
    pick = torch.randperm(len(valid), generator=torch.Generator().manual_seed(seed), device="cpu")[:n]
    return _circuit(graph, [(int(s), int(r)) for s, r in valid[pick]])


def _circuit(graph: Graph, edges: list[tuple[int, int]]) -> Circuit:
    mask = torch.zeros_like(graph.valid)
    for s, r in edges:
        mask[s, r] = True
    return Circuit(graph, mask)


def _check_size(n: int, graph: Graph) -> None:
    if not is_integer(n) or not 0 <= n <= graph.n_edges:
        raise ValueError(f"a circuit of {n!r} edges: give 0..{graph.n_edges} (the edges of this graph)")


@dataclass
class Faithfulness:
    """Metrics of circuits on a task. `metrics` is [n_circuits, n_pairs]; `clean` and `corrupt`
    are [n_pairs], computed by the same forward pass with every edge kept and none kept."""

    metrics: Tensor
    clean: Tensor
    corrupt: Tensor

    @property
    def faithfulness(self) -> np.ndarray:
        """[n_circuits]: (mean m_circuit - mean m_corrupt) / (mean m_clean - mean m_corrupt)."""
        gap = float(self.clean.mean() - self.corrupt.mean())
        if gap == 0:
            raise ValueError("the clean and corrupted runs have the same mean metric: faithfulness is undefined")
        return ((self.metrics.mean(1) - self.corrupt.mean()) / gap).numpy()


def evaluate(task: Task, circuits: Sequence[Circuit], *, pair_chunk: int = 32, progress: bool = True) -> Faithfulness:
    """The metric of each circuit's model on every pair, with the clean and corrupted references."""
    graph = Graph.of(task.tower)
    for i, circuit in enumerate(circuits):
        if circuit.graph != graph:
            raise ValueError(f"circuit {i} belongs to a {circuit.graph.describe()} graph, not this tower's "
                             f"({graph.describe()})")
    masks = [removed_edges(graph, None), removed_edges(graph, torch.zeros_like(graph.valid))]
    masks += [removed_edges(graph, c.edges) for c in circuits]
    check_count(pair_chunk, "pair_chunk", minimum=1)
    metrics = torch.empty(len(masks), task.n_pairs, device="cpu")
    chunks = range(0, task.n_pairs, pair_chunk)
    with tqdm(total=len(chunks) * len(masks), desc="circuits", disable=not progress) as bar:
        for lo in chunks:
            hi = min(lo + pair_chunk, task.n_pairs)
            chunk = task.rows(lo, hi)
            corrupt = cached_run(chunk, chunk.corrupt).senders
            for i, removed in enumerate(masks):
                with torch.no_grad():
                    metrics[i, lo:hi] = chunk.metric(run_circuit(chunk.tower, chunk.clean, corrupt, removed)).cpu()
                bar.update()
    return Faithfulness(metrics[2:], metrics[0], metrics[1])


SELECTIONS = {"paths": path_edges, "greedy": greedy_edges, "top": top_edges}


def faithfulness_curve(task: Task, scores: EdgeScores, sizes: Sequence[int], *, n_random: int = 3,
                       selection: str = "paths", signed: bool = False, prune: bool = True, seed: int = 0, pair_chunk: int = 32,
                       progress: bool = True) -> pd.DataFrame:
    """Faithfulness of the circuit of each size, next to random circuits of the same size.

    Returns one row per circuit: size, kind ("circuit" / "random"), seed, edges (after pruning),
    faithfulness, metric (mean over pairs).
    """
    select = SELECTIONS.get(selection)
    if select is None:
        raise ValueError(f"selection={selection!r}: use one of {tuple(SELECTIONS)}")
    circuits, rows = [], []
    for size in sizes:
        _check_size(size, scores.graph)
    if selection == "paths":  # nested: one sequence of paths, cut at each size
        paths = path_sequence(scores, max(int(size) for size in sizes), signed)
    for size in sizes:
        if selection == "paths":
            kept, total = [], 0
            for path in paths:
                if total + len(path) > size:
                    break
                kept, total = kept + path, total + len(path)
            chosen = _circuit(scores.graph, kept)
        else:
            chosen = select(scores, int(size), signed)
        circuits.append(chosen.pruned() if prune else chosen)
        rows.append((int(size), "circuit", -1))
        for k in range(n_random):
            circuits.append(random_circuit(scores.graph, int(size), seed + k))
            rows.append((int(size), "random", seed + k))
    result = evaluate(task, circuits, pair_chunk=pair_chunk, progress=progress)
    frame = pd.DataFrame(rows, columns=["size", "kind", "seed"])
    frame["edges"] = [c.n_edges for c in circuits]
    frame["faithfulness"] = result.faithfulness
    frame["metric"] = result.metrics.mean(1).numpy()
    frame.attrs.update(clean=float(result.clean.mean()), corrupt=float(result.corrupt.mean()))
    return frame
