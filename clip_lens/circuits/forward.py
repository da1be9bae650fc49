"""Sender outputs of a run, and a forward pass in which chosen edges carry the corrupted run's values.

In the clean run each receiver reads the residual stream, the sum of every upstream sender's
output (plus biases). When an edge s -> r is removed from the circuit, r reads s's corrupted
output instead of its current one:

    input_r = resid - sum_{s: edge (s, r) removed} (out_s - corrupt_out_s)

where `resid` and `out_s` are those of the run being computed, so that a removed edge changes
that one receiver only and the change flows on through everything r feeds
(docs/methods.md#circuits). Removing every edge gives the corrupted run, removing none the clean run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from clip_lens.checks import is_integer
from clip_lens.circuits.graph import Graph
from clip_lens.components import TransformerBlock
from clip_lens.hooks import act_name
from clip_lens.towers import HookedTower


def check_count(value, name: str, minimum: int = 0) -> int:
    """`value` as an int >= `minimum`, or a ValueError naming it."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name}={value!r}: give an integer >= {minimum}")
    return int(value)


def head_outputs(block: TransformerBlock, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos head d_model"]:
    """Each head's write into the residual stream (its share of the attention output, bias excluded)."""
    out = torch.einsum("bphe,hed->bphd", z, block.attn.W_O)
    return out * block.ls1 if block.ls1 is not None else out


def sender_names(n_layers: int) -> list[str]:
    """The hooks `sender_outputs` reads: the layer-0 residual, each block's z and MLP output."""
    names = [act_name("resid_pre", 0)]
    for layer in range(n_layers):
        names += [act_name("z", layer), act_name("mlp_out", layer)]
    return names


def stack_senders(tower: HookedTower, cache: dict) -> Float[Tensor, "batch sender pos d_model"]:
    """Every sender's output from a cache of `sender_names`, in the graph's sender order."""
    parts = [cache[act_name("resid_pre", 0)][:, None]]
    for layer, block in enumerate(tower.blocks):
        heads = head_outputs(block, cache[act_name("z", layer)])     # [batch, pos, head, d_model]
        parts += [heads.transpose(1, 2), cache[act_name("mlp_out", layer)][:, None]]
    return torch.cat(parts, dim=1)                                            # shape = [batch, sender, pos, d_model]


def sender_outputs(tower: HookedTower, inputs: Tensor) -> tuple[Tensor, Float[Tensor, "batch sender pos d_model"]]:
    """(embeddings [batch, d_embed], every sender's output) of a run without gradients."""
    names = set(sender_names(tower.cfg.n_layers))
    with torch.no_grad():
        emb, cache = tower.run_with_cache(inputs, names_filter=lambda name: name in names)
        return emb, stack_senders(tower, cache.cache_dict)


@dataclass
class CachedRun:
    """A run of a task's chunk: its metric [batch], every sender's output [batch, sender, pos,
    d_model] and the cache of `sender_names` it was stacked from."""

    metric: Tensor
    senders: Tensor
    cache: dict


def cached_run(task, inputs: Tensor) -> CachedRun:
    """The run of `inputs` (the task's clean or corrupted inputs) without gradients."""
    names = set(sender_names(task.tower.cfg.n_layers))
    with torch.no_grad():
        emb, cache = task.tower.run_with_cache(inputs, names_filter=lambda name: name in names)
        return CachedRun(task.metric(emb), stack_senders(task.tower, cache.cache_dict), cache.cache_dict)


def run_circuit(tower: HookedTower, inputs: Tensor, corrupt_out: Float[Tensor, "batch sender pos d_model"],
                removed: Bool[Tensor, "sender receiver"]) -> Float[Tensor, "batch d_embed"]:
    """Embeddings of `inputs` with the `removed` edges carrying `corrupt_out` (see the module doc).

    Args:
        inputs: the clean runs' tokens or pixels.
        corrupt_out: the corrupted runs' sender outputs (`sender_outputs`), row-aligned with `inputs`.
        removed: [n_senders, n_receivers], True where an edge carries the corrupted value; entries
            off the graph (receiver upstream of sender) are ignored.
    """
    graph = Graph.of(tower)
    removed = (removed.cpu() & graph.valid).to(device=corrupt_out.device, dtype=corrupt_out.dtype)
    with torch.no_grad():
        resid = tower(inputs, stop_at_layer=0)                               # [batch, pos, d_model]
        outs = torch.empty_like(corrupt_out)
        outs[:, 0] = resid
        for layer, block in enumerate(tower.blocks):
            upstream = graph.senders_before(layer)
            diff = outs[:, :upstream] - corrupt_out[:, :upstream]            # [batch, sender, pos, d_model]
            z = _attention(block, resid, diff, removed[:upstream, graph.attention_receivers(layer)], tower.cfg.causal)
            heads = head_outputs(block, z)                                   # [batch, pos, head, d_model]
            first = graph.head_sender(layer, 0)
            outs[:, first : first + graph.n_heads] = heads.transpose(1, 2)
            attn_out = heads.sum(2) + (block.attn.b_O * block.ls1 if block.ls1 is not None else block.attn.b_O)
            resid = resid + attn_out
            mlp_in = _receiver_input(resid, outs[:, : first + graph.n_heads] - corrupt_out[:, : first + graph.n_heads],
                                     removed[: first + graph.n_heads, graph.mlp_receiver(layer)])
            mlp_out = block.mlp(block.ln2(mlp_in))
            mlp_out = mlp_out * block.ls2 if block.ls2 is not None else mlp_out
            outs[:, graph.mlp_sender(layer)] = mlp_out
            resid = resid + mlp_out
        final = _receiver_input(resid, outs - corrupt_out, removed[:, graph.output_receiver])
        return tower.pool_residual(final, inputs)


def _receiver_input(resid: Float[Tensor, "batch pos d_model"], diff: Float[Tensor, "batch sender pos d_model"],
                    removed: Float[Tensor, " sender"]) -> Float[Tensor, "batch pos d_model"]:
    """What one receiver reads: the residual less the current-minus-corrupted value of its removed edges."""
    if not bool(removed.any()):
        return resid
    return resid - torch.einsum("bspd,s->bpd", diff, removed)


def _attention(block: TransformerBlock, resid: Float[Tensor, "batch pos d_model"],
               diff: Float[Tensor, "batch sender pos d_model"], removed: Float[Tensor, "sender qkv_head"],
               causal: bool) -> Float[Tensor, "batch pos head d_head"]:
    """Per-head values z of one block whose heads each read their own query, key and value inputs."""
    attn = block.attn
    n_heads, d_head, d_model = attn.n_heads, attn.d_head, resid.shape[-1]
    if not bool(removed.any()):  # every head reads the residual itself: one norm, one projection
        qkv = F.linear(block.ln1(resid), attn.qkv_weight, attn.qkv_bias)     # [batch, pos, 3 * head * d_head]
        # shape = [batch, pos, 3 * head * d_head] -> 3 x [batch, head, pos, d_head]
        q, k, v = einops.rearrange(qkv, "b p (three h e) -> three b h p e", three=3, h=n_heads)
    else:
        # shape = [batch, 3 * head, pos, d_model]: each receiver's own input
        inputs = resid[:, None] - torch.einsum("bspd,sr->brpd", diff, removed)
        normed = block.ln1(inputs)
        weight = attn.qkv_weight.view(3 * n_heads, d_head, d_model)         # [3 * head, d_head, d_model]
        bias = attn.qkv_bias.view(3 * n_heads, 1, d_head)
        projected = torch.einsum("brpd,red->brpe", normed, weight) + bias    # [batch, 3 * head, pos, d_head]
        q, k, v = projected.split(n_heads, dim=1)                            # 3 x [batch, head, pos, d_head]
    z = F.scaled_dot_product_attention(q, k, v, is_causal=causal)            # [batch, head, pos, d_head]
    return z.transpose(1, 2)                                                 # shape = [batch, pos, head, d_head]


def removed_edges(graph: Graph, kept: Optional[Bool[Tensor, "sender receiver"]]) -> Bool[Tensor, "sender receiver"]:
    """The edges of the graph outside `kept` (None keeps every edge)."""
    if kept is None:
        return torch.zeros_like(graph.valid)
    return graph.valid & ~kept.to(graph.valid.device)
