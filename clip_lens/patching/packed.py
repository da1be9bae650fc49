"""Resumed runs of a causal tower packed into one token matrix.

N interventions resume at their own half-layer steps with suffixes of different lengths (each from
its first changed position to its pooled EOT). Their suffix rows are stacked into one
[rows, d_model] matrix, so that every linear layer of a block is one matrix product over all of
them, whatever their lengths. Attention alone is computed per run, in a padded
[run, head, position, d_head] layout (heads first, so that both matrix products of attention read
it in place): a run's keys and values are the target's cached ones before its suffix, then its own
suffix rows', under the causal mask; its queries are its suffix rows. Padded positions past a run's
end are never attended (a query attends earlier positions only), so every value equals an unpacked
run's to float rounding.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from clip_lens.components import Attention, TransformerBlock
from clip_lens.hooks import act_name
from clip_lens.patching.resume import LaterEdit, residual_steps
from clip_lens.towers import HookedTower


@dataclass(frozen=True)
class Packing:
    """Where each run's rows lie: in the packed matrix, and in the padded layouts of attention
    (queries [run, head, depth, d_head], keys and values [run, head, width, d_head]; depth is the
    longest suffix, width the longest run).

    Attributes:
        row_ends: N + 1 offsets (a list): run i owns packed rows row_ends[i]..row_ends[i + 1] - 1.
        query_index: [rows * head], where each packed row's head h lies in the query layout read as
            [run * head * depth, d_head]: (i * heads + h) * depth + j for run i's suffix row j.
        key_index: [rows * head], the same in the key layout [run * head * width, d_head]:
            (i * heads + h) * width + suffix_i + j, after the run's cached prefix.
        hidden: [N, depth, width], True where a query must not see a key: a later position.
        pairs: [N], each run's pair within the cached chunk (its row of the target's keys and values).
        lengths: [N], each run's sequence length (cached prefix plus suffix).
    """

    row_ends: list[int]
    query_index: Int[Tensor, " rows_heads"]
    key_index: Int[Tensor, " rows_heads"]
    hidden: Bool[Tensor, "N depth width"]
    pairs: Int[Tensor, " N"]
    lengths: Int[Tensor, " N"]

    @classmethod
    def of(cls, pairs: Sequence[int], suffixes: Sequence[int], rows: Sequence[int], heads: int, device) -> "Packing":
        """The packing of runs with these pairs, suffix starts and suffix lengths, in this order,
        for attention with `heads` heads."""
        lengths = [s + r for s, r in zip(suffixes, rows)]
        depth, width = max(rows), max(lengths)
        row_ends = [0]
        for n in rows:
            row_ends.append(row_ends[-1] + n)
        cpu = dict(device="cpu")  # built on the host, then moved once
        run = torch.repeat_interleave(torch.arange(len(rows), **cpu), torch.tensor(list(rows), **cpu))  # [rows]
        within = torch.arange(row_ends[-1], **cpu) - torch.tensor(row_ends[:-1], **cpu)[run]            # j of each row
        suffix = torch.tensor(list(suffixes), **cpu)
        head_of = (run * heads)[:, None] + torch.arange(heads, **cpu)                                    # [rows, head]
        query_index = head_of * depth + within[:, None]
        key_index = head_of * width + (suffix[run] + within)[:, None]
        query_pos = suffix[:, None] + torch.arange(depth, **cpu)                                         # [N, depth]
        hidden = torch.arange(width, **cpu) > query_pos[..., None]                                       # [N, depth, width]
        return cls(row_ends, query_index.flatten().to(device), key_index.flatten().to(device), hidden.to(device),
                   torch.tensor(list(pairs), device=device), torch.tensor(lengths, device=device))

    @property
    def depth(self) -> int:
        return self.hidden.shape[1]

    @property
    def width(self) -> int:
        return self.hidden.shape[2]

    @property
    def pooled_rows(self) -> list[int]:
        """Each run's last packed row: its pooled EOT."""
        return [end - 1 for end in self.row_ends[1:]]


