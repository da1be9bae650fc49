"""Edge attribution patching: every edge's effect estimated from gradients (docs/methods.md#edge-attribution).

EAP scores edge s -> r as

    (corrupt_out_s - clean_out_s) . d metric / d input_r,   summed over positions,

the first-order change of the metric when r reads s's corrupted output. The gradient with
respect to one receiver's own input (a head's query input, say, not the shared residual) comes
from the gradient at its hook (`hook_q`, `mlp.hook_pre`) carried back through its projection and
its layer norm, which the receiver does not share with any other.

EAP-IG replaces the clean-run gradient by its mean over m points on a straight path from the
clean to the corrupted run: along the input (the layer-0 residual; "inputs"), or along each sender
group's own output with the rest computed normally ("activations").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.checks import is_integer
from clip_lens.circuits.forward import CachedRun, cached_run, check_count, head_outputs
from clip_lens.circuits.graph import QKV, Graph
from clip_lens.circuits.task import Task
from clip_lens.components import LayerNorm
from clip_lens.hooks import act_name

METHODS = ("eap", "eap-ig")
IG_PATHS = ("inputs", "activations")


@dataclass
class EdgeScores:
    """Edge scores of a task: the estimated change of the metric when one edge is corrupted.

    Attributes:
        graph: the tower's graph.
        scores: [n_senders, n_receivers], the mean over pairs; NaN off the graph.
        per_pair: None, or [n_pairs, n_senders, n_receivers] when asked for.
        method: "eap" or "eap-ig"; steps: m (1 for EAP); path: the IG path ("inputs" / "activations").
        baseline: [n_pairs], the clean runs' metric; corrupted: [n_pairs], the corrupted runs'.
    """

    graph: Graph
    scores: Float[Tensor, "sender receiver"]
    method: str
    steps: int
    path: Optional[str]
    baseline: Float[Tensor, " pair"]
    corrupted: Float[Tensor, " pair"]
    per_pair: Optional[Tensor] = None

    def table(self) -> pd.DataFrame:
        """One row per edge of the graph: edge, sender, receiver, score, rank (by |score|, 1 first)."""
        s, r = self.graph.valid.nonzero(as_tuple=True)
        values = self.scores[s, r].numpy()
        frame = pd.DataFrame({
            "edge": [self.graph.edge_name(int(a), int(b)) for a, b in zip(s, r)],
            "sender": [self.graph.senders[int(a)] for a in s],
            "receiver": [self.graph.receivers[int(b)] for b in r],
            "score": values,
        })
        frame["rank"] = pd.Series(-np.abs(values)).rank(method="first").astype(int).to_numpy()
        return frame.sort_values("rank").reset_index(drop=True)

    def importance(self, signed: bool = False) -> Float[Tensor, "sender receiver"]:
        """How much each edge matters, -1 off the graph: |score|, or with `signed` the part of the
        score that moves the metric from the clean towards the corrupted runs' mean (edges that
        work against the behaviour get 0)."""
        if signed:
            direction = 1.0 if float(self.corrupted.mean() - self.baseline.mean()) >= 0 else -1.0
            value = (self.scores * direction).clamp(min=0.0)
        else:
            value = self.scores.abs()
        return torch.where(self.graph.valid, value.nan_to_num(0.0), torch.tensor(-1.0, device="cpu"))

    def top(self, n: int, signed: bool = False) -> list[tuple[int, int]]:
        """The n most important edges (see `importance`), as (sender, receiver) indices, first first:
        at most the graph's edges, never a pair off the graph; with `signed`, only edges of
        positive importance (so possibly fewer than n)."""
        n = min(check_count(n, "n"), self.graph.n_edges)
        importance = self.importance(signed)
        if signed:
            n = min(n, int((importance > 0).sum()))
        flat = importance.flatten()
        order = flat.argsort(descending=True, stable=True)[:n]
        return [(int(i) // self.graph.n_receivers, int(i) % self.graph.n_receivers) for i in order]


def edge_attribution(task: Task, *, method: str = "eap", steps: Optional[int] = None, path: Optional[str] = None,
                     pair_chunk: int = 32, per_pair: bool = False, progress: bool = True) -> EdgeScores:
    """Score every edge of the task's tower by EAP or EAP-IG.

    Args:
        method: "eap" (one forward and one backward pass per chunk of pairs) or "eap-ig".
        steps: EAP-IG only: m, the points of its path (midpoints (k - 1/2) / m, k = 1..m); m >= 1,
            default 5. Given with "eap" it is refused (EAP has no path to integrate along).
        path: EAP-IG only: "inputs" (interpolate the layer-0 residual: m passes, the default) or
            "activations" (interpolate each sender group's output in turn, the input, each
            block's heads, each MLP: m (2L + 1) passes).
        pair_chunk: pairs per forward pass.
        per_pair: keep each pair's scores too ([n_pairs, senders, receivers]).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {METHODS}")
    if method == "eap":
        given = [f"{name}={value!r}" for name, value in (("steps", steps), ("path", path)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)}: EAP takes no integration path; these are EAP-IG's (method='eap-ig')")
    steps = 5 if steps is None else steps
    path = "inputs" if path is None else path
    if not is_integer(steps) or steps < 1:
        raise ValueError(f"steps={steps!r}: EAP-IG needs m >= 1 interpolation steps")
    steps = int(steps)
    check_count(pair_chunk, "pair_chunk", minimum=1)
    if path not in IG_PATHS:
        raise ValueError(f"path={path!r}: use one of {IG_PATHS}")
    graph = Graph.of(task.tower)
    # results live on the CPU in float32, whatever the model's device
    total = torch.zeros(graph.n_senders, graph.n_receivers, device="cpu")
    pairs = torch.zeros(task.n_pairs, graph.n_senders, graph.n_receivers, device="cpu") if per_pair else None
    baseline, corrupted = torch.empty(task.n_pairs, device="cpu"), torch.empty(task.n_pairs, device="cpu")
    for lo in tqdm(range(0, task.n_pairs, pair_chunk), desc=method, disable=not progress):
        hi = min(lo + pair_chunk, task.n_pairs)
        chunk = task.rows(lo, hi)
        clean, corrupt = cached_run(chunk, chunk.clean), cached_run(chunk, chunk.corrupt)
        baseline[lo:hi], corrupted[lo:hi] = clean.metric.cpu(), corrupt.metric.cpu()
        diff = corrupt.senders - clean.senders                               # [batch, sender, pos, d_model]
        if method == "eap":
            scores = _gradient_scores(chunk, graph, diff, per_pair)
        elif path == "inputs":
            scores = _ig_over_inputs(chunk, graph, diff, clean, corrupt, steps, per_pair)
        else:
            scores = _ig_over_activations(chunk, graph, diff, clean, corrupt, steps, per_pair)
        if per_pair:
            pairs[lo:hi] = scores
            scores = scores.sum(0)
        total += scores
    mean = (total / task.n_pairs).masked_fill(~graph.valid, float("nan"))
    if pairs is not None:
        pairs = pairs.masked_fill(~graph.valid, float("nan"))
    return EdgeScores(graph, mean, method, 1 if method == "eap" else steps, path if method == "eap-ig" else None,
                      baseline, corrupted, pairs)


def _midpoints(steps: int) -> list[float]:
    return [(k + 0.5) / steps for k in range(steps)]


def _ig_over_inputs(task: Task, graph: Graph, diff: Tensor, clean: CachedRun, corrupt: CachedRun, steps: int,
                    per_pair: bool) -> Tensor:
    name = act_name("resid_pre", 0)
    start, end = clean.cache[name], corrupt.cache[name]
    scores = 0
    for alpha in _midpoints(steps):
        scores = scores + _gradient_scores(task, graph, diff, per_pair, (name, start + alpha * (end - start)))
    return scores / steps


def _ig_over_activations(task: Task, graph: Graph, diff: Tensor, clean: CachedRun, corrupt: CachedRun, steps: int,
                         per_pair: bool) -> Tensor:
    """Each sender group's scores from its own path: the input, block l's heads (their z), block
    l's MLP (its output), interpolated with everything else computed normally."""
    groups = [(act_name("resid_pre", 0), slice(0, 1))]
    for layer in range(graph.n_layers):
        first = graph.head_sender(layer, 0)
        groups += [(act_name("z", layer), slice(first, first + graph.n_heads)),
                   (act_name("mlp_out", layer), slice(first + graph.n_heads, first + graph.n_heads + 1))]
    scores = 0
    for name, senders in groups:
        start, end = clean.cache[name], corrupt.cache[name]
        group = 0
        for alpha in _midpoints(steps):
            group = group + _gradient_scores(task, graph, diff, per_pair, (name, start + alpha * (end - start)))
        keep = torch.zeros(graph.n_senders, 1, dtype=torch.bool, device="cpu")
        keep[senders] = True
        scores = scores + torch.where(keep, group / steps, 0.0)
    return scores


def _gradient_scores(task: Task, graph: Graph, diff: Float[Tensor, "batch sender pos d_model"], per_pair: bool,
                     replace: Optional[tuple[str, Tensor]] = None) -> Tensor:
    """diff . (gradient of the metric at each receiver's input) for every edge, from one forward and
    one backward pass (at the clean run, or with `replace` = (hook, activation) written in).
    Returns [sender, receiver] summed over pairs, or [batch, sender, receiver] with `per_pair`."""
    tower, n_layers = task.tower, graph.n_layers
    kept: dict[str, Tensor] = {}    # receivers' hooks, whose gradients are taken
    saved: dict[str, Tensor] = {}   # the layer norms' inputs

    def keep(act: Tensor, hook) -> None:
        kept[hook.name] = act

    def save(act: Tensor, hook) -> None:
        saved[hook.name] = act.detach()

    def leaf(value: Tensor) -> Callable:
        # a fresh leaf that requires gradients: the backward pass starts here whether or not the
        # tower's weights require gradients
        return lambda act, hook: value.detach().clone().requires_grad_(True)

    first = act_name("resid_pre", 0)
    start = replace[1] if replace is not None and replace[0] == first else None
    hooks: list[tuple[str, Callable]] = [(first, leaf(start) if start is not None else
                                          lambda act, hook: act.detach().clone().requires_grad_(True))]
    if replace is not None and replace[0] != first:
        hooks.append((replace[0], leaf(replace[1])))
    for layer in range(n_layers):
        hooks += [(act_name(x, layer), keep) for x in QKV]
        hooks += [(act_name("pre", layer), keep), (act_name("resid_pre", layer), save),
                  (act_name("resid_mid", layer), save)]
    hooks.append((act_name("resid_post", n_layers - 1), keep))
    with torch.enable_grad():
        emb = tower.run_with_hooks(task.clean, fwd_hooks=hooks)
        names = [name for name, act in kept.items() if act.requires_grad]
        # autograd.grad rather than backward: no .grad is left on the user's weights
        grads = torch.autograd.grad(task.metric(emb).sum(), [kept[name] for name in names], allow_unused=True)
    for name, act in kept.items():
        saved[name] = torch.zeros(act.shape, device=act.device)
    for name, grad in zip(names, grads):
        if grad is not None:
            saved[name] = grad.float()
    with torch.no_grad():
        return _scores_from_gradients(tower, graph, saved, diff, per_pair)


def _scores_from_gradients(tower, graph: Graph, acts: dict, diff: Tensor, per_pair: bool) -> Tensor:
    """Edge scores from `acts`: the metric's gradient (float32) at each receiver hook (hook_q/k/v,
    mlp.hook_pre, the last resid_post) and the residual at each layer norm's input."""
    final = act_name("resid_post", graph.n_layers - 1)
    spec = "bspd,bprd->bsr" if per_pair else "bspd,bprd->sr"
    diff = diff.float()
    out = torch.zeros((diff.shape[0],) * per_pair + (graph.n_senders, graph.n_receivers), device="cpu")
    for layer, block in enumerate(tower.blocks):
        upstream = graph.senders_before(layer)
        grads = _attention_input_gradients(block, acts, layer)               # [batch, pos, 3 * head, d_model]
        out[..., :upstream, graph.attention_receivers(layer)] = torch.einsum(spec, diff[:, :upstream], grads).cpu()
        upstream += graph.n_heads
        grad = _mlp_input_gradient(block, acts, layer)                       # [batch, pos, d_model]
        out[..., :upstream, graph.mlp_receiver(layer)] = torch.einsum(spec, diff[:, :upstream], grad[:, :, None]).cpu()[..., 0]
    grad = acts[final][:, :, None]                             # [batch, pos, 1, d_model]
    out[..., :, graph.output_receiver] = torch.einsum(spec, diff, grad).cpu()[..., 0]
    return out


def layer_norm_backward(norm: LayerNorm, x: Float[Tensor, "... d_model"], grad: Float[Tensor, "... d_model"]) -> Tensor:
    """The gradient at a layer norm's input x from the gradient at its output (float32):
    with x_hat = (x - mean) / sigma and g = grad * w, it is (g - mean(g) - x_hat mean(g x_hat)) / sigma."""
    x = x.float()
    centred = x - x.mean(-1, keepdim=True)
    sigma = (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    x_hat = centred / sigma
    g = grad.float() * norm.w.float()
    return (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True)) / sigma


def _attention_input_gradients(block, acts: dict, layer: int) -> Float[Tensor, "batch pos qkv_head d_model"]:
    """d metric / d (each head's query, key and value input), in the graph's receiver order."""
    attn = block.attn
    weights = (attn.W_Q, attn.W_K, attn.W_V)                                 # each [head, d_model, d_head]
    # shape = [batch, pos, head, d_head] x [head, d_model, d_head] -> [batch, pos, head, d_model]
    at_norm = [torch.einsum("bphe,hde->bphd", acts[act_name(x, layer)], w.detach().float())
               for x, w in zip(QKV, weights)]
    at_norm = torch.cat(at_norm, dim=2)                                      # [batch, pos, 3 * head, d_model]
    x = acts[act_name("resid_pre", layer)][:, :, None]                   # [batch, pos, 1, d_model]
    return layer_norm_backward(block.ln1, x, at_norm)


def _mlp_input_gradient(block, acts: dict, layer: int) -> Float[Tensor, "batch pos d_model"]:
    """d metric / d (the MLP's input), before its layer norm."""
    at_norm = acts[act_name("pre", layer)] @ block.mlp.in_weight.detach().float()
    return layer_norm_backward(block.ln2, acts[act_name("resid_mid", layer)], at_norm)


__all__ = ["EdgeScores", "edge_attribution", "layer_norm_backward", "METHODS", "IG_PATHS", "head_outputs"]
