"""Severed causal tracing (docs/methods.md#severed-causal-tracing).

Ordinary causal tracing restores the source's (negated sentence's) residual at one (layer,
position) in the target's (non-negated sentence's) run and measures how much of the difference
d = S(target) - S(source) comes back. Severed tracing repeats each restoration with the MLP outputs
(or the attention outputs) of every block from that layer on held at their values in the target's
own run, so that whatever the restored residual changes can reach the output only through the other
kind of sublayer: the effect that flows through each path, separated.

A straightforward hook loop: one full forward run of the target per (layer, position, severing),
batched over a layer's positions. It is slower than `clip_lens.patch`, and exact.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from clip_lens.circuits.task import Task, make_task
from clip_lens.hooks import act_name
from clip_lens.patching.metrics import Metric
from clip_lens.patching.request import check_list
from clip_lens.patching.sites import hook_name

SEVERED = ("none", "mlp", "attn")
FROZEN_OUTPUT = {"mlp": "mlp_out", "attn": "attn_out"}  # the block output each severing holds at the target's value
COLUMNS = ["pair", "layer", "position", "severed", "effect"]


def severed_trace(model: Any, *, target: Any, source: Any, image: Any = None, text: Any = None,
                  layers: Union[str, int, Sequence[int]] = "all", positions: Union[str, int, Sequence[int]] = "all",
                  severed: Union[str, Sequence[str]] = SEVERED, metric: Metric = "score") -> pd.DataFrame:
    """The causal tracing effect of restoring `source`'s residual at each (layer, position) in the
    `target` run, with the later MLPs or attention layers severed (held at the target run's values).

    Args:
        model: a HookedCLIP, or a text tower alone (then `metric` must be a callable).
        target: the runs restored into (texts or tokens; the non-negated sentences).
        source: the runs the residual is taken from (the negated sentences), one per target with
            the same token length.
        image: the other modality (inputs or embeddings [1 or n, d_embed]), as in `clip_lens.patch`.
        layers: residual layers 0..L (docs/methods.md#layer-numbering): "all", one or a list.
        positions: "all" or a list; positions past a pair's EOT are left out of the table.
        severed: any of "none" (ordinary causal tracing), "mlp" (the MLP outputs of blocks
            layer..L-1 held at the target's values) and "attn" (the attention outputs held).
        metric: "score" (S) or a callable (embedding, other) -> [batch], as in `clip_lens.patch`.

    Returns:
        One row per pair x layer x position x severing: pair, layer, position, severed, effect,
        with effect = (S(target) - S*) / (S(target) - S(source)) (NaN or infinite where the two
        clean runs score the same).
    """
    kinds = _check_severed(severed)
    task = make_task(model, clean=source, corrupt=target, image=image, text=text, metric=metric)
    if task.tower.modality != "text":
        raise ValueError("severed causal tracing restores text residuals: give texts or tokens as target and source")
    n_layers = task.tower.cfg.n_layers
    layer_list = _plain_ints(check_list(layers, range(n_layers + 1), "layer"), "layer")
    position_list = _plain_ints(check_list(positions, range(task.clean.shape[1]), "position"), "position")
    rows = []
    for pair in range(task.n_pairs):
        rows += _pair_rows(task.rows(pair, pair + 1), pair, layer_list, position_list, kinds)
    return pd.DataFrame(rows, columns=COLUMNS)


def _check_severed(severed: Union[str, Sequence[str]]) -> list[str]:
    """The severings asked for, each one of SEVERED."""
    kinds = [severed] if isinstance(severed, str) else list(severed)
    if not kinds:
        raise ValueError(f"severed is empty: give any of {SEVERED}")
    for kind in kinds:
        if kind not in SEVERED:
            raise ValueError(f"severed={kind!r}: use any of {SEVERED}")
    return kinds


def _plain_ints(values: list, what: str) -> list[int]:
    """`check_list`'s result without groups: severed tracing restores one layer and position at a time."""
    for value in values:
        if isinstance(value, tuple):
            raise ValueError(f"{what} {value!r}: give single {what}s, not groups")
    return values


def _pair_rows(task: Task, pair: int, layers: list[int], positions: list[int], kinds: list[str]) -> list[tuple]:
    """The rows of one pair (`task` holds that pair alone, trimmed to its own EOT)."""
    tower, n_layers = task.tower, task.tower.cfg.n_layers
    length = int(tower.sequence_lengths(task.corrupt)[0])
    resid_names = {hook_name("resid", layer, n_layers) for layer in layers}
    frozen_names = {act_name(FROZEN_OUTPUT[kind], block) for kind in kinds if kind != "none" for block in range(n_layers)}
    s_target, cache_t = _cached_run(task, task.corrupt, resid_names | frozen_names)
    s_source, cache_s = _cached_run(task, task.clean, resid_names)
    d = s_target - s_source
    rows = []
    for layer in layers:
        name = hook_name("resid", layer, n_layers)
        inside = [q for q in positions if q < length]
        # restoring an equal residual (before the negator) is the target run itself: effect 0 exactly
        changed = [q for q in inside if not torch.equal(cache_s[name][0, q], cache_t[name][0, q])]
        for kind in kinds:
            s_star = dict(zip(changed, _restored_scores(task, layer, changed, kind, cache_s, cache_t))) if changed else {}
            for q in inside:
                with np.errstate(divide="ignore", invalid="ignore"):
                    effect = (s_target - s_star.get(q, s_target)) / d
                rows.append((pair, layer, q, kind, float(effect)))
    return rows


def _cached_run(task: Task, tokens: Tensor, names: set[str]) -> tuple[np.float64, dict]:
    """(the metric of a clean run, its activations at `names`)."""
    with torch.no_grad():
        emb, cache = task.tower.run_with_cache(tokens, names_filter=lambda n: n in names)
    return np.float64(task.metric(emb).item()), cache.cache_dict


def _restored_scores(task: Task, layer: int, positions: list[int], kind: str, cache_s: dict,
                     cache_t: dict) -> list[np.float64]:
    """S* of the target run with the source's residual at (layer, q) for each q of `positions` (one
    batch row each), and with `kind`'s block outputs from block `layer` on held at the target's."""
    tower, n_layers = task.tower, task.tower.cfg.n_layers
    name = hook_name("resid", layer, n_layers)
    rows, qs = torch.arange(len(positions)), torch.tensor(positions)

    def restore(resid: Tensor, hook) -> Tensor:
        resid = resid.clone()
        resid[rows, qs] = cache_s[name][0, qs]
        return resid

    def freeze(out: Tensor, hook) -> Tensor:
        return cache_t[hook.name].expand_as(out).clone()

    hooks = [(name, restore)]
    if kind != "none":
        hooks += [(act_name(FROZEN_OUTPUT[kind], block), freeze) for block in range(layer, n_layers)]
    tokens = task.corrupt.expand(len(positions), -1)
    other = task.other.expand(len(positions), -1)
    with torch.no_grad():
        emb = tower.run_with_hooks(tokens, fwd_hooks=hooks)
        scores = task.score(emb, other)
    return [np.float64(s) for s in scores.tolist()]
