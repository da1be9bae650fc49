"""Causal tracing of negation in the text encoder (docs/methods.md#causal-tracing).

For each instance, the non-negated sentence p is run with its residual stream at one (layer,
position) replaced by the negated sentence n's; CTE(l, q) = d* / d is the share of the caption-foil
difference that this one patch restores. All patches run through `clip_lens.patch`, which resumes
each from the cached residual of its layer and computes only positions q..EOT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int

from clip_lens import plot
from clip_lens.checkpoints import Checkpoints, concatenate
from clip_lens.data import ALIGNED_SLOTS, align_positions, weighted_slot_mean
from clip_lens.data.valse import NEGATOR_POSITION
from clip_lens.model import HookedCLIP
from clip_lens.patching import patch
from clip_lens.studies.analyses.existence import ExistenceInstances

GROUPS = ["negation_in", "segment"]


@dataclass
class CausalTracing:
    """Result of `run`.

    Attributes:
        instances: one row per instance (id, negation_in, caption, foil, d, segment, ...).
        cte: [instances, layers, 8], CTE at the aligned positions (`slots`); layers 0..L.
        further_counts: [instances], the number of further-subject tokens (that slot's weight).
        cte_positions: [instances, layers, pos], CTE at every token position (NaN beyond EOT).
        slots: the names of the aligned positions.
    """

    instances: pd.DataFrame
    cte: Float[np.ndarray, "n layer 8"]
    further_counts: Int[np.ndarray, " n"]
    cte_positions: Float[np.ndarray, "n layer pos"]
    slots: tuple = ALIGNED_SLOTS

    @property
    def n_layers(self) -> int:
        return self.cte.shape[1]

    def instance_frame(self) -> pd.DataFrame:
        """Long format: one row per instance x layer x aligned position."""
        n, layers, slots = self.cte.shape
        index = pd.MultiIndex.from_product([range(n), range(layers), self.slots], names=["instance", "layer", "position"])
        frame = pd.DataFrame({"cte": self.cte.reshape(-1)}, index=index).reset_index()
        info = self.instances[["id", *GROUPS]].reset_index(drop=True)
        return frame.join(info, on="instance")

    def segment_means(self, by: tuple = tuple(GROUPS)) -> pd.DataFrame:
        """Mean CTE per group x layer x aligned position (the further-subject slot weighted by its
        token count), with the number of instances. Long format."""
        rows = []
        for key, idx in self.instances.reset_index(drop=True).groupby(list(by), sort=False).groups.items():
            idx = np.asarray(idx)
            mean = weighted_slot_mean(self.cte[idx], self.further_counts[idx])
            key = key if isinstance(key, tuple) else (key,)
            for layer in range(self.n_layers):
                for s, slot in enumerate(self.slots):
                    rows.append((*key, layer, slot, mean[layer, s], len(idx)))
        return pd.DataFrame(rows, columns=[*by, "layer", "position", "cte", "instances"])

    def localisation(self, by: tuple = tuple(GROUPS)) -> pd.DataFrame:
        """Per group and layer, the standard deviation (ddof=0) of the group-mean CTE over the aligned
        positions from the negator on (negator, subject, further subject, '.', EOT): 0.4 where one
        position carries all of d (as at layers 0 and L by construction), 0 where it is spread evenly
        or absent (docs/methods.md#localisation)."""
        return localisation_by_layer(self.segment_means(by), self.slots[NEGATOR_POSITION:], by)

    def figures(self) -> dict[str, go.Figure]:
        """The CTE heatmaps with localisation bars, one figure per negation placement."""
        return figures(self.segment_means(), self.localisation(), self.slots)


def localisation_by_layer(cte: pd.DataFrame, positions: Sequence, by: Sequence[str] = ()) -> pd.DataFrame:
    """Localisation (docs/methods.md#localisation), the one definition every study uses: per group
    of `by` and layer, the population standard deviation (ddof=0) of `cte` over `positions`.

    Args:
        cte: one row per (*by, layer, position) with the (group-mean) causal-tracing effect `cte`.
        positions: the positions whose spread is measured (from the differing token to EOT).
    Returns: columns *by, layer, localisation, in the order the groups first appear.
    """
    tail = cte[cte["position"].isin(list(positions))]
    return tail.groupby([*by, "layer"], sort=False)["cte"].std(ddof=0).rename("localisation").reset_index()


def figures(means: pd.DataFrame, localisation: pd.DataFrame, slots: tuple = ALIGNED_SLOTS) -> dict[str, go.Figure]:
    """The CTE heatmaps with localisation bars, one figure per negation placement, from the tables
    `CausalTracing.segment_means()` and `.localisation()` (as the study writes them)."""
    out = {}
    for where in ("foil", "caption"):
        part = means[means["negation_in"] == where]
        if len(part):
            out[f"cte_negation_in_{where}"] = plot.cte_heatmaps(
                part, localisation[localisation["negation_in"] == where], slots,
                title=f"Causal tracing effect, negation in the {where}")
    return out


def run(model: HookedCLIP, instances: ExistenceInstances, *, checkpoints: Optional[Checkpoints] = None,
        progress: bool = True, **engine: Optional[int]) -> CausalTracing:
    """Causal tracing over every instance, every layer 0..L and every position, `pair_chunk`
    instances at a time (each chunk saved to `checkpoints` as it finishes, and read from there by a
    resumed run; `checkpoints.sized(n)` saves every n instances instead). `engine`: `trace`'s
    batch_size and pair_chunk."""
    frame = instances.frame
    cte_positions, eot = trace(model, list(frame["negated"]), list(frame["non_negated"]), instances.image_emb,
                               list(frame["id"]), checkpoints=checkpoints, progress=progress, **engine)
    aligned, counts = align_positions(cte_positions, eot)
    return CausalTracing(instances.instances_table(), aligned, counts, cte_positions)


ENGINE = {"batch_size": 256, "pair_chunk": 64}  # the patching engine's defaults here (docs/patching.md, "Memory")


def trace(model: HookedCLIP, sources: list, targets: list, image_emb, ids: list, *,
          checkpoints: Optional[Checkpoints] = None, progress: bool = True,
          **engine: int) -> tuple[Float[np.ndarray, "n layer pos"], Int[np.ndarray, " n"]]:
    """CTE at every layer 0..L and position of each pair: the target text (the non-negated one in
    the negation study) patched from its source (the negated one), S against `image_emb`
    [n, d_embed]. Returns (cte_positions [n, layers, pos], NaN past a text's EOT; eot [n]).

    Args:
        engine: `batch_size` (patches per forward pass, default 256) and `pair_chunk` (pairs whose
            runs are cached at a time, and saved to `checkpoints` as one chunk; default 64).
    """
    return _trace(model, (sources, targets), image_emb, ids, None, checkpoints, progress, engine)


def trace_at(model: HookedCLIP, sources: list, targets: list, image_emb, ids: list,
             positions: Int[np.ndarray, "n k"], *, progress: bool = True,
             **engine: int) -> Float[np.ndarray, "n layer k"]:
    """`trace` at each pair's own positions only [n, k] (-1 where a pair has none): CTE
    [n, layers, k], slot by slot, NaN where a pair has no position."""
    return _trace(model, (sources, targets), image_emb, ids, positions, None, progress, engine)[0]


def _trace(model: HookedCLIP, texts: tuple[list, list], image_emb, ids: list, positions: Optional[np.ndarray],
           checkpoints: Optional[Checkpoints], progress: bool, engine: dict) -> tuple[np.ndarray, np.ndarray]:
    """`trace` (positions None: every position) and `trace_at`."""
    sources, targets = texts
    unknown = set(engine) - set(ENGINE)
    if unknown:
        raise TypeError(f"trace() got unexpected keyword arguments {sorted(unknown)}; engine knobs: {sorted(ENGINE)}")
    batch_size, pair_chunk = ({**ENGINE, **engine}[name] for name in ("batch_size", "pair_chunk"))
    # pairs run shortest first, so that a chunk's cached runs are padded little (a chunk is trimmed to its
    # longest text); the outputs return to the given order
    order = np.argsort(model.text.sequence_lengths(model.to_tokens(list(targets))).cpu().numpy(), kind="stable")
    sources, targets = [sources[i] for i in order], [targets[i] for i in order]
    image_emb, ids = image_emb[torch.as_tensor(order, device=image_emb.device)], [ids[i] for i in order]
    own = None if positions is None else np.asarray(positions)[order]

    def chunk(lo: int, hi: int) -> dict:
        source = model.to_tokens(sources[lo:hi])
        result = patch(model, target=targets[lo:hi], source=source, image=image_emb[lo:hi], hook="resid",
                       positions="all" if own is None else own[lo:hi], batch_size=batch_size, pair_chunk=pair_chunk,
                       progress=False)
        return {"s_star": result.effects.numpy(), "s_p": result.baseline.numpy(),  # [n, layers, pos], [n]
                "s_n": result.source_baseline.numpy(), "eot": model.text.pooled_positions(source).cpu().numpy()}

    chunks = (checkpoints or Checkpoints(None)).chunks("causal_tracing", len(sources), pair_chunk, chunk, progress,
                                                        ids=ids)
    given = np.argsort(order)  # the row of each given pair in the run's order
    s_star = concatenate(chunks, "s_star")[given]  # positions past a chunk's longest text: NaN, as past each text's EOT
    s_p, s_n = (concatenate(chunks, name)[given][:, None, None] for name in ("s_p", "s_n"))
    # With p the patched (non-negated) and n the negated sentence, both placements reduce to one
    # ratio: in the foil (p = c), d* / d = (S(p) - S*(p)) / (S(p) - S(n)); in the caption (p = f),
    # d* / d = (S*(p) - S(p)) / (S(n) - S(p)), the same. S(p) and S(n) are taken from the engine's
    # own clean runs, so that a no-op patch gives exactly 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        cte_positions = (s_p - s_star) / (s_p - s_n)
    return cte_positions, concatenate(chunks, "eot")[given]
