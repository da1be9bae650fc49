"""`patch`'s arguments turned into one checked, frozen request.

Every check on the arguments lives here, so the runners (`exact`, `attribution`,
`hook_functions`) receive a request that is already known to be consistent.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from clip_lens.checks import is_integer
from clip_lens.hooks import split_tower_prefix
from clip_lens.model import HookedCLIP
from clip_lens.patching.metrics import Metric, Score, in_float32, other_embeddings, score_function
from clip_lens.patching.result import PatchResult
from clip_lens.patching.sites import KINDS, SAE_HOOKS, HookKind, kind_of
from clip_lens.towers import HookedTower

EXACT_INTERVENTIONS = ("patch", "zero", "mean", "resample")
METHODS = ("exact", "attribution", "integrated_gradients")
GRADIENT_METHODS = ("attribution", "integrated_gradients")
LARGE_GRID = 50_000  # exact interventions per pair above which `patch` suggests attribution patching


@dataclass(frozen=True)
class Plan:
    """The interventions on one hook kind: a grid of layers x positions x units."""

    kind: HookKind
    layers: list
    positions: Optional[list]  # None: the pair's whole sequence at once
    units: Optional[list]      # heads, neurons or SAE latents; None: the whole activation
    intervention: Any          # "patch" / "zero" / "mean" / "resample", "value_only" or a hook function
    sae: Any = None            # splits a residual-space activation into latents (see `patch`)
    pair_positions: Optional[Tensor] = None  # [n_pairs, slots] each pair's own positions (-1: none); positions = slots

    def positions_of(self, pair: int) -> list:
        """The position entries of pair `pair` (its index in the call): its own row of
        `pair_positions` (-1 where it has none), or the grid's positions ([None]: the whole sequence)."""
        if self.pair_positions is not None:
            return self.pair_positions[pair].tolist()
        return self.positions if self.positions is not None else [None]

    @property
    def hook(self) -> str:
        return self.kind.name

    @property
    def layers_named(self) -> list[int]:
        """Every layer the grid intervenes on, groups (joint interventions) opened, ascending."""
        return sorted({layer for entry in self.layers for layer in as_group(entry)})

    @property
    def has_groups(self) -> bool:
        """Whether any layer, position or unit entry is a tuple: a joint intervention."""
        return any(isinstance(entry, tuple) for entry in (*self.layers, *(self.positions or ()), *(self.units or ())))

    @property
    def unit_axis(self) -> Optional[str]:
        """"head", "neuron" or "latent": the axis of `units`; None without units."""
        if self.units is None:
            return None
        return "latent" if self.sae is not None else self.kind.unit_axis


