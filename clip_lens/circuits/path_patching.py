"""Exact edge patching: the metric when one edge s -> r carries the corrupted run's value
(docs/methods.md#path-patching).

Receiver r alone reads s's corrupted output: its input becomes resid + (corrupt_out_s - out_s),
everything else is the clean run, and the change flows on through whatever r feeds. Nothing
before r's block changes, so each run resumes from the clean residual at r's block. Edges into
one receiver share a batch: the receiver's hook rebuilds its own query / key / value (or MLP
pre-activation) from the shifted input, for every sender at once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence, Union

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.circuits.forward import cached_run, check_count
from clip_lens.circuits.graph import QKV, Graph
from clip_lens.circuits.task import Task
from clip_lens.hooks import act_name

Edge = Union[str, tuple[int, int]]


@dataclass
class PathPatching:
    """Exact effects of corrupting single edges.

    Attributes:
        graph: the tower's graph.
        edges: the (sender, receiver) indices, in the order asked.
        effects: [n_pairs, n_edges], metric(edge corrupted) - metric(clean) per pair.
        baseline: [n_pairs], the clean metric.
    """

    graph: Graph
    edges: list[tuple[int, int]]
    effects: Float[Tensor, "pair edge"]
    baseline: Float[Tensor, " pair"]

    def table(self) -> pd.DataFrame:
        """One row per edge: edge, sender, receiver, effect (mean over pairs)."""
        mean = self.effects.mean(0).numpy()
        return pd.DataFrame({"edge": [self.graph.edge_name(s, r) for s, r in self.edges],
                             "sender": [self.graph.senders[s] for s, _ in self.edges],
                             "receiver": [self.graph.receivers[r] for _, r in self.edges], "effect": mean})


def resolve_edges(graph: Graph, edges: Sequence[Edge]) -> list[tuple[int, int]]:
    """Edges given by name ("a0.h1->a2.h3<q>") or by index pairs, checked against the graph."""
    out = []
    for edge in edges:
        if isinstance(edge, str):
            out.append(graph.edge(edge))
            continue
        s, r = (int(i) for i in edge)
        if not (0 <= s < graph.n_senders and 0 <= r < graph.n_receivers):
            raise ValueError(f"edge {edge!r} is outside the graph ({graph.n_senders} senders, {graph.n_receivers} receivers)")
        if not graph.valid[s, r]:
            raise ValueError(f"edge {graph.edge_name(s, r)!r}: receiver {graph.receivers[r]!r} reads the residual "
                             f"stream before sender {graph.senders[s]!r} writes to it")
        out.append((s, r))
    if not out:
        raise ValueError("edges is empty: give at least one edge")
    return out


def path_patch(task: Task, edges: Sequence[Edge], *, batch_size: int = 256, pair_chunk: int = 32,
               progress: bool = True) -> PathPatching:
    """The exact effect of corrupting each edge alone, for every pair of the task.

    Args:
        edges: names "sender->receiver" (e.g. "a0.h1->a2.h3<q>", "m1->output") or (sender,
            receiver) index pairs of `Graph`.
        batch_size: runs per forward pass (edges x pairs).
    """
    check_count(batch_size, "batch_size", minimum=1)
    check_count(pair_chunk, "pair_chunk", minimum=1)
    graph = Graph.of(task.tower)
    pairs = resolve_edges(graph, edges)
    by_receiver: dict[int, list[int]] = defaultdict(list)
    for i, (_, r) in enumerate(pairs):
        by_receiver[r].append(i)
    effects = torch.full((task.n_pairs, len(pairs)), float("nan"), device="cpu")
    baseline = torch.empty(task.n_pairs, device="cpu")
    chunks = range(0, task.n_pairs, pair_chunk)
    bar = tqdm(total=len(chunks) * len(by_receiver), desc="path patching", disable=not progress)
    with bar:
        for lo in chunks:
            hi = min(lo + pair_chunk, task.n_pairs)
            chunk = task.rows(lo, hi)
            clean, corrupt = cached_run(chunk, chunk.clean), cached_run(chunk, chunk.corrupt)
            baseline[lo:hi] = clean.metric.cpu()
            resid = _residuals(chunk)
            for r, indices in by_receiver.items():
                senders = [pairs[i][0] for i in indices]
                diff = corrupt.senders[:, senders] - clean.senders[:, senders]       # [batch, edge, pos, d_model]
                values = _receiver_runs(chunk, graph, r, resid, diff, batch_size)  # [batch, edge]
                effects[lo:hi, indices] = values.cpu() - clean.metric.cpu()[:, None]
                bar.update()
    return PathPatching(graph, pairs, effects, baseline)


def _residuals(task: Task) -> dict:
    """The clean run's residual streams where runs resume (each block's input and middle, the last)."""
    tower = task.tower
    names = {act_name("resid_pre", b) for b in range(tower.cfg.n_layers)}
    names |= {act_name("resid_mid", b) for b in range(tower.cfg.n_layers)}
    names.add(act_name("resid_post", tower.cfg.n_layers - 1))
    with torch.no_grad():
        _, cache = tower.run_with_cache(task.clean, names_filter=lambda name: name in names)
    return cache.cache_dict


def _receiver_runs(task: Task, graph: Graph, receiver: int, resid: dict,
                   diff: Float[Tensor, "batch edge pos d_model"], batch_size: int) -> Float[Tensor, "batch edge"]:
    """The metric of every (pair, edge) run in which `receiver` reads its input shifted by that edge's diff."""
    n_pairs, n_edges = diff.shape[:2]
    # shape = [batch, edge, ...] -> [(edge batch), ...]: runs of one edge are contiguous
    flat_diff = diff.transpose(0, 1).reshape(n_edges * n_pairs, *diff.shape[2:])
    rows = torch.arange(n_pairs, device=diff.device).repeat(n_edges)
    values = torch.empty(n_edges * n_pairs, device=diff.device)
    for lo in range(0, len(rows), batch_size):
        hi = min(lo + batch_size, len(rows))
        values[lo:hi] = _run_shifted(task, graph, receiver, resid, flat_diff[lo:hi], rows[lo:hi])
    return values.view(n_edges, n_pairs).T


