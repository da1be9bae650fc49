"""Figures of circuits: the circuit as a layered graph, the faithfulness curve, and edge estimates
against exact edge patching."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from clip_lens.circuits.circuit import Circuit
from clip_lens.circuits.edge_attribution import EdgeScores
from clip_lens.circuits.graph import Graph
from clip_lens.plot import style

# the input a receiver reads through: query, key, value (heads) or its whole input (MLP, output)
INPUT_STYLES = {"q": ("#3a86ff", "solid"), "k": ("#8338ec", "dot"), "v": ("#fb8500", "dash"), "": ("#555555", "solid")}
NODE_COLOURS = {"input": "#2a9d8f", "head": "#264653", "mlp": "#e9c46a", "output": "#d62828"}


def node_positions(graph: Graph) -> dict[str, tuple[float, float]]:
    """(x, y) of every node: one row per block (attention heads left to right, its MLP at the right
    end, half a row higher, since it reads the heads' outputs), the input below, the output above."""
    positions = {"input": ((graph.n_heads - 1) / 2, -1.0), "output": ((graph.n_heads - 1) / 2, float(graph.n_layers))}
    for layer in range(graph.n_layers):
        for head in range(graph.n_heads):
            positions[f"a{layer}.h{head}"] = (float(head), float(layer))
        positions[f"m{layer}"] = (graph.n_heads + 0.5, layer + 0.5)
    return positions


def _kind(name: str) -> str:
    return "input" if name == "input" else "output" if name == "output" else "mlp" if name.startswith("m") else "head"


def circuit_figure(circuit: Circuit, scores: Optional[EdgeScores] = None, title: str = "Circuit") -> go.Figure:
    """The circuit as a layered graph: blocks as rows, heads and MLPs as nodes, each edge drawn from
    its sender to the node it enters, its width growing with |score| and its colour and dash saying
    which input it enters (query, key, value, or an MLP's / the output's whole input)."""
    graph, positions = circuit.graph, node_positions(circuit.graph)
    edges = circuit.edge_list()
    weights = np.array([abs(float(scores.scores[s, r])) for s, r in edges]) if scores is not None and edges else np.ones(len(edges))
    top = weights.max() if len(weights) and weights.max() > 0 else 1.0
    fig = go.Figure()
    shown = set()
    for (s, r), weight in zip(edges, weights):
        receiver = graph.receivers[r]
        qkv = receiver[-2] if receiver.endswith(">") else ""
        colour, dash = INPUT_STYLES[qkv]
        (x0, y0), (x1, y1) = positions[graph.senders[s]], positions[graph.node_of_receiver(r)]
        label = {"q": "query input", "k": "key input", "v": "value input", "": "MLP / output input"}[qkv]
        score = f"<br>score {float(scores.scores[s, r]):+.4f}" if scores is not None else ""
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", line=dict(color=colour, dash=dash,
                                 width=1 + 7 * weight / top), opacity=0.75, name=label, legendgroup=label,
                                 showlegend=label not in shown, hovertext=f"{graph.edge_name(s, r)}{score}",
                                 hoverinfo="text"))
        shown.add(label)
    nodes = circuit.nodes()
    all_nodes = list(positions)
    fig.add_trace(go.Scatter(x=[positions[n][0] for n in all_nodes], y=[positions[n][1] for n in all_nodes],
                             mode="markers", marker=dict(size=7, color="#dddddd"), hoverinfo="text", hovertext=all_nodes,
                             showlegend=False))
    fig.add_trace(go.Scatter(x=[positions[n][0] for n in nodes], y=[positions[n][1] for n in nodes],
                             mode="markers+text", text=nodes, textposition="top center",
                             marker=dict(size=14, color=[NODE_COLOURS[_kind(n)] for n in nodes],
                                         line=dict(color="white", width=1)),
                             hoverinfo="text", hovertext=nodes, name="nodes in the circuit"))
    fig.update_yaxes(title_text="block", tickmode="array", tickvals=list(range(-1, graph.n_layers + 1)),
                     ticktext=["input", *map(str, range(graph.n_layers)), "output"], zeroline=False)
    fig.update_xaxes(title_text="head (MLP at the right)", tickvals=list(range(graph.n_heads)) + [graph.n_heads + 0.5],
                     ticktext=[*map(str, range(graph.n_heads)), "MLP"], zeroline=False)
    return style(fig, f"{title}: {circuit.n_edges} edges, {len(nodes)} nodes", height=max(420, 60 * graph.n_layers))


