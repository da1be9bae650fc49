"""The hook kinds `patch` intervenes on, one row each.

A row says what the hook is called at a layer, which layers it has, the single units it splits
into (heads, neurons; SAE latents split any residual-space kind), and where a replacement
re-enters the residual stream. Adding a hook kind is adding a row.

Resumed runs count in half-layers: step 2b is the residual before block b (`hook_resid_pre`),
step 2b + 1 the residual between its attention and its MLP (`hook_resid_mid`).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.checks import is_integer
from clip_lens.components import TransformerBlock
from clip_lens.hooks import BLOCK_HOOKS, act_name
from clip_lens.towers import HookedTower


def _as_is(block: TransformerBlock, out: Tensor) -> Tensor:
    return out


def _heads_to_attn_out(block: TransformerBlock, z: Float[Tensor, "... head d_head"]) -> Float[Tensor, "... d_model"]:
    """The attention output recomputed from (edited) per-head values z."""
    out = block.attn.project_z(z)
    return out * block.ls1 if block.ls1 is not None else out


def _neurons_to_mlp_out(block: TransformerBlock, post: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_model"]:
    """The MLP output recomputed from (edited) neuron activations."""
    out = block.mlp.project_post(post)
    return out * block.ls2 if block.ls2 is not None else out


@dataclass(frozen=True)
class HookKind:
    """One hook kind of the engine.

    Attributes:
        name: what `patch(hook=...)` calls it.
        act: the hook point's short name in every block (`clip_lens.hooks.act_name`: "resid_pre", "z", ...).
        unit_axis: "head" or "neuron" when one activation splits into single units, else None.
        reenters: where a replacement joins the residual stream: "resid" (it is the residual),
            "attn" (added after block b's attention), "mlp" (added after block b's MLP); None for
            kinds only hook functions intervene on.
        to_output: the block's residual-space output from the (edited) activation.
        residual_space: the activation is d_model wide, so an SAE can split it into latents.
        has_final_layer: layers run 0..L (the residual after the last block is layer L), not 0..L-1.
    """

    name: str
    act: str
    unit_axis: Optional[str] = None
    reenters: Optional[str] = None
    to_output: Callable[[TransformerBlock, Tensor], Tensor] = _as_is
    residual_space: bool = False
    has_final_layer: bool = False

    def layers(self, n_layers: int) -> range:
        return range(n_layers + 1) if self.has_final_layer else range(n_layers)

    def hook_name(self, layer: int, n_layers: int) -> str:
        """The tower hook name at `layer` (the residual at layer L is the last block's resid_post)."""
        if self.has_final_layer and layer == n_layers:
            return act_name("resid_post", n_layers - 1)
        return act_name(self.act, layer)

    @property
    def site_ndim(self) -> int:
        """Axes of one position's activation: 2 for per-head kinds ([head, d_head]), else 1."""
        return 2 if self.unit_axis == "head" else 1

    def n_units(self, tower: HookedTower) -> int:
        return {"head": tower.cfg.n_heads, "neuron": tower.cfg.d_mlp}[self.unit_axis]

    def unit(self, act: Tensor, unit) -> Tensor:
        """One unit of `act` [..., (head,) d]: a head's [..., d_head] or a neuron's [...]; a tuple
        of units (a joint intervention) keeps their axis: [..., units, d_head] or [..., units]."""
        unit = list(unit) if isinstance(unit, tuple) else unit
        return act[..., unit, :] if self.unit_axis == "head" else act[..., unit]

    def with_unit(self, act: Tensor, unit, value: Tensor) -> Tensor:
        """A copy of `act` with one unit (or a tuple of them) set to `value`."""
        out = act.clone()
        unit = list(unit) if isinstance(unit, tuple) else unit
        if self.unit_axis == "head":
            out[..., unit, :] = value
        else:
            out[..., unit] = value
        return out

    def start_step(self, layer: int) -> int:
        """The half-layer step a run resumes at after a replacement at `layer`."""
        return {"resid": 2 * layer, "attn": 2 * layer + 1, "mlp": 2 * layer + 2}[self.reenters]

    def resumed_name(self, layer: int, n_layers: int) -> str:
        """The hook of the residual stream a run resumes from after a replacement at `layer`."""
        if self.reenters == "resid":
            return self.hook_name(layer, n_layers)
        return act_name("resid_mid" if self.reenters == "attn" else "resid_post", layer)

    def read_residuals(self, layer: int, n_layers: int) -> set[str]:
        """The target's residual hooks an intervention at `layer` reads: the one it resumes from, and
        for a component's output the one its replaced output is added to (`resumed_residual`)."""
        if self.reenters == "resid":
            return {self.resumed_name(layer, n_layers)}
        before = act_name("resid_pre" if self.reenters == "attn" else "resid_mid", layer)
        return {self.resumed_name(layer, n_layers), before}

    def resumed_residual(self, tower: HookedTower, layer: int, rep: Tensor, cache: dict, pair: int,
                         sel, first: int = 0, end: Optional[int] = None) -> Float[Tensor, "pos d_model"]:
        """The residual stream at `start_step(layer)` of one target run (`pair` of the cached
        `cache`) with the activation at positions `sel` replaced by `rep`, at positions
        first..end - 1 (a causal run's suffix: every position in `sel` lies there). Many at once:
        `resumed_residuals` of their `residual_recipe`s."""
        return self.residual_recipe(tower, layer, functools.partial(_as_given, rep), cache, pair, sel, first,
                                    end).build(cache)

    def residual_recipe(self, tower: HookedTower, layer: int, make_rep: Callable[[], Tensor], cache: dict,
                        pair: int, sel, first: int = 0, end: Optional[int] = None) -> "ResidualRecipe":
        """How to build `resumed_residual` (its replacement `make_rep()` made only when it is
        built): rows first..end - 1 of `pair` in the residual it resumes from (fewer where that is
        cached at the class token only), the rows at `sel` replaced (`replaced_rows`)."""
        name = self.resumed_name(layer, tower.cfg.n_layers)
        width = cache[name].shape[1]
        stop = width if end is None else min(end, width)
        new_rows = functools.partial(self._new_rows, tower, layer, make_rep, cache, pair, sel)
        return ResidualRecipe(name, pair, first, stop - first, _row_list(_shifted(sel, first)), new_rows)

    def replaced_rows(self, tower: HookedTower, layer: int, rep: Tensor, cache: dict, pair: int,
                      sel) -> Float[Tensor, "replaced d_model"]:
        """The residual at `start_step(layer)` at positions `sel` of one target run, once the
        activation there is `rep` [(replaced,) (head,) d]: `rep` itself for the residual, else the
        residual the component's output is added to plus the output recomputed from `rep`."""
        if self.reenters == "resid":
            rows = rep
        else:
            with torch.no_grad():
                out = self.to_output(tower.blocks[layer], rep)
            before = act_name("resid_pre" if self.reenters == "attn" else "resid_mid", layer)
            rows = cache[before][pair][sel] + out
        return rows.reshape(-1, rows.shape[-1])  # one position (an int `sel`) as one row

    def _new_rows(self, tower: HookedTower, layer: int, make_rep: Callable[[], Tensor], cache: dict, pair: int,
                  sel) -> Float[Tensor, "replaced d_model"]:
        return self.replaced_rows(tower, layer, make_rep(), cache, pair, sel)


def _as_given(rep: Tensor) -> Tensor:
    return rep


@dataclass(frozen=True)
class ResidualRecipe:
    """The residual stream one resumed run starts from, before it is built: rows
    first..first + n - 1 of pair `pair` in the cached residual `name`, with the rows `replaced`
    (counted from `first`) set to `new_rows()` [len(replaced), d_model]."""

    name: str
    pair: int
    first: int
    n: int
    replaced: list[int]
    new_rows: Callable[[], Tensor]

    def build(self, cache: dict) -> Float[Tensor, "n d_model"]:
        """This run's residual alone (a copy of its cached rows, the replaced ones written)."""
        state = cache[self.name][self.pair, self.first : self.first + self.n].clone()
        state[self.replaced] = self.new_rows().to(state.dtype)
        return state


def resumed_residuals(cache: dict, recipes: Sequence[ResidualRecipe]) -> Float[Tensor, "rows d_model"]:
    """The residuals of many runs (`ResidualRecipe.build` of each), stacked in their order into one
    [sum of n, d_model] matrix with one gather per cached residual they read and one indexed write
    of every replaced row, instead of a copy and a write per run. It only copies: bitwise equal."""
    offsets = list(itertools.accumulate((recipe.n for recipe in recipes), initial=0))  # run i: rows offsets[i]..
    by_name: dict[str, list[int]] = {}
    for i, recipe in enumerate(recipes):
        by_name.setdefault(recipe.name, []).append(i)
    device = cache[recipes[0].name].device
    if len(by_name) == 1:
        states = _cached_rows(cache, recipes, range(len(recipes)), device)
    else:  # runs that resume from different residuals (layers, hook kinds), each name's rows gathered at once
        states = cache[recipes[0].name].new_empty(offsets[-1], cache[recipes[0].name].shape[-1])
        for runs in by_name.values():
            states[_index([r for i in runs for r in range(offsets[i], offsets[i + 1])], device)] = \
                _cached_rows(cache, recipes, runs, device)
    replaced = [offsets[i] + r for i, recipe in enumerate(recipes) for r in recipe.replaced]
    states[_index(replaced, device)] = torch.cat([recipe.new_rows() for recipe in recipes]).to(states.dtype)
    return states


def _cached_rows(cache: dict, recipes: Sequence[ResidualRecipe], runs: Sequence[int],
                 device) -> Float[Tensor, "rows d_model"]:
    """The cached rows of runs `runs` (indexes of `recipes`, all reading one residual), in order."""
    name = recipes[runs[0]].name
    pairs = [recipes[i].pair for i in runs for _ in range(recipes[i].n)]
    positions = [p for i in runs for p in range(recipes[i].first, recipes[i].first + recipes[i].n)]
    return cache[name][_index(pairs, device), _index(positions, device)]  # indexing copies


def _index(values: list[int], device) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _row_list(sel) -> list[int]:
    """Positions `sel` (an int, a list or a slice with both ends) as a list."""
    if isinstance(sel, slice):
        return list(range(sel.start, sel.stop))
    return list(sel) if isinstance(sel, list) else [sel]


def _shifted(sel, first: int):
    """Positions `sel` (an int, a list or a slice) counted from position `first`."""
    if first == 0:
        return sel
    if isinstance(sel, slice):
        return slice(sel.start - first, sel.stop - first)
    return [p - first for p in sel] if isinstance(sel, list) else sel - first


KINDS: dict[str, HookKind] = {kind.name: kind for kind in (
    HookKind("resid", "resid_pre", reenters="resid", residual_space=True, has_final_layer=True),
    HookKind("attn_out", "attn_out", reenters="attn", residual_space=True),
    HookKind("mlp_out", "mlp_out", reenters="mlp", residual_space=True),
    HookKind("z", "z", unit_axis="head", reenters="attn", to_output=_heads_to_attn_out),
    HookKind("mlp_post", "post", unit_axis="neuron", reenters="mlp", to_output=_neurons_to_mlp_out),
    HookKind("pattern", "pattern"),  # hook functions only (e.g. value-only attention)
)}
HOOK_KINDS = tuple(KINDS)
UNIT_AXES = {kind.name: kind.unit_axis for kind in KINDS.values() if kind.unit_axis}
SAE_HOOKS = tuple(kind.name for kind in KINDS.values() if kind.residual_space)


def kind_of(name: str) -> HookKind:
    if name not in KINDS:
        raise ValueError(f"Unknown hook kind {name!r}; use one of {HOOK_KINDS}")
    return KINDS[name]


def hook_name(kind: str, layer: int, n_layers: int) -> str:
    """The tower hook name of hook kind `kind` at `layer` in a tower of `n_layers` blocks, e.g.
    hook_name("resid", 12, 12) -> "blocks.11.hook_resid_post" (docs/methods.md#layer-numbering).
    An unknown kind, or a layer outside the kind's range (0..n_layers for "resid", else
    0..n_layers - 1), is a ValueError naming it."""
    found = kind_of(kind)
    if not is_integer(n_layers) or n_layers < 1:
        raise ValueError(f"n_layers={n_layers!r}: a tower has at least one block")
    valid = found.layers(int(n_layers))
    if not is_integer(layer) or int(layer) not in valid:
        raise ValueError(f"layer {layer!r} is outside the layers of hook kind {kind!r} in a tower of {n_layers} "
                         f"blocks ({valid.start}..{valid.stop - 1})")
    return found.hook_name(int(layer), int(n_layers))


def hook_site(name: str, n_layers: int) -> tuple[str, int]:
    """(hook kind, layer) that `patch` uses for a tower's hook name, e.g.
    "blocks.11.hook_resid_post" -> ("resid", 12) in a 12-block tower (the residual after block b is
    layer b + 1, docs/methods.md#layer-numbering), "blocks.3.mlp.hook_post" -> ("mlp_post", 3)."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) < n_layers:
        block, leaf = int(parts[1]), ".".join(parts[2:])
        if leaf == BLOCK_HOOKS["resid_post"]:
            return "resid", block + 1
        for kind in KINDS.values():
            if BLOCK_HOOKS[kind.act] == leaf:
                return kind.name, block
    raise ValueError(f"{name!r} is not a hook `patch` intervenes on: use blocks.<b>.hook_resid_pre / hook_resid_post / "
                     f"hook_attn_out / hook_mlp_out / attn.hook_z / mlp.hook_post (b in 0..{n_layers - 1})")
