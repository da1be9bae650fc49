"""The studies of one minimal-pair task (the sweep's "accuracy", "causal-tracing",
"selective-heads" and "head-ablation"; docs/pairs.md).

`data` is a `TaskInput`: a task's pairs (`clip_lens.data.MinimalPairs`), which text of each pair is
marked (see `minimal_pairs.orient`), and its image embeddings [pairs, d_embed] (None for a
text-only task; the studies that score a pair against its image refuse it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import pandas as pd
from torch import Tensor

from clip_lens.data import MinimalPairs
from clip_lens.model import HookedCLIP
from clip_lens.report import Report
from clip_lens.studies.analyses.causal_tracing import localisation_by_layer
from clip_lens.studies.options import StudyOptions, option
from clip_lens.studies.runner import Study, Tables

TAIL = ("span", "+1", "+2", "+3", "EOT")  # positions whose spread is the localisation


@dataclass
class TaskInput:
    """One task: its pairs, which text of each pair is marked (see `minimal_pairs.orient`), and its
    image embeddings [pairs, d_embed] (None for a text-only task such as CANNOT)."""

    name: str
    pairs: MinimalPairs
    marked: Union[str, np.ndarray] = "b"
    image_emb: Optional[Tensor] = None


def needs_images(data: TaskInput, study: str) -> None:
    if data.image_emb is None:
        raise ValueError(f"study {study!r} scores each pair against its image, and dataset {data.name!r} has no images")


# --- the parts (shared with compare-tasks) -------------------------------------------------------
def head_table(model: HookedCLIP, data: TaskInput) -> pd.DataFrame:
    """Every head's selectivity for the differing tokens, most selective first (layer, head, a_N, ...)."""
    from clip_lens.studies.analyses import minimal_pairs

    return minimal_pairs.selective_heads(model, data.pairs, data.marked, progress=False).head_table()


def localisation(traced: pd.DataFrame) -> pd.DataFrame:
    """Per layer, the spread (population standard deviation) of the causal-tracing effect over the
    differing span, the three positions after it and EOT (`traced`: the frame of `minimal_pairs.trace`):
    0.4 where one position carries all of d (docs/methods.md#localisation)."""
    return localisation_by_layer(traced, TAIL).sort_values("layer", ignore_index=True)


def top_heads(heads: pd.DataFrame, k: int) -> list[tuple[int, int]]:
    """The first k (layer, head) of a head table."""
    return [(int(r.layer), int(r.head)) for r in heads.head(k).itertuples()]


# --- accuracy ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class NoOptions(StudyOptions):
    """A study without options."""


def accuracy(model: HookedCLIP, data: TaskInput, options: NoOptions, *, checkpoints=None,
             progress: bool = True) -> Tables:
    """accuracy (pairs, excluded, accuracy, mean_d) and pair_scores (each pair's S of the correct and
    the wrong text against its image, d, correct): accuracy = share preferring the correct text."""
    from clip_lens.scores import pair_scores

    needs_images(data, "accuracy")
    frame = data.pairs.pairs
    a_correct = (frame["correct"] == "a").to_numpy()
    right = [a if ok else b for a, b, ok in zip(frame["a"], frame["b"], a_correct)]
    wrong = [b if ok else a for a, b, ok in zip(frame["a"], frame["b"], a_correct)]
    scores = pair_scores(model, right, wrong, data.image_emb)
    per_pair = pd.DataFrame({"id": frame["id"].astype(str), "S_correct": scores["S_caption"], "S_wrong": scores["S_foil"],
                             "d": scores["d"], "correct": scores["d"] > 0})
    summary = pd.DataFrame([{"pairs": len(per_pair), "excluded": len(data.pairs.excluded),
                             "accuracy": float(per_pair["correct"].mean()), "mean_d": float(per_pair["d"].mean())}])
    return {"accuracy": summary, "pair_scores": per_pair}