def faithfulness_figure(curve: pd.DataFrame, title: str = "Faithfulness by circuit size") -> go.Figure:
    """Faithfulness of the circuit of each size (a line per `method`, if the column is there) against
    random circuits of the same size (their mean, and each as a dot). `curve`: size, kind ("circuit" /
    "random"), faithfulness, edges (after pruning), optionally method."""
    fig = go.Figure()
    found = curve[curve["kind"] == "circuit"].sort_values("size")
    random = curve[curve["kind"] == "random"]
    if len(random):
        mean = random.groupby("size")["faithfulness"].mean().reset_index()
        fig.add_trace(go.Scatter(x=random["size"], y=random["faithfulness"], mode="markers", name="random circuits",
                                 marker=dict(color="#bbbbbb", size=6)))
        fig.add_trace(go.Scatter(x=mean["size"], y=mean["faithfulness"], mode="lines", name="random (mean)",
                                 line=dict(color="#888888", dash="dot")))
    methods = found["method"] if "method" in found else pd.Series("circuit", index=found.index)
    for (method, part), colour in zip(found.groupby(methods, sort=False), ["#d62828", "#3a86ff", "#2a9d8f"]):
        fig.add_trace(go.Scatter(x=part["size"], y=part["faithfulness"], mode="lines+markers", name=f"{method}",
                                 line=dict(color=colour, width=3),
                                 hovertext=[f"{e} edges after pruning" for e in part["edges"]]))
    fig.add_hline(y=1.0, line=dict(color="#2a9d8f", dash="dash"), annotation_text="clean model")
    fig.add_hline(y=0.0, line=dict(color="#555555", dash="dash"), annotation_text="corrupted model")
    sizes = sorted({int(v) for v in curve["size"]})
    # the sizes themselves as ticks: a log axis left to itself labels its minor ticks ("8 9 1 2 3")
    fig.update_xaxes(title_text="edges in the circuit", type="log", tickmode="array", tickvals=sizes,
                     ticktext=[str(v) for v in sizes], minor=dict(showgrid=False, ticks=""))
    fig.update_yaxes(title_text="faithfulness (m - m_corrupt) / (m_clean - m_corrupt)")
    return style(fig, title, height=420)


def estimate_figure(check: pd.DataFrame, title: str = "Edge estimates against exact edge patching") -> go.Figure:
    """Each checked edge's estimate (one colour per method) against its exact effect.
    `check`: edge, exact, and one column per method."""
    fig = go.Figure()
    methods = [c for c in check.columns if c not in ("edge", "sender", "receiver", "exact")]
    for method, colour in zip(methods, ["#3a86ff", "#d62828", "#2a9d8f", "#fb8500"]):
        fig.add_trace(go.Scatter(x=check["exact"], y=check[method], mode="markers", name=method, hovertext=check["edge"],
                                 marker=dict(color=colour, size=7, opacity=0.7)))
    low = float(np.nanmin(check[["exact", *methods]].to_numpy()))
    high = float(np.nanmax(check[["exact", *methods]].to_numpy()))
    fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="estimate = exact",
                             line=dict(color="#888888", dash="dot")))
    fig.update_xaxes(title_text="exact effect of corrupting the edge")
    fig.update_yaxes(title_text="estimate")
    return style(fig, title, height=440)