@dataclass(frozen=True)
class Request:
    """One checked call of `patch`: the tower, its inputs, the metric, and the grid of each hook kind."""

    tower: HookedTower
    target: Tensor                # [n_pairs, pos] tokens or [n_pairs, 3, H, W] pixels
    source: Optional[Tensor]      # as `target`; the dataset for "mean" / "resample"
    other: Tensor                 # [n_pairs, d_embed], the other modality ([n_pairs, 0] if not needed)
    score: Score
    plans: tuple[Plan, ...]       # one per hook kind, same layers, positions and units
    mean: Optional[Tensor]
    method: str
    resample_pairs: Optional[Tensor]  # [n_pairs], the source index of each pair for "resample"
    dims: tuple[str, ...]
    shape: tuple[int, ...]        # of `effects`, value axes included
    batch_size: int
    pair_chunk: int
    progress: bool
    steps: int = 1                # points of the integrated-gradients path (method="integrated_gradients")

    @property
    def n_pairs(self) -> int:
        return self.target.shape[0]

    @property
    def plan(self) -> Plan:
        return self.plans[0]

    @property
    def intervention(self) -> Any:
        return self.plan.intervention

    @property
    def by_hook_function(self) -> bool:
        return is_hook_function(self.intervention)

    def empty_result(self) -> PatchResult:
        """A result whose effects and baselines are NaN until a runner fills them."""
        value_shape = list(self.shape[-1:]) if "embed" in self.dims else []  # metric="embedding"
        unit_axis, units = self.plan.unit_axis, self.plan.units
        intervention = self.intervention
        # results live on the CPU in float32, whatever the model's device and dtype (they are small)
        nan = functools.partial(torch.full, fill_value=float("nan"), dtype=torch.float32, device="cpu")
        return PatchResult(
            effects=nan(list(self.shape)), baseline=nan([self.n_pairs] + value_shape),
            source_baseline=nan([self.n_pairs] + value_shape) if intervention == "patch" else None,
            dims=self.dims, layers=self.plan.layers, positions=self.plan.positions,
            hook="+".join(plan.hook for plan in self.plans),
            heads=units if unit_axis == "head" else None, neurons=units if unit_axis == "neuron" else None,
            latents=units if unit_axis == "latent" else None,
            intervention=intervention if isinstance(intervention, str) else getattr(intervention, "__name__", "hook"),
            method=self.method, lengths=self.tower.sequence_lengths(self.target).cpu(), extra=self._extra())

    def _extra(self) -> dict:
        extra = {"resample_pairs": self.resample_pairs.cpu()} if self.resample_pairs is not None else {}
        if self.plan.pair_positions is not None:
            extra["pair_positions"] = self.plan.pair_positions
        return extra


def as_group(entry) -> tuple:
    """A grid entry as the ascending tuple of what it names: 4 -> (4,), (6, 4) -> (4, 6)."""
    return tuple(sorted(entry)) if isinstance(entry, tuple) else (entry,)


def is_hook_function(intervention: Any) -> bool:
    return callable(intervention) or intervention == "value_only"


def build_request(model: HookedCLIP, *, target, source, image, text, hook, layers, positions, heads, neurons,
                  sae, latents, intervention, mean, metric, method, batch_size, pair_chunk, seed,
                  progress, steps: int = 1) -> Request:
    """The checked request of one `patch` call (see `patch` for the arguments)."""
    kinds = _check_kinds(hook, intervention, method, metric, sae)
    if method == "integrated_gradients":
        if not is_integer(steps) or steps < 1:
            raise ValueError(f"steps={steps!r}: integrated gradients need m >= 1 interpolation steps")
        if sae is not None:
            raise ValueError("method='integrated_gradients' does not split activations into SAE latents; use "
                             "method='attribution' or 'exact' with sae=")
    _check_unused(intervention, source, mean)
    _check_unit_selections(kinds, heads=heads, neurons=neurons, latents=latents, sae=sae)
    if mean is not None and not bool(torch.isfinite(torch.as_tensor(mean)).all()):
        raise ValueError("mean= has NaN or infinite values; every effect of a 'mean' intervention would be NaN")
    tower, target, source = _tower_inputs(model, target, source, intervention)
    embedding_metric = isinstance(metric, str) and metric == "embedding"
    other_input = image if tower.modality == "text" else text
    if embedding_metric and other_input is None:
        other = torch.zeros(target.shape[0], 0, device=tower.device)
    else:
        other = other_embeddings(model, tower, other_input, target.shape[0])
    score = functools.partial(in_float32, score_function(model, metric))
    plans = _plans(tower, kinds, target, source, layers, positions, heads, neurons, sae, latents, intervention)
    _check_groups(plans, method, mean)
    if plans[0].pair_positions is not None and method != "exact":
        raise ValueError(f"positions with one row per pair are for method='exact', not method={method!r}")
    dims, shape = _dims_and_shape(plans, tower, target.shape[0], embedding_metric)
    _warn_if_large(plans, shape, method, embedding_metric)
    perm = _resample_pairs(tower, target, source, seed) if intervention == "resample" else None
    return Request(tower=tower, target=target, source=source, other=other, score=score, plans=tuple(plans),
                   mean=mean, method=method, resample_pairs=perm, dims=dims, shape=shape, batch_size=batch_size,
                   pair_chunk=pair_chunk, progress=progress, steps=steps)