def _run_shifted(task: Task, graph: Graph, receiver: int, resid: dict, shift: Tensor, rows: Tensor) -> Tensor:
    """Metric of runs (pairs `rows`) whose one receiver reads resid + `shift`."""
    tower, n_layers = task.tower, graph.n_layers
    inputs = task.clean[rows]
    if tower.modality == "text":
        # these rows may be shorter than the chunk: the tower trims them to their own longest text,
        # so every residual and shift is cut to that width too
        inputs = tower.trim(inputs)
        shift = shift[:, : inputs.shape[1]]
    width = shift.shape[1]
    with torch.no_grad():
        if receiver == graph.output_receiver:
            final = resid[act_name("resid_post", n_layers - 1)][rows, :width]
            return task.metric(tower.pool_residual(final + shift, inputs), rows)
        layer = graph.layer_of_receiver(receiver)
        block, start = tower.blocks[layer], resid[act_name("resid_pre", layer)][rows, :width]
        if receiver == graph.mlp_receiver(layer):
            shifted = block.ln2(resid[act_name("resid_mid", layer)][rows, :width] + shift)
            pre = F.linear(shifted, block.mlp.in_weight, block.mlp.in_bias)         # [batch, pos, d_mlp]
            hook = (act_name("pre", layer), lambda act, hook: pre)
        else:
            offset = receiver - graph.attention_receivers(layer).start
            which, head = divmod(offset, graph.n_heads)
            d, d_head = tower.cfg.n_heads * tower.cfg.d_head, tower.cfg.d_head
            lo = which * d + head * d_head
            shifted = block.ln1(start + shift)
            own = F.linear(shifted, block.attn.qkv_weight[lo : lo + d_head], block.attn.qkv_bias[lo : lo + d_head])

            def set_head(act: Tensor, hook) -> Tensor:  # act: [batch, pos, head, d_head]
                act = act.clone()
                act[:, :, head] = own
                return act

            hook = (act_name(QKV[which], layer), set_head)
        emb = tower.run_with_hooks(inputs, residual=start, start_at_layer=layer, fwd_hooks=[hook])
        return task.metric(emb, rows)
