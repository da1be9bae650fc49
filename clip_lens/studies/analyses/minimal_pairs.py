"""The negation studies' text tools on any minimal-pair set (docs/methods.md#minimal-pairs): causal
tracing and selective heads, with "the negator" replaced by "the tokens that differ".

A pair has a marked text (whose difference is studied: the negated sentence in the negation study,
VALSE's foil by default) and an unmarked one. Causal tracing patches the unmarked run from the
marked one at every layer and position; a head's selectivity is its attention from queries at or
after the differing span to the span's first token, in the marked text minus the unmarked one.
On VALSE existence, marked = the negated sentence, both give the existence study's own numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor

from clip_lens.data import MinimalPairs
from clip_lens.model import HookedCLIP
from clip_lens.studies.analyses import causal_tracing, negator_attention

RELATIVE = ("-2", "-1", "span", "+1", "+2", "+3", "EOT")  # query / patch positions around the differing span


def orient(pairs: MinimalPairs, marked: Union[str, np.ndarray, pd.Series] = "b") -> tuple[list[str], list[str]]:
    """(marked texts, unmarked texts): `marked` is "a", "b", or per pair True where a is marked."""
    frame = pairs.pairs
    if isinstance(marked, str):
        if marked not in ("a", "b"):
            raise ValueError(f"marked={marked!r}: use 'a', 'b' or one bool per pair (True: a is marked)")
        other = "b" if marked == "a" else "a"
        return list(frame[marked]), list(frame[other])
    a_marked = np.asarray(marked, dtype=bool)
    if a_marked.shape != (len(frame),):
        raise ValueError(f"marked: {a_marked.size} values for {len(frame)} pairs")
    return ([a if m else b for a, b, m in zip(frame["a"], frame["b"], a_marked)],
            [b if m else a for a, b, m in zip(frame["a"], frame["b"], a_marked)])


def selective_heads(model: HookedCLIP, pairs: MinimalPairs, marked: Union[str, np.ndarray] = "b", *,
                    layout: str = "relative", batch_size: int = 64,
                    progress: bool = True) -> negator_attention.NegatorAttention:
    """Every head's selectivity for the differing span (the a^N rule of
    docs/methods.md#negator-selective-attention with the span's first token as the key), with the
    per-query-position view (`layout="relative"`: offsets from the span and EOT; "existence": the
    existence slots)."""
    marked_texts, unmarked = orient(pairs, marked)
    return negator_attention.run(model, marked_texts, unmarked, instances=pairs.pairs, layout=layout,
                                 batch_size=batch_size, key_positions=pairs.pairs["span_start"], progress=progress)


@dataclass
class PairTracing:
    """Causal tracing of a minimal-pair set.

    Attributes:
        relative: [pairs, layers, 7], at offsets -2, -1 from the span, the span's first token,
            +1..+3 after it and EOT (NaN where a pair has no such position).
        pairs: the pairs' table.
        cte_positions: [pairs, layers 0..L, pos], CTE at every position (NaN past a text's EOT),
            with `trace(every_position=True)`; None otherwise (only the 7 positions are traced).
    """

    relative: Float[np.ndarray, "n layer 7"]
    pairs: pd.DataFrame
    cte_positions: Optional[Float[np.ndarray, "n layer pos"]] = None

    def frame(self) -> pd.DataFrame:
        """Mean CTE per layer and relative position (NaN cells left out), with the pairs counted."""
        n, layers, slots = self.relative.shape
        rows = []
        for layer in range(layers):
            for s, slot in enumerate(RELATIVE):
                values = self.relative[:, layer, s]
                rows.append((layer, slot, float(np.nanmean(values)) if np.isfinite(values).any() else np.nan,
                             int(np.isfinite(values).sum())))
        return pd.DataFrame(rows, columns=["layer", "position", "cte", "pairs"])


def trace(model: HookedCLIP, pairs: MinimalPairs, image_emb: Tensor, marked: Union[str, np.ndarray] = "b", *,
          every_position: bool = False, batch_size: int = 256, pair_chunk: int = 64,
          progress: bool = True) -> PairTracing:
    """Causal tracing (docs/methods.md#causal-tracing) of the unmarked text patched from the marked
    one, S against `image_emb` [pairs, d_embed], at the 7 positions around the differing span
    (`RELATIVE`), or at every position with `every_position` (more work: every position from the
    span to EOT, at every layer)."""
    marked_texts, unmarked = orient(pairs, marked)
    ids, span = list(pairs.pairs["id"]), pairs.pairs["span_start"].to_numpy()
    engine = dict(batch_size=batch_size, pair_chunk=pair_chunk, progress=progress)
    if every_position:
        cte, eot = causal_tracing.trace(model, marked_texts, unmarked, image_emb, ids, **engine)
        return PairTracing(relative_positions(cte, span, eot), pairs.pairs, cte)
    eot = model.text.pooled_positions(model.to_tokens(unmarked)).cpu().numpy()
    cte = causal_tracing.trace_at(model, marked_texts, unmarked, image_emb, ids, relative_table(span, eot), **engine)
    return PairTracing(cte, pairs.pairs)


def relative_table(span: np.ndarray, eot: np.ndarray) -> np.ndarray:
    """Each pair's positions at `RELATIVE` [n, 7]: offsets -2..+3 from its span start (-1 where one
    falls before position 1 or at or after EOT), then its EOT; as `relative_positions` reads them."""
    index = np.arange(int(np.max(eot)) + 1)
    table = relative_positions(np.broadcast_to(index, (len(span), len(index))).astype(float), span, eot)
    return np.nan_to_num(table, nan=-1).astype(np.int64)


def relative_positions(values: Float[np.ndarray, "n ... pos"], span: np.ndarray,
                       eot: np.ndarray) -> Float[np.ndarray, "n ... 7"]:
    """Values at offsets -2, -1, 0, +1, +2, +3 from each row's span start, and at its EOT (NaN where
    an offset falls before position 1 or at or after EOT)."""
    out = np.full(values.shape[:-1] + (len(RELATIVE),), np.nan)
    for i, (start, end) in enumerate(zip(np.asarray(span, dtype=int), np.asarray(eot, dtype=int))):
        for s, offset in enumerate((-2, -1, 0, 1, 2, 3)):
            position = start + offset
            if 1 <= position < end:
                out[i, ..., s] = values[i, ..., position]
        out[i, ..., -1] = values[i, ..., end]
    return out


def existence_marked(pairs: MinimalPairs) -> np.ndarray:
    """For VALSE existence pairs: True where a (the caption) is the negated sentence (it holds the
    word "no", as in `clip_lens.data.prepare_existence`)."""
    return np.array([re.search(r"\bno\b", a) is not None for a in pairs.pairs["a"]])