def _check_kinds(hook, intervention, method: str, metric: Metric, sae) -> list[HookKind]:
    """The hook kinds, checked against the intervention, the method and the metric."""
    names = [hook] if isinstance(hook, str) else list(hook)
    kinds = [kind_of(name) for name in names]
    if not kinds:
        raise ValueError("hook: give a hook kind or a list of them")
    by_hook_function = is_hook_function(intervention)
    if not by_hook_function and intervention not in EXACT_INTERVENTIONS:
        raise ValueError(f"Unknown intervention {intervention!r}; use one of {EXACT_INTERVENTIONS}, 'value_only' or a hook function")
    if kinds[0].reenters is None and not by_hook_function:
        raise ValueError(f"hook={kinds[0].name!r} takes a hook-function intervention (e.g. 'value_only')")
    if isinstance(intervention, str) and intervention == "value_only" and kinds[0].name != "pattern":
        raise ValueError(f"intervention='value_only' replaces attention patterns: use it with hook='pattern', "
                         f"not hook={kinds[0].name!r}")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; use one of {METHODS}")
    if method in GRADIENT_METHODS and isinstance(metric, str) and metric == "embedding":
        raise ValueError("attribution patching needs a scalar metric, not metric='embedding'")
    if len(kinds) > 1 and (by_hook_function or method in GRADIENT_METHODS or sae is not None
                           or any(kind.unit_axis for kind in kinds)):
        raise ValueError("several hook kinds at once are for exact patch/zero/mean/resample interventions "
                         "on resid, attn_out or mlp_out")
    if method in GRADIENT_METHODS and by_hook_function:
        raise ValueError("attribution patching needs a patch, zero, mean or resample intervention")
    return kinds


def _check_unused(intervention, source, mean) -> None:
    """`source=` and `mean=` are refused where the intervention would not read them."""
    name = intervention if isinstance(intervention, str) else getattr(intervention, "__name__", "hook function")
    if mean is not None and intervention != "mean":
        raise ValueError(f"mean= is read only by intervention='mean', not by intervention={name!r}")
    if source is not None and (is_hook_function(intervention) or intervention == "zero"):
        raise ValueError(f"source= is not read by intervention={name!r}; leave it out")


def _check_unit_selections(kinds: list[HookKind], *, heads, neurons, latents, sae) -> None:
    """heads=, neurons= and latents= are refused where no chosen hook kind splits into those units
    (heads=[1] with hook="resid" would otherwise patch the whole activation, every head at once)."""
    readers = {"heads": [kind.name for kind in KINDS.values() if kind.unit_axis == "head"],
               "neurons": [kind.name for kind in KINDS.values() if kind.unit_axis == "neuron"]}
    chosen = "hook=" + (repr(kinds[0].name) if len(kinds) == 1 else repr([kind.name for kind in kinds]))
    for name, value in (("heads", heads), ("neurons", neurons)):
        takes = any(kind.name in readers[name] for kind in kinds)
        if not (isinstance(value, str) and value == "all") and not takes:
            whom = " or ".join(f"hook={n!r}" for n in readers[name])
            raise ValueError(f"{name}={value!r} is read only by {whom}, not by {chosen}; leave it out")
    if sae is None and not (isinstance(latents, str) and latents == "all"):
        raise ValueError(f"latents={latents!r} is read only with sae= (an SAE splitting a {'/'.join(SAE_HOOKS)} "
                         "activation); leave it out or pass sae=")