def heads_first(cache: dict, n_layers: int) -> list[Optional[tuple[Tensor, Tensor]]]:
    """Each block's cached keys and values as [pair, head, pos, d_head] (None for a block the cache
    lacks): the layout packed attention gathers its runs' keys and values from, made once per chunk."""
    out: list[Optional[tuple[Tensor, Tensor]]] = []
    for block in range(n_layers):
        names = act_name("k", block), act_name("v", block)
        out.append(tuple(cache[n].transpose(1, 2).contiguous() for n in names) if names[0] in cache else None)
    return out


def resume_packed(tower: HookedTower, states: Float[Tensor, "rows d_model"], starts: list[int], packing: Packing,
                  keys_values: list, edits: Sequence[LaterEdit] = ()) -> Float[Tensor, "N d_embed"]:
    """Embeddings of N causal runs resumed at half-layer steps, their suffix rows packed.

    Args:
        states: every run's suffix rows at its start step, stacked in run order (`packing`); the
            runs are sorted so that `starts` ascends. Updated in place.
        starts: each run's start step; a run joins when the loop reaches it.
        keys_values: the target chunk's cached keys and values of each block, `heads_first`.
        edits: replacements of the residual stream after a run's start (joint interventions);
            an edit of another hook is refused (the caller runs those unpacked, through hooks).
    """
    n_layers = tower.cfg.n_layers
    residual = _residual_edits(tower, edits, packing)
    x = states
    for step in range(starts[0], 2 * n_layers - 2):
        active = bisect.bisect_right(starts, step)  # runs that have joined by this step
        rows = packing.row_ends[active]
        block = tower.blocks[step // 2]
        _apply(residual.get(step, ()), x)
        if step % 2 == 0:
            out = packed_attention(block.attn, block.ln1(x[:rows]), packing, active, *keys_values[step // 2])
            x[:rows] += out * block.ls1 if block.ls1 is not None else out
        else:
            block.mlp_half_(x[:rows])
    _apply(residual.get(2 * n_layers - 2, ()), x)
    pooled = last_block_at_pooled_rows(tower, x, starts, packing, keys_values[-1])
    _apply(residual.get(2 * n_layers, ()), pooled)
    return tower.pool_rows(pooled)


def packed_attention(attn: Attention, normed: Float[Tensor, "rows d_model"], packing: Packing, active: int,
                     cached_keys: Tensor, cached_values: Tensor) -> Float[Tensor, "rows d_model"]:
    """The attention output at the packed rows of the first `active` runs, from their normalised
    residual `normed`; `cached_keys` / `cached_values` [pair, head, pos, d_head] are the target's."""
    n_rows, heads, d_head, depth = normed.shape[0], attn.n_heads, attn.d_head, packing.depth
    q, k, v = F.linear(normed, attn.qkv_weight, attn.qkv_bias).view(n_rows, 3, heads, d_head).unbind(1)
    keys, values = _padded_keys_values(packing, active, n_rows, cached_keys, cached_values, k, v)
    slots = packing.query_index[: n_rows * heads]
    queries = q.new_zeros(active, heads, depth, d_head)
    queries.view(-1, d_head).index_copy_(0, slots, q.reshape(-1, d_head))
    scores = torch.matmul(queries, keys.transpose(-1, -2)).div_(math.sqrt(d_head))  # [run, head, depth, width]
    pattern = scores.masked_fill_(packing.hidden[:active, None], float("-inf")).softmax(dim=-1)
    z = torch.matmul(pattern, values)  # shape = [run, head, depth, d_head]
    return attn.project_z(z.view(-1, d_head).index_select(0, slots).view(n_rows, heads, d_head))


def _padded_keys_values(packing: Packing, active: int, n_rows: int, cached_keys: Tensor, cached_values: Tensor,
                        k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values [run, head, width, d_head] of the first `active` runs: the target's cached
    ones, with each run's suffix rows replaced by its own `k` / `v` [rows, head, d_head]."""
    pairs, width, d_head = packing.pairs[:active], packing.width, k.shape[-1]
    slots = packing.key_index[: n_rows * k.shape[1]]
    keys = cached_keys[:, :, :width].index_select(0, pairs)  # a copy: [run, head, width, d_head]
    values = cached_values[:, :, :width].index_select(0, pairs)
    keys.view(-1, d_head).index_copy_(0, slots, k.reshape(-1, d_head))
    values.view(-1, d_head).index_copy_(0, slots, v.reshape(-1, d_head))
    return keys, values


def last_block_at_pooled_rows(tower: HookedTower, x: Float[Tensor, "rows d_model"], starts: list[int],
                              packing: Packing, keys_values: tuple[Tensor, Tensor]) -> Float[Tensor, "N d_model"]:
    """The residual after the last block at each run's pooled row, from residuals at the last
    block's input (or, per `starts`, at its middle): the other rows enter as keys and values
    (`keys_values`: the last block's cached ones, `heads_first`)."""
    block: TransformerBlock = tower.blocks[-1]
    last = 2 * tower.cfg.n_layers - 2
    pooled = torch.tensor(packing.pooled_rows, device=x.device)
    out = x[pooled]  # indexing copies
    active = bisect.bisect_right(starts, last)
    if active:
        out[:active] += _pooled_attention(block, x, packing, active, *keys_values)
    active = bisect.bisect_right(starts, last + 1)
    if active:
        block.mlp_half_(out[:active])
    return out


def _pooled_attention(block: TransformerBlock, x: Tensor, packing: Packing, active: int,
                      cached_keys: Tensor, cached_values: Tensor) -> Float[Tensor, "active d_model"]:
    """The last block's attention output at the pooled rows of the first `active` runs."""
    attn, n_rows = block.attn, packing.row_ends[active]
    heads, d_head, d = attn.n_heads, attn.d_head, attn.n_heads * attn.d_head
    normed = block.ln1(x[:n_rows])
    k, v = F.linear(normed, attn.qkv_weight[d:], attn.qkv_bias[d:]).view(n_rows, 2, heads, d_head).unbind(1)
    keys, values = _padded_keys_values(packing, active, n_rows, cached_keys, cached_values, k, v)
    pooled = torch.tensor(packing.pooled_rows[:active], device=x.device)
    q = F.linear(normed[pooled], attn.qkv_weight[:d], attn.qkv_bias[:d]).view(active, heads, 1, d_head)
    scores = torch.matmul(q, keys.transpose(-1, -2)).div_(math.sqrt(d_head))  # shape = [run, head, 1, key_pos]
    past_end = torch.arange(packing.width, device=x.device) >= packing.lengths[:active, None]  # [run, key_pos]
    pattern = scores.masked_fill_(past_end[:, None, None], float("-inf")).softmax(dim=-1)
    z = torch.matmul(pattern, values)  # shape = [run, head, 1, d_head]
    out = attn.project_z(z[:, :, 0])
    return out * block.ls1 if block.ls1 is not None else out


def _residual_edits(tower: HookedTower, edits: Sequence[LaterEdit], packing: Packing) -> dict[int, list]:
    """{half-layer step: [(packed rows, apply)]} for edits of the residual stream; the residual
    after the last block (step 2L) holds one row per run, so its rows count runs."""
    n_layers, steps = tower.cfg.n_layers, residual_steps(tower)
    out: dict[int, list] = {}
    for edit in edits:
        if edit.hook not in steps:
            raise ValueError(f"a packed run edits the residual stream only, not {edit.hook}")
        step = steps[edit.hook]
        if step == 2 * n_layers:
            first, n = edit.run, 1
        else:
            first, n = packing.row_ends[edit.run], packing.row_ends[edit.run + 1] - packing.row_ends[edit.run]
        rows = first + torch.arange(n, device="cpu")[edit.index]  # indexes of the run's rows, counted in the packed matrix
        out.setdefault(step, []).append((rows.tolist() if rows.ndim else int(rows), edit.apply))
    return out


def _apply(edits: list, x: Tensor) -> None:
    """Each edit written into its packed rows of `x` (in place)."""
    for rows, apply in edits:
        x[rows] = apply(x[rows])
