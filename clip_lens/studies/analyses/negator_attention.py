"""Negator-selective attention heads (docs/methods.md#negator-selective-attention).

For every head, the attention paid to the negator's key position k by queries q >= k, in the
negated minus the non-negated sentence: diff[q] = A_neg[q, k] - A_nonneg[q, k]. A head's score on
an instance is max_q diff[q]; a^N(l, h) is its mean over instances. The per-query-position view
averages diff at each query position (aligned existence positions, or offsets from the negator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens import plot
from clip_lens.checkpoints import Checkpoints
from clip_lens.data import ALIGNED_SLOTS, align_positions
from clip_lens.data.valse import FURTHER_SLOT, NEGATOR_POSITION
from clip_lens.patching import hook_name

EXISTENCE_QUERY_SLOTS = ALIGNED_SLOTS[NEGATOR_POSITION:]  # negator, subject, further subject, '.', EOT
RELATIVE_OFFSETS = 6


def relative_slots(n_offsets: int = RELATIVE_OFFSETS) -> tuple[str, ...]:
    return ("negator",) + tuple(f"+{i}" for i in range(1, n_offsets)) + ("EOT",)


@dataclass
class NegatorAttention:
    """Result of `run`.

    Attributes:
        scores: [instances, layers, heads], max over queries q >= k of diff[q].
        by_query: [instances, layers, heads, slots], diff at each query slot (NaN where an instance
            has no such position; the existence further-subject slot is a mean, 0 when empty).
        weights: [instances, slots], each cell's weight in the mean over instances (the existence
            further-subject slot counts its tokens).
        slots: names of the query slots. instances: one row per instance.
    """

    scores: Float[np.ndarray, "n layer head"]
    by_query: Float[np.ndarray, "n layer head slot"]
    weights: Float[np.ndarray, "n slot"]
    slots: tuple
    instances: pd.DataFrame

    @property
    def a_n(self) -> Float[np.ndarray, "layer head"]:
        """a^N(l, h): the mean head score over instances."""
        return self.scores.mean(axis=0)

    def head_table(self, by: Sequence[str] = ()) -> pd.DataFrame:
        """Long format: (by...,) layer, head, a_N (mean score), std, instances; sorted by a_N within groups."""
        groups = self.instances.reset_index(drop=True).groupby(list(by), sort=False).groups.items() if by else [((), np.arange(len(self.scores)))]
        rows = []
        for key, idx in groups:
            key = key if isinstance(key, tuple) else (key,)
            part = self.scores[np.asarray(idx)]
            mean, std = part.mean(axis=0), part.std(axis=0)
            for layer in range(mean.shape[0]):
                for head in range(mean.shape[1]):
                    rows.append((*key, layer, head, mean[layer, head], std[layer, head], len(part)))
        table = pd.DataFrame(rows, columns=[*by, "layer", "head", "a_N", "std", "instances"])
        return table.sort_values([*by, "a_N"], ascending=[True] * len(by) + [False]).reset_index(drop=True)

    def query_table(self, layers: Optional[Sequence[int]] = None) -> pd.DataFrame:
        """Mean diff per layer x head x query slot (weighted means; NaN cells left out). Long format."""
        layers = range(self.scores.shape[1]) if layers is None else layers
        values = np.nan_to_num(self.by_query)
        weights = self.weights[:, None, None, :]
        total = weights.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (values * weights).sum(axis=0) / total
        rows = [(layer, head, slot, mean[layer, head, s]) for layer in layers
                for head in range(mean.shape[1]) for s, slot in enumerate(self.slots)]
        return pd.DataFrame(rows, columns=["layer", "head", "query", "diff"])

    def top_layer(self) -> int:
        """The layer of the highest-scoring head (the default for the per-query view)."""
        return int(np.unravel_index(self.a_n.argmax(), self.a_n.shape)[0])

    def figures(self, prefix: str = "", layers: Optional[Sequence[int]] = None) -> dict[str, go.Figure]:
        return figures(self.head_table(), self.query_table(), prefix=prefix, layers=layers)


def top_layer(heads: pd.DataFrame) -> int:
    """The layer of the highest-scoring head of a `head_table()` (the first in layer, head order
    among equals, as `NegatorAttention.top_layer`)."""
    ordered = heads.sort_values(["layer", "head"], kind="stable")
    return int(ordered["layer"].iloc[int(ordered["a_N"].to_numpy().argmax())])


def figures(heads: pd.DataFrame, queries: pd.DataFrame, *, prefix: str = "",
            layers: Optional[Sequence[int]] = None) -> dict[str, go.Figure]:
    """The head heatmap of a^N and the per-query-position heatmaps of `layers` (default: the top
    head's layer), from the tables `head_table()` and `query_table()` (as the studies write them)."""
    layers = [top_layer(heads)] if layers is None else list(layers)
    slots = tuple(pd.unique(queries["query"]))  # the table lists each layer x head's slots in order
    out = {f"{prefix}heads": plot.head_heatmap(heads, title=f"{prefix}negator-selective attention a^N(l, h)".strip())}
    for layer in layers:
        out[f"{prefix}query_positions_layer_{layer}"] = plot.query_heatmap(
            queries[queries["layer"] == layer], slots,
            title=f"{prefix}attention to the negator, negated minus non-negated, by query position, layer {layer}".strip())
    return out


def negator_positions(negated: Int[Tensor, "n pos"], non_negated: Int[Tensor, "n pos"]) -> Int[Tensor, " n"]:
    """The one position where each pair's tokens differ; raises naming the pair otherwise."""
    if negated.shape != non_negated.shape:
        raise ValueError(f"token shapes differ: {tuple(negated.shape)} vs {tuple(non_negated.shape)}")
    differ = negated != non_negated
    counts = differ.sum(dim=1)
    if (counts != 1).any():
        i = int((counts != 1).nonzero()[0])
        raise ValueError(f"pair {i} differs at {int(counts[i])} token positions; expected exactly one (the negator)")
    return differ.int().argmax(dim=1)


BATCH_SIZE = 64  # pairs per forward pass and per saved chunk


def run(model, negated: Union[Sequence[str], Tensor], non_negated: Union[Sequence[str], Tensor], *,
        instances: Optional[pd.DataFrame] = None, layout: str = "existence",
        key_positions: Optional[Sequence[int]] = None, checkpoints: Optional[Checkpoints] = None,
        **running: Union[int, bool]) -> NegatorAttention:
    """Negator-selective attention of every text-tower head over sentence pairs.

    The pairs run shortest first (the longer text of each pair; a stable sort), so that a batch is
    padded little; every output is in the given order.

    Args:
        model: a HookedCLIP or a HookedTextTower.
        negated, non_negated: strings or tokens [n, pos]; each pair differs at one token (the negator).
        instances: per-pair information kept with the result (default: the two sentences).
        layout: "existence" (query slots: negator, subject, further subject, '.', EOT; the negator must
            be at position 3) or "relative" (offsets 0..5 from the negator, and EOT).
        key_positions: the key position k of each pair (e.g. the first token of a minimal pair's
            differing span); by default the one position where the pair's tokens differ.
        checkpoints: where each batch of pairs is saved as it finishes (and read from by a resumed run).
        running: `batch_size` (pairs per forward pass and per saved batch, default 64) and
            `progress` (a progress bar, default True).
    """
    unknown = set(running) - {"batch_size", "progress"}
    if unknown:
        raise TypeError(f"run() got unexpected keyword arguments {sorted(unknown)}")
    if layout not in ("existence", "relative"):
        raise ValueError(f"layout must be 'existence' or 'relative', not {layout!r}")
    if instances is None:
        instances = pd.DataFrame({"negated": list(negated) if not isinstance(negated, Tensor) else None,
                                  "non_negated": list(non_negated) if not isinstance(non_negated, Tensor) else None})
    tower = model.text if hasattr(model, "text") else model
    neg, non = _common_width(_tokens(tower, negated), _tokens(tower, non_negated))
    lengths = [tower.sequence_lengths(x).cpu().numpy() for x in (neg, non)]
    k = _key_positions(neg, non, key_positions, layout, lengths[0])
    order = np.argsort(np.maximum(*lengths), kind="stable")
    rows = torch.as_tensor(order, device=neg.device)
    batch = _batch_scorer(tower, (neg[rows], non[rows]), k[order], layout)
    ids = [str(x) for x in instances["id"]] if "id" in instances else [str(i) for i in range(len(k))]
    # the chunks are named by the instances they hold (a changed pair list or order reuses none)
    chunks = (checkpoints or Checkpoints(None)).chunks("negator_attention", len(k), running.get("batch_size", BATCH_SIZE),
                                                        batch, running.get("progress", True), ids=[ids[i] for i in order])
    given = np.argsort(order)  # the row of each given pair in the run's order
    scores, by_query, weights = (np.concatenate([c[name] for c in chunks])[given] for name in ("scores", "by_query", "weights"))
    slots = EXISTENCE_QUERY_SLOTS if layout == "existence" else relative_slots()
    return NegatorAttention(scores, by_query, weights, slots, instances.reset_index(drop=True))


def _key_positions(neg: Int[Tensor, "n pos"], non: Int[Tensor, "n pos"], given: Optional[Sequence[int]],
                   layout: str, lengths: Int[np.ndarray, " n"]) -> Int[np.ndarray, " n"]:
    """Each pair's key position k: `given`, or the one position where its tokens differ; checked
    to lie within the negated text (`lengths`: its tokens up to EOT) and, for the existence layout,
    at the negator's position 3."""
    n = len(neg)
    if given is None:
        k = negator_positions(neg, non).cpu().numpy()
    else:
        k = np.array(given, dtype=np.int64)
        if k.shape != (n,):
            raise ValueError(f"key_positions: {k.shape[0] if k.ndim else 0} positions for {n} pairs")
        outside = (k < 0) | (k >= lengths)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise ValueError(f"key_positions: pair {i}'s key position {int(k[i])} is outside its negated text "
                             f"(positions 0..{int(lengths[i]) - 1})")
    if layout == "existence" and (k != NEGATOR_POSITION).any():
        i = int(np.flatnonzero(k != NEGATOR_POSITION)[0])
        raise ValueError(f"pair {i}: its negator is at position {int(k[i])}; layout='existence' needs it at position 3 "
                         "('There is/are no ...'); use layout='relative'")
    return k


def _batch_scorer(tower, pairs: tuple[Tensor, Tensor], key_positions: np.ndarray, layout: str):
    """batch(start, stop) -> {scores [b, L, H], by_query [b, L, H, slots], weights [b, slots]} for
    the pairs start..stop - 1 of `pairs` (negated and non-negated tokens [n, pos]), both texts run
    in one forward pass trimmed to their longest (see `NegatorAttention`)."""
    def batch(start: int, stop: int) -> dict:
        neg, non = (x[start:stop] for x in pairs)
        width = int(torch.maximum(*map(tower.sequence_lengths, (neg, non))).max())
        tokens = torch.cat([neg, non])[:, :width]
        k = torch.as_tensor(key_positions[start:stop], dtype=torch.long, device=tokens.device)
        attention = _attention_to_key(tower, tokens, torch.cat([k, k]))
        # the difference taken in float32, on the CPU: the rest is bookkeeping on small tensors
        diff = (attention[:len(k)] - attention[len(k):]).cpu()  # [b, L, H, q]
        k, eot = k.cpu(), tower.pooled_positions(neg).cpu()
        q = torch.arange(diff.shape[-1], device="cpu")
        valid = (q[None] >= k[:, None]) & (q[None] <= eot[:, None])  # [b, q]
        scores = diff.masked_fill(~valid[:, None, None], float("-inf")).amax(dim=-1).numpy()
        by_query, weights = (_existence_slots if layout == "existence" else _relative_slots)(diff, k, eot)
        return {"scores": scores.astype(np.float64), "by_query": by_query, "weights": weights}

    return batch


def _attention_to_key(tower, tokens: Int[Tensor, "batch pos"],
                      key: Int[Tensor, " batch"]) -> Float[Tensor, "batch layer head query"]:
    """Every head's attention from each query to its row's key position (float32, whatever the
    tower's dtype), kept from the pattern hooks as the run goes (the hooks removed after)."""
    names = [hook_name("pattern", layer, tower.cfg.n_layers) for layer in range(tower.cfg.n_layers)]
    row = torch.arange(len(tokens), device=tokens.device)
    kept = {}

    def keep(pattern: Float[Tensor, "batch head query key"], hook) -> None:
        kept[hook.name] = pattern[row, :, :, key].float()  # [batch, head, query]

    with torch.no_grad():
        tower.run_with_hooks(tokens, fwd_hooks=[(name, keep) for name in names])
    return torch.stack([kept[name] for name in names], dim=1)


def _existence_slots(diff: Tensor, k: Tensor, eot: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """diff [b, L, H, q] at the existence query slots (negator, subject, further subject (mean), '.',
    EOT), and each cell's weight [b, slots] (the further-subject slot counts its tokens)."""
    aligned, counts = align_positions(diff.numpy(), eot.numpy())
    weights = np.ones((len(k), len(EXISTENCE_QUERY_SLOTS)))
    weights[:, FURTHER_SLOT - NEGATOR_POSITION] = counts
    return aligned[..., NEGATOR_POSITION:].astype(np.float64), weights


def _relative_slots(diff: Tensor, k: Tensor, eot: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """diff [b, L, H, q] at offsets 0..5 from the negator (NaN at or past EOT) and at EOT, and each
    cell's weight [b, slots] (1 where there is a position, else 0)."""
    offsets = k[:, None] + torch.arange(RELATIVE_OFFSETS, device=k.device)  # [b, offsets]
    present = offsets < eot[:, None]
    positions = torch.cat([offsets.clamp(max=diff.shape[-1] - 1), eot[:, None]], dim=1)  # [b, slots]
    gathered = diff.gather(-1, positions[:, None, None].expand(*diff.shape[:3], -1)).double()
    weights = torch.cat([present, torch.ones_like(present[:, :1])], dim=1)
    return gathered.masked_fill(~weights[:, None, None], float("nan")).numpy(), weights.double().numpy()


def _tokens(tower, texts) -> Tensor:
    return texts if isinstance(texts, Tensor) else tower.to_tokens(list(texts))


def _common_width(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    width = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return pad(a), pad(b)