def _tower_inputs(model: HookedCLIP, target, source, intervention) -> tuple[HookedTower, Tensor, Optional[Tensor]]:
    """(tower, target, source) with both inputs checked for the tower the target belongs to."""
    tower, target = model.tower_input(target, name="target")
    _check_no_spliced_sae(tower)
    if source is not None:
        source_tower, source = model.tower_input(source, name="source")
        if source_tower is not tower:
            raise ValueError(f"source is {source_tower.modality} input but target is {tower.modality} input")
    if intervention in ("patch", "resample") and source is None:
        if intervention == "patch":
            raise ValueError("intervention='patch' needs a source")
        source = target
    if intervention == "patch" and source.shape[0] != target.shape[0]:
        raise ValueError(f"{source.shape[0]} sources for {target.shape[0]} targets")
    return tower, target, source


def _check_no_spliced_sae(tower: HookedTower) -> None:
    """`patch` resumes runs from cached residuals and skips work a spliced SAE would need: refused."""
    spliced = [name for name, module in tower.named_modules() if getattr(module, "always_runs", False)]
    if spliced:
        raise ValueError(f"the {tower.modality} tower has an SAE spliced in at {spliced[0]}: patch its latents with "
                         f"patch(sae=...) on the model without it (model.remove_saes()), or edit "
                         f"{spliced[0]}.hook_sae_acts_post with run_with_hooks")


def check_list(values, valid: range, what: str) -> list:
    """`values` ("all", one int or a list; tuples inside kept as groups) checked against `valid`."""
    if isinstance(values, str):
        if values == "all":
            return list(valid)
        raise ValueError(f"{what}s={values!r}: use 'all', an int or a list of ints")
    if is_integer(values):
        values = [values]
    if not isinstance(values, (list, tuple, range, np.ndarray)):
        raise TypeError(f"{what}s={values!r}: use 'all', an int or a list of ints")
    if len(values) == 0:
        raise ValueError(f"{what}s is empty: give at least one {what}, or 'all'")
    out = []
    for v in values:
        if isinstance(v, (tuple, list, range)):
            group = tuple(check_list(list(v), valid, what))
            if any(isinstance(member, tuple) for member in group):
                raise ValueError(f"{what} group {v!r} holds a group: a joint intervention is one flat tuple of {what}s")
            if len(set(group)) != len(group):
                twice = next(member for member in group if group.count(member) > 1)
                raise ValueError(f"{what} group {v!r} names {what} {twice} twice")
            out.append(group)
            continue
        if not is_integer(v) or int(v) not in valid:
            raise ValueError(f"{what} {v!r} is out of range ({valid.start}..{valid.stop - 1})")
        out.append(int(v))
    return out


def _plans(tower: HookedTower, kinds: list[HookKind], target: Tensor, source: Optional[Tensor], layers, positions,
           heads, neurons, sae, latents, intervention) -> list[Plan]:
    """One plan per hook kind, sharing the first kind's layers, positions and units."""
    n_layers = tower.cfg.n_layers
    by_hook_function = is_hook_function(intervention)
    layer_list = check_list(layers, kinds[0].layers(n_layers), "layer")
    if any(kind.layers(n_layers) != kinds[0].layers(n_layers) for kind in kinds):
        raise ValueError(f"hook kinds {[kind.name for kind in kinds]} have different layer ranges; patch them separately")
    if by_hook_function:
        _check_whole_activation(intervention, positions=positions, heads=heads, neurons=neurons, sae=sae, latents=latents)
    pair_positions = None if by_hook_function else _pair_positions(positions, target, tower)
    if pair_positions is not None:
        position_list = list(range(pair_positions.shape[1]))  # the slots
    else:
        position_list = None if by_hook_function else _positions(positions, target, tower)
    _, units = _units(tower, kinds[0], by_hook_function, heads, neurons, sae, latents, intervention)
    if tower.modality == "text" and source is not None and intervention == "patch":
        _check_equal_lengths(tower, source, target)
    return [Plan(kind, layer_list, position_list, units, intervention, sae, pair_positions) for kind in kinds]