def accuracy_report(tables: Tables, options: NoOptions) -> Report:
    out = Report("Accuracy on minimal pairs")
    out.section("Accuracy").text("The share of pairs whose correct text scores higher S against the image.")
    out.table(tables["accuracy"], caption="Accuracy and mean d = S(correct) - S(wrong)")
    return out


# --- causal tracing ------------------------------------------------------------------------------
def causal_tracing(model: HookedCLIP, data: TaskInput, options: NoOptions, *, checkpoints=None,
                   progress: bool = True) -> Tables:
    """causal_tracing (the effect per layer and position around the differing span) and
    localisation (its spread per layer, as `clip-lens compare-tasks`)."""
    from clip_lens.studies.analyses import minimal_pairs

    needs_images(data, "causal-tracing")
    traced = minimal_pairs.trace(model, data.pairs, data.image_emb, data.marked, progress=False).frame()
    return {"causal_tracing": traced, "localisation": localisation(traced)}


def causal_tracing_report(tables: Tables, options: NoOptions) -> Report:
    out = Report("Causal tracing around the differing span")
    out.section("Localisation").text("Per layer, the spread of the causal-tracing effect over the span, the three "
                                     "positions after it and EOT: high where one position carries the effect.")
    out.table(tables["localisation"], caption="Localisation per layer")
    return out


# --- selective heads -----------------------------------------------------------------------------
def selective_heads(model: HookedCLIP, data: TaskInput, options: NoOptions, *, checkpoints=None,
                    progress: bool = True) -> Tables:
    """heads: each head's selectivity for the differing tokens (docs/methods.md#minimal-pairs)."""
    return {"heads": head_table(model, data)}


def selective_heads_report(tables: Tables, options: NoOptions) -> Report:
    from clip_lens.plot import head_heatmap

    out = Report("Heads selective for the differing tokens")
    out.figure(head_heatmap(tables["heads"], "Selectivity for the differing tokens (marked minus unmarked text)"))
    return out


# --- head ablation -------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class HeadAblationOptions(StudyOptions):
    top_k: int = option(3, "the most selective heads to intervene on", minimum=1)
    intervention: str = option("zero", "what the heads' output becomes", choices=("zero", "mean", "resample"))
    random_seeds: tuple[int, ...] = option((0, 1, 2), "seeds of the random heads (as many as top_k per seed)",
                                           minimum=0, min_items=1)


def head_ablation(model: HookedCLIP, data: TaskInput, options: HeadAblationOptions, *, checkpoints=None,
                  progress: bool = True) -> Tables:
    """head_ablation: accuracy and mean d with no intervention, with the `top_k` most selective heads
    intervened on, and with as many random heads per seed (docs/methods.md#head-interventions)."""
    from clip_lens.studies.analyses import head_interventions

    needs_images(data, "head-ablation")
    top = top_heads(head_table(model, data), options.top_k)
    table = head_interventions.intervention_study(model, data.pairs, data.image_emb, top,
                                                  intervention=options.intervention,
                                                  random_seeds=options.random_seeds)
    return {"head_ablation": table}


def head_ablation_report(tables: Tables, options: HeadAblationOptions) -> Report:
    out = Report("Ablating the most selective heads")
    out.section("Accuracy").text(f"The {options.top_k} most selective heads ({options.intervention} ablation) against "
                                 f"as many random heads (seeds {', '.join(map(str, options.random_seeds))}).")
    out.table(tables["head_ablation"], caption="Every condition")
    return out


STUDIES = {
    "accuracy": Study("accuracy", NoOptions, accuracy, accuracy_report, data="a TaskInput with image embeddings"),
    "causal-tracing": Study("causal-tracing", NoOptions, causal_tracing, causal_tracing_report,
                            data="a TaskInput with image embeddings"),
    "selective-heads": Study("selective-heads", NoOptions, selective_heads, selective_heads_report, data="a TaskInput"),
    "head-ablation": Study("head-ablation", HeadAblationOptions, head_ablation, head_ablation_report,
                           data="a TaskInput with image embeddings"),
}