def _check_groups(plans: list[Plan], method: str, mean) -> None:
    """Joint interventions (tuples of layers, positions or units) are exact: a gradient method
    estimates single sites, and a per-layer `mean` has no row for a group."""
    plan = plans[0]
    if not plan.has_groups or is_hook_function(plan.intervention):
        return
    if method in GRADIENT_METHODS:
        raise ValueError(f"method={method!r} estimates single sites; tuples of layers, positions or units are joint "
                         "interventions, which method='exact' runs")
    if mean is not None and torch.as_tensor(mean).ndim == plan.kind.site_ndim + 1:
        raise ValueError("mean= has one row per layer, but layers has groups (tuples); give one mean for all layers")


def _check_whole_activation(intervention, **selections) -> None:
    """A hook-function intervention receives whole activations: a selection of positions or units
    cannot be applied to it, so asking for one is an error rather than a silent no-op."""
    defaults = {"positions": "all", "heads": "all", "neurons": "all", "sae": None, "latents": "all"}
    for name, value in selections.items():
        if not (value is None if defaults[name] is None else isinstance(value, str) and value == defaults[name]):
            name_of = intervention if isinstance(intervention, str) else getattr(intervention, "__name__", "hook function")
            raise ValueError(f"{name}={value!r} cannot be applied with intervention={name_of!r}: a hook function receives "
                             f"the whole activation of every position and unit; select inside the hook instead")


def _pair_positions(positions, target: Tensor, tower: HookedTower) -> Optional[Tensor]:
    """Each pair's own positions [n_pairs, slots] (CPU int64), when `positions` is a 2-D array of
    integers; None for the other forms of `positions`."""
    if isinstance(positions, (Tensor, np.ndarray)):
        table = torch.as_tensor(np.asarray(positions.cpu() if isinstance(positions, Tensor) else positions))
    elif isinstance(positions, list) and positions and all(isinstance(row, (list, np.ndarray, Tensor)) for row in positions):
        widths = [len(row) for row in positions]
        if len(set(widths)) > 1:
            row = next(i for i, w in enumerate(widths) if w != widths[0])
            raise ValueError(f"positions: row {row} has {widths[row]} slots and row 0 has {widths[0]}; every pair "
                             "needs the same slots (-1 where it has none)")
        table = torch.as_tensor(np.asarray([np.asarray(row) for row in positions]))
    else:
        return None
    if table.ndim != 2:
        return None  # a 1-D array is a list of positions
    if table.dtype.is_floating_point or table.dtype == torch.bool:
        raise ValueError(f"positions as one row per pair must be integers [n_pairs, slots]; got {table.dtype}")
    n_pairs, n_positions = target.shape[0], tower.n_positions(target)
    if table.shape[0] != n_pairs or table.shape[1] == 0:
        raise ValueError(f"positions has {table.shape[0]} rows of {table.shape[1]} slots; give one row per pair "
                         f"({n_pairs}) with at least one slot")
    bad = (table < -1) | (table >= n_positions)
    if bool(bad.any()):
        pair, slot = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"positions[{pair}, {slot}] = {int(table[pair, slot])} is out of range (0..{n_positions - 1}, "
                         "or -1 where a pair has no position in that slot)")
    return table.long()


def _positions(positions, target: Tensor, tower: HookedTower) -> Optional[list]:
    if isinstance(positions, str) and positions == "sequence":
        return None
    return check_list(positions, range(tower.n_positions(target)), "position")


def _units(tower: HookedTower, kind: HookKind, by_hook_function: bool, heads, neurons, sae, latents,
           intervention) -> tuple[Optional[str], Optional[list]]:
    """(axis name, labels) of the units one activation is split into, or (None, None)."""
    if sae is not None:
        return "latent", _sae_latents(tower, kind, by_hook_function, sae, latents, intervention)
    if by_hook_function or kind.unit_axis is None:
        return None, None  # a hook-function intervention sees every head at once: no head axis
    chosen = heads if kind.unit_axis == "head" else neurons
    return kind.unit_axis, check_list(chosen, range(kind.n_units(tower)), kind.unit_axis)


def _sae_latents(tower: HookedTower, kind: HookKind, by_hook_function: bool, sae, latents, intervention) -> list:
    if not kind.residual_space or by_hook_function:
        raise ValueError(f"sae= splits a {'/'.join(SAE_HOOKS)} activation with a patch, zero or resample "
                         f"intervention; got hook={kind.name!r}, intervention={intervention!r}")
    if intervention == "mean":
        raise ValueError("sae= takes intervention 'zero', 'patch' or 'resample' (a mean latent code is not defined here)")
    if not (hasattr(sae, "encode") and hasattr(sae, "W_dec")):
        raise ValueError("sae= needs an object with encode(x) and W_dec [n_latents, d], e.g. clip_lens.sae.TopKSAE")
    trained_on = getattr(sae, "hook", None)
    trained_tower = split_tower_prefix(trained_on)[0] if isinstance(trained_on, str) else None
    if trained_tower is not None and trained_tower != tower.modality:
        raise ValueError(f"the SAE was trained on {trained_on}, a hook of the other tower; this patch is on the "
                         f"{tower.modality} tower")
    if sae.W_dec.device != tower.device:
        raise ValueError(f"the SAE is on {sae.W_dec.device} and the {tower.modality} tower on {tower.device}; "
                         f"move it with sae.to({str(tower.device)!r})")
    n_latents, d_in = sae.W_dec.shape
    if d_in != tower.cfg.d_model:
        raise ValueError(f"the SAE reads {d_in}-dimensional activations but {kind.name} has d_model={tower.cfg.d_model}")
    return check_list(latents, range(n_latents), "latent")


def _check_equal_lengths(tower: HookedTower, source: Tensor, target: Tensor) -> None:
    ls, lt = tower.sequence_lengths(source), tower.sequence_lengths(target)
    bad = (ls != lt).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"pair {i}: source has {int(ls[i])} tokens and target {int(lt[i])}; a positional patch needs "
                         "equal token lengths")


def _dims_and_shape(plans: list[Plan], tower: HookedTower, n_pairs: int,
                    embedding_metric: bool) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The axes of `effects`: pair, (hook), layer, (position), (unit), (embed), and their sizes."""
    plan = plans[0]
    dims, shape = ["pair"], [n_pairs]
    if len(plans) > 1:
        dims, shape = dims + ["hook"], shape + [len(plans)]
    dims, shape = dims + ["layer"], shape + [len(plan.layers)]
    if plan.positions is not None:
        dims, shape = dims + ["position"], shape + [len(plan.positions)]
    if plan.units is not None:
        dims, shape = dims + [plan.unit_axis], shape + [len(plan.units)]
    if embedding_metric:
        dims, shape = dims + ["embed"], shape + [tower.cfg.d_embed]
    return tuple(dims), tuple(shape)


def _warn_if_large(plans: list[Plan], shape: tuple[int, ...], method: str, embedding_metric: bool) -> None:
    if method != "exact" or is_hook_function(plans[0].intervention):
        return
    per_pair = int(np.prod(shape[1:-1] if embedding_metric else shape[1:]))
    if per_pair > LARGE_GRID:
        warnings.warn(f"{per_pair:,} exact interventions per pair (each a partial forward pass); method='attribution' "
                      "estimates them all from one forward and one backward pass", stacklevel=4)


def _resample_pairs(tower: HookedTower, target: Tensor, source: Tensor, seed: int) -> Tensor:
    """The source index of each pair for intervention="resample", drawn with `seed`."""
    if source.shape[0] < target.shape[0]:
        raise ValueError(f"intervention='resample' draws a distinct source for each target: {source.shape[0]} sources "
                         f"for {target.shape[0]} targets")
    perm = torch.randperm(source.shape[0], generator=torch.Generator().manual_seed(seed), device="cpu")[: target.shape[0]]
    perm = perm.to(tower.device)
    if tower.modality == "text" and not torch.equal(tower.sequence_lengths(source[perm]), tower.sequence_lengths(target)):
        raise ValueError("intervention='resample' needs all texts to have the same token length")
    return perm
