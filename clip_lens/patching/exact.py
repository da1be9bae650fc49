"""Exact interventions: build them, skip those that change nothing, batch the rest and run them.

Per chunk of pairs, the target (and source) runs are cached once (`resume.run_cached`). Each
intervention then resumes from the target's cached residual at its own half-layer step, in the
causal text tower from its own position on (earlier positions keep their cached keys and
values), and many run in one batch, each joining when the batch reaches its step.

An intervention holds a recipe for its residual stream, not the stream: the streams are built
when its batch runs, so memory grows with `batch_size`, not with the grid (a ViT-B-16 grid over
every position would otherwise hold 197 x 13 residual streams per image).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.components import hooks_attached
from clip_lens.hooks import act_name
from clip_lens.patching.packed import Packing, heads_first, resume_packed
from clip_lens.patching.request import EXACT_INTERVENTIONS, Plan, Request, as_group
from clip_lens.patching.result import PatchResult
from clip_lens.patching.resume import LaterEdit, cached_names, reaches_pooled_row_only, residual_steps, resume, run_cached, run_cached_after_shared_prefix
from clip_lens.patching.sites import ResidualRecipe, resumed_residuals
from clip_lens.towers import HookedTower


class Intervention:
    """One exact intervention of one pair: where it resumes and how to build the residual it
    starts from."""

    __slots__ = ("pair", "key", "start", "state", "row", "edits")

    def __init__(self, pair: int, key: tuple, start: int, state: ResidualRecipe, row: Optional[int]):
        self.pair = pair              # index within the chunk
        self.key = key                # its cell of `effects` after the pair index
        self.start = start            # half-layer step it resumes at
        self.state = state            # the residual at `start` from `suffix` on, [rows, d_model] once built
        self.row = row                # the pooled position within the suffix (causal towers), else None
        self.edits: list[tuple] = []  # (hook name, rows, edit) at later layers of a joint intervention

    @property
    def suffix(self) -> int:
        """The first position computed (causal towers); 0 otherwise."""
        return self.state.first

    @property
    def rows(self) -> int:
        """The number of positions computed."""
        return self.state.n


def replacement(plan: Plan, act_t: Tensor, act_s: Optional[Tensor], mean: Optional[Tensor]) -> Tensor:
    """The activation an intervention writes, shaped like the target's `act_t`."""
    if plan.intervention == "zero":
        return torch.zeros_like(act_t)
    if plan.intervention == "mean":
        return mean.expand_as(act_t)
    return act_s


RepFactory = Callable[[], Tensor]  # () -> the replaced activation, built when its batch runs


def unit_replacements(plan: Plan, act_t: Tensor, act_s: Optional[Tensor],
                      mean: Optional[Tensor]) -> Iterator[tuple[Optional[int], Optional[RepFactory]]]:
    """(unit index, a factory of the activation with that unit replaced) for each unit of one
    activation `act_t` / `act_s` [..., (head,) d]; the factory is None where the replacement
    changes nothing (its result is the clean run's). Without units: one (None, factory)."""
    if plan.units is None:
        rep = replacement(plan, act_t, act_s, mean)
        yield None, (None if torch.equal(rep, act_t) else functools.partial(_as_is, rep))
    elif plan.sae is not None:
        yield from _latent_replacements(plan, act_t, act_s)
    else:
        rep_full = replacement(plan, act_t, act_s, mean)
        for ui, unit in enumerate(plan.units):
            unit_t, unit_rep = plan.kind.unit(act_t, unit), plan.kind.unit(rep_full, unit)
            changes = not torch.equal(unit_rep, unit_t)
            yield ui, (functools.partial(plan.kind.with_unit, act_t, unit, unit_rep) if changes else None)


def _as_is(rep: Tensor) -> Tensor:
    return rep


def _latent_replacements(plan: Plan, act_t: Tensor, act_s: Optional[Tensor]) -> Iterator[tuple[int, Optional[RepFactory]]]:
    """Latent j written as in the replacement run: a + (c_rep_j - c_j) W_dec[j]."""
    with torch.no_grad():
        codes_t = plan.sae.encode(act_t)
        codes_rep = torch.zeros_like(codes_t) if plan.intervention == "zero" else plan.sae.encode(act_s)
    delta = codes_rep - codes_t                                                   # [..., n_latents]
    # shape = [..., n_latents] -> [rows, n_latents]: the latents whose code changes anywhere
    changed = set((delta != 0).reshape(-1, delta.shape[-1]).any(0).nonzero().flatten().tolist())
    for ui, latent in enumerate(plan.units):
        changes = not changed.isdisjoint(as_group(latent))
        yield ui, (functools.partial(_with_latent, plan.sae, act_t, delta, latent) if changes else None)


def _with_latent(sae, act_t: Tensor, delta: Tensor, latent) -> Tensor:
    """act_t + (c_rep_j - c_j) W_dec[j], for latent j or (a tuple) each latent of a group."""
    if isinstance(latent, tuple):
        moved = delta[..., list(latent)] @ sae.W_dec[list(latent)].detach()
    else:
        moved = delta[..., latent, None] * sae.W_dec[latent].detach()
    return (act_t + moved).to(act_t.dtype)  # the SAE may be float32


ChangedCells = dict[int, list[list[bool]]]  # {layer: [pair][position] whether the replacement changes the activation}


@dataclass(frozen=True)
class ChunkRuns:
    """What one plan's interventions in a chunk of pairs are built from (row i of each cache is the
    chunk's pair i).

    Attributes:
        cache_t: the target runs' cached activations.
        cache_s: the source runs' (for "patch" and "resample"), else None.
        src_index: [pairs], each pair's row of `cache_s`, or None where it is the pair's own row.
        means: {layer: mean activation} for "mean", else empty.
        changed: the no-op table of the plan's single layers (`changed_cells`).
    """

    cache_t: dict
    cache_s: Optional[dict]
    src_index: Optional[Tensor]
    means: dict
    changed: ChangedCells

    @classmethod
    def of(cls, plan: Plan, tower: HookedTower, cache_t: dict, cache_s: Optional[dict], src_index: Optional[Tensor],
           means: dict) -> "ChunkRuns":
        return cls(cache_t, cache_s, src_index, means, changed_cells(plan, tower, cache_t, cache_s, src_index, means))

    def source_row(self, pair: int) -> int:
        """Pair `pair`'s row of the source cache."""
        return pair if self.src_index is None else int(self.src_index[pair])


def changed_cells(plan: Plan, tower: HookedTower, cache_t: dict, cache_s: Optional[dict],
                  src_index: Optional[Tensor], means: dict) -> ChangedCells:
    """Which cells of a chunk a replacement of the whole activation changes, for each single layer
    of `plan`: one comparison per layer over the chunk's [pair, pos, ...] activations instead of a
    `torch.equal` per cell (on a GPU, each a wait for the device). A cell changes where any element
    differs, NaN included (NaN != NaN, as for `torch.equal`). Empty for units or SAE latents (their
    no-ops are decided per unit); a layer whose source and target caches differ in shape is left
    out (its cells are compared, and their lengths checked, one by one)."""
    if plan.units is not None or plan.sae is not None or plan.intervention not in EXACT_INTERVENTIONS:
        return {}
    changed = {}
    for layer in plan.layers:
        if isinstance(layer, tuple):
            continue  # a joint intervention: decided per cell
        name = plan.kind.hook_name(layer, tower.cfg.n_layers)
        act_t = cache_t[name]                                                  # [pair, pos, (head,) d]
        act_s = None if cache_s is None else (cache_s[name] if src_index is None else cache_s[name][src_index])
        if act_s is not None and act_s.shape != act_t.shape:
            continue
        rep = replacement(plan, act_t, act_s, means.get(layer))
        changed[layer] = (rep != act_t).flatten(2).any(-1).tolist()           # [pair][pos]
    return changed


def _changes(changed: list[bool], sel) -> bool:
    """Whether a replacement at rows `sel` (an int, a list or a slice) changes any of them, from
    one pair's `changed` [pos] of `changed_cells`."""
    if isinstance(sel, slice):
        return any(changed[sel])
    return any(changed[p] for p in sel) if isinstance(sel, list) else changed[sel]


def build_interventions(plan: Plan, tower: HookedTower, pair: int, length: int, positions: list,
                        runs: ChunkRuns) -> tuple[list[Intervention], list[tuple]]:
    """The interventions of one pair of a chunk (`length` its own positions) at its position entries
    `positions` (`Plan.positions_of`), and the keys of those that change nothing (read from the
    chunk's `changed_cells` for a single layer and position). A layer or position given as a tuple
    is one joint intervention."""
    items, noops = [], []
    for li, layer in enumerate(plan.layers):
        for pi, pos in enumerate(positions):
            if pos is not None and (max(as_group(pos)) >= length or min(as_group(pos)) < 0):
                continue  # a position of the pair's padding, or a slot the pair has none in: the cell stays NaN
            key = (li,) + ((pi,) if plan.positions is not None else ())
            single = not isinstance(layer, tuple) and not isinstance(pos, tuple)
            site = Site(plan, tower, pair, length, pos, runs, single)
            new, new_noops = site.joint(as_group(layer), key)
            items.extend(new)
            noops.extend(new_noops)
    return items, noops


class Site:
    """One pair's activations at one position entry (a position, a tuple of them, or None: the
    whole sequence), from which the interventions at a layer entry are built."""

    def __init__(self, plan: Plan, tower: HookedTower, pair: int, length: int, pos, runs: ChunkRuns, single: bool):
        self.plan, self.tower, self.pair, self.length, self.pos = plan, tower, pair, length, pos
        self.cache_t, self.cache_s, self.src_pair, self.means = runs.cache_t, runs.cache_s, runs.source_row(pair), runs.means
        # the layers whose no-ops the chunk decided at once (`changed_cells`): for a single layer and position
        self.changed = runs.changed if single else {}
        # a causal run recomputes positions suffix.. only; a non-causal one every position
        self.suffix = min(as_group(pos)) if (tower.attends_causally and pos is not None) else 0

    def pooled_row_only(self, layer: int) -> bool:
        """Whether only the pooled row of this layer's activation reaches the embedding (the last
        block, in a tower pooling one row: `resume.reaches_pooled_row_only`)."""
        return reaches_pooled_row_only(self.tower, self.plan.kind.hook_name(layer, self.tower.cfg.n_layers))

    def selection(self, layer: int):
        """Which rows of the layer's cached activation the intervention replaces: an int, a list
        (a tuple of positions) or a slice (the whole sequence); None where none of them reaches
        the embedding (in the last block only the pooled row does: the class token, or EOT)."""
        pooled = 0 if self.tower.pools_class_token else self.length - 1  # the row the tower pools
        if self.pooled_row_only(layer):
            if self.pos is None:
                return slice(pooled, pooled + 1)
            kept = [p for p in as_group(self.pos) if p == pooled]
            return None if not kept else (kept if isinstance(self.pos, tuple) else kept[0])
        if self.pos is None:  # the whole sequence is the pair's own tokens (not a shorter text's padding)
            return slice(0, self.length)
        return list(self.pos) if isinstance(self.pos, tuple) else self.pos

    def activations(self, layer: int, sel) -> tuple[Tensor, Optional[Tensor]]:
        """(target's, source's) activation at `layer`, rows `sel` (a class-token tower caches its
        last block's hooks at the class token only: row 0 is the class token there)."""
        name = self.plan.kind.hook_name(layer, self.tower.cfg.n_layers)
        act_t = self.cache_t[name][self.pair][sel]
        act_s = self.cache_s[name][self.src_pair][sel] if self.cache_s is not None else None
        if act_s is not None and act_s.shape != act_t.shape:
            raise ValueError(f"pair {self.pair}: source and target differ in length, which a positional patch needs equal")
        return act_t, act_s

    def joint(self, layers: tuple, key: tuple) -> tuple[list[Intervention], list[tuple]]:
        """The interventions (one per unit) at `layers` together. A run equals the target's up to
        the first layer whose replacement changes something: it resumes there, and the later
        layers' replacements are made as the run reaches them (`resume.LaterEdit`)."""
        unit_keys = [key + (ui,) for ui in range(len(self.plan.units))] if self.plan.units is not None else [key]
        pending = set(unit_keys)  # units whose run still equals the target's
        items = []
        for j, layer in enumerate(layers):
            sel = self.selection(layer)
            if sel is None:
                continue
            new, unchanged = self.at_layer(layer, sel, key)
            for item in new:
                if len(layers) == 1 or item.key in pending:
                    unit = self.plan.units[item.key[-1]] if self.plan.units is not None else None
                    item.edits = [edit for later in layers[j + 1:] for edit in self.later_edit(later, unit)]
                    items.append(item)
            if len(layers) == 1:
                return items, unchanged
            pending &= set(unchanged)
            if not pending:
                break
        return items, [unit_key for unit_key in unit_keys if unit_key in pending]

    def at_layer(self, layer: int, sel, key: tuple) -> tuple[list[Intervention], list[tuple]]:
        """The interventions (one per unit) resuming at `layer`, replacing rows `sel`."""
        plan, tower, length = self.plan, self.tower, self.length
        act_t, act_s = self.activations(layer, sel)
        causal, suffix = tower.attends_causally, self.suffix
        items, noops = [], []
        for ui, make_rep in self.replacements(layer, sel, act_t, act_s):
            unit_key = key + ((ui,) if ui is not None else ())
            if make_rep is None:
                noops.append(unit_key)
                continue
            state = plan.kind.residual_recipe(tower, layer, make_rep, self.cache_t, self.pair, sel, suffix, length)
            items.append(Intervention(self.pair, unit_key, plan.kind.start_step(layer), state,
                                      (length - 1 - suffix) if causal else None))
        return items, noops

    def replacements(self, layer: int, sel, act_t: Tensor,
                     act_s: Optional[Tensor]) -> Iterator[tuple[Optional[int], Optional[RepFactory]]]:
        """`unit_replacements` of the activation at `layer`, rows `sel`; where the chunk decided the
        layer's no-ops at once (`changed_cells`), one replacement of the whole activation, made when
        its batch runs, or None where it changes nothing."""
        mean = self.means.get(layer)
        if layer not in self.changed:
            return unit_replacements(self.plan, act_t, act_s, mean)
        changes = _changes(self.changed[layer][self.pair], sel)
        return iter([(None, functools.partial(replacement, self.plan, act_t, act_s, mean) if changes else None)])

    def later_edit(self, layer: int, unit) -> list[tuple]:
        """[(hook name, rows of the run, edit)] of `unit` at a layer after the run's start; empty
        where no position of the entry reaches the embedding from that layer."""
        sel = self.selection(layer)
        if sel is None:
            return []
        act_t, act_s = self.activations(layer, sel)
        if self.pooled_row_only(layer):  # the resumed run computes the pooled row alone there
            rows = slice(0, 1) if isinstance(sel, slice) else ([0] if isinstance(sel, list) else 0)
        elif isinstance(sel, slice):  # the whole sequence: suffix is 0
            rows = sel
        else:
            rows = [p - self.suffix for p in sel] if isinstance(sel, list) else sel - self.suffix
        edit = later_replacement(self.plan, unit, act_t, act_s, self.means.get(layer))
        return [(self.plan.kind.hook_name(layer, self.tower.cfg.n_layers), rows, edit)]


def later_replacement(plan: Plan, unit, act_t: Tensor, act_s: Optional[Tensor],
                      mean: Optional[Tensor]) -> Callable[[Tensor], Tensor]:
    """live activation -> its replacement, for a layer a run reaches after it resumed (its live
    activation then differs from the target's cached `act_t`, which gives the shape only).
    `act_t` / `act_s` / live: [rows, (head,) d]."""
    if plan.sae is not None:
        with torch.no_grad():
            codes_rep = torch.zeros_like(plan.sae.encode(act_t)) if plan.intervention == "zero" else plan.sae.encode(act_s)
        return functools.partial(_latent_set_to, plan.sae, unit, codes_rep)
    rep = replacement(plan, act_t, act_s, mean)
    if unit is None:
        return functools.partial(_constant, rep)
    return functools.partial(_unit_set_to, plan, unit, plan.kind.unit(rep, unit))


def _constant(rep: Tensor, live: Tensor) -> Tensor:
    return rep


def _unit_set_to(plan: Plan, unit, value: Tensor, live: Tensor) -> Tensor:
    return plan.kind.with_unit(live, unit, value)


def _latent_set_to(sae, latent, codes_rep: Tensor, live: Tensor) -> Tensor:
    """`live` with latent(s) `latent` at their codes in `codes_rep` (the reconstruction error kept)."""
    with torch.no_grad():
        delta = codes_rep - sae.encode(live)
    return _with_latent(sae, live, delta, latent)


def run_exact(request: Request, result: PatchResult) -> None:
    """Exact interventions of every plan (hook kind), sharing the cached target and source runs;
    with several plans, each cell's key starts with the plan's index (the "hook" axis)."""
    tower, plans, n_pairs = request.tower, request.plans, request.n_pairs
    names_s = {plan.kind.hook_name(layer, tower.cfg.n_layers) for plan in plans for layer in plan.layers_named}
    names_t = cached_names(tower, plans, names_s)
    lengths = tower.sequence_lengths(request.target)
    means = [plan_means(plan, tower, _dataset(request), request.mean, request.pair_chunk)
             if request.intervention == "mean" else {} for plan in plans]
    prefixes = [(i,) if len(plans) > 1 else () for i in range(len(plans))]
    order = chunk_order(lengths)
    bar = tqdm(total=n_pairs, desc=f"patch {result.hook} ({request.intervention})", disable=not request.progress,
               unit="pair")
    for lo in range(0, n_pairs, request.pair_chunk):
        chunk = order[lo : lo + request.pair_chunk]  # the request's pairs cached together, as a list
        cache_t, cache_s, src_index = _cached_chunk(request, result, chunk, names_t, names_s)
        runs = [ChunkRuns.of(plan, tower, cache_t, cache_s, src_index, plan_mean) for plan, plan_mean in zip(plans, means)]
        items, noop_cells = [], []
        for p, pair in enumerate(chunk):
            for plan, plan_runs, prefix in zip(plans, runs, prefixes):
                new, noops = build_interventions(plan, tower, p, int(lengths[pair]), plan.positions_of(pair), plan_runs)
                for item in new:
                    item.key = prefix + item.key
                items += new
                noop_cells += [(pair, *prefix, *key) for key in noops]
        _write_baselines(noop_cells, result)
        run_items(request, items, cache_t, chunk, result.effects)
        bar.update(len(chunk))
    bar.close()


def chunk_order(lengths: Tensor) -> list[int]:
    """The order pairs are cached in, `pair_chunk` at a time: shortest target first (stably), so
    that a chunk of texts, trimmed to its own longest, carries little padding into its cached runs
    and its interventions' keys and values. Images, all of one length, keep their order."""
    return torch.argsort(lengths.cpu(), stable=True).tolist()


def _write_baselines(cells: list[tuple], result: PatchResult) -> None:
    """Cells whose intervention changes nothing take their pair's baseline: one indexed assignment
    for all of them (every key of a call has one length; a cell's first index is its pair)."""
    if not cells:
        return
    index = torch.tensor(cells, device="cpu")  # [cells, index dims]
    result.effects[tuple(index.T)] = result.baseline[index[:, 0]]


def _dataset(request: Request) -> Tensor:
    """The inputs a "mean" intervention averages over: the sources, or else the targets."""
    return request.source if request.source is not None else request.target


def _cached_chunk(request: Request, result: PatchResult, chunk: list[int], names_t: set[str],
                  names_s: set[str]) -> tuple[dict, Optional[dict], Optional[Tensor]]:
    """Cache the target (and source) runs of the pairs `chunk` (row i of each cache is pair
    chunk[i]) and record their baselines.
    Returns (target cache, source cache, source row of each pair or None for row = pair)."""
    tower, score = request.tower, request.score
    rows = torch.tensor(chunk, device=request.target.device)
    other = request.other[rows.to(request.other.device)]
    emb_t, cache_t = run_cached(tower, request.target[rows], names_t, embedding_only=True)
    with torch.no_grad():
        result.baseline[chunk] = score(emb_t, other).cpu()
    if request.intervention == "resample":
        drawn = request.resample_pairs[rows.to(request.resample_pairs.device)]
        _, cache_s = run_cached(tower, request.source[drawn.to(request.source.device)], names_s, embedding_only=True)
        return cache_t, cache_s, torch.arange(len(chunk), device=tower.device)
    if request.intervention == "patch":
        emb_s, cache_s = run_cached_after_shared_prefix(tower, request.source[rows.to(request.source.device)], names_s,
                                                        cache_t, request.target[rows])
        with torch.no_grad():
            result.source_baseline[chunk] = score(emb_s, other).cpu()
        return cache_t, cache_s, None
    return cache_t, None, None


def run_items(request: Request, items: list[Intervention], cache_t: dict, chunk: list[int], effects: Tensor) -> None:
    """Run interventions in batches sorted by start step: a causal tower's packed into one token
    matrix whatever their suffixes (`packed.resume_packed`), the others (and runs that edit a
    hook other than the residual stream, or any run while a hook is attached to the tower)
    grouped by (suffix start, suffix length). An item's `pair` is its row of the cached chunk,
    request pair chunk[pair]."""
    tower = request.tower
    packs = tower.attends_causally and not hooks_attached(*tower._hook_points())
    residual = residual_steps(tower)
    packed, grouped = [], []
    for item in items:
        (packed if packs and all(edit[0] in residual for edit in item.edits) else grouped).append(item)
    packed.sort(key=lambda it: (it.start, it.rows))  # similar suffix lengths together: less attention padding
    keys_values = heads_first(cache_t, tower.cfg.n_layers) if packed else []
    for b in range(0, len(packed), request.batch_size):
        _run_packed(request, packed[b : b + request.batch_size], cache_t, keys_values, chunk, effects)
    groups: dict[tuple[int, int], list[Intervention]] = {}
    for item in grouped:
        groups.setdefault((item.suffix, item.rows), []).append(item)
    for group in groups.values():
        group.sort(key=lambda it: it.start)
        for b in range(0, len(group), request.batch_size):
            _run_grouped(request, group[b : b + request.batch_size], cache_t, chunk, effects)


def _run_packed(request: Request, batch: list[Intervention], cache_t: dict, keys_values: list, chunk: list[int],
                effects: Tensor) -> None:
    """One batch of a causal tower's interventions, their suffix rows packed into one matrix;
    `keys_values` holds the chunk's cached keys and values, `packed.heads_first`."""
    tower = request.tower
    packing = Packing.of([it.pair for it in batch], [it.suffix for it in batch], [it.rows for it in batch],
                         tower.cfg.n_heads, tower.device)
    states = resumed_residuals(cache_t, [it.state for it in batch])  # [rows, d_model]
    edits = [LaterEdit(run, *edit) for run, it in enumerate(batch) for edit in it.edits]
    with torch.no_grad():
        emb = resume_packed(tower, states, [it.start for it in batch], packing, keys_values, edits)
        values = request.score(emb, _other(request, chunk, batch)).cpu()  # one copy per batch
    _write_cells(batch, chunk, values, effects)


def _other(request: Request, chunk: list[int], batch: list[Intervention]) -> Tensor:
    """The other modality's embeddings [N, d_embed] of a batch's runs (each its own pair's)."""
    return request.other[torch.tensor([chunk[it.pair] for it in batch], device=request.other.device)]


def _run_grouped(request: Request, batch: list[Intervention], cache_t: dict, chunk: list[int], effects: Tensor) -> None:
    """One batch of interventions with one suffix start and length, as [N, suffix length, d_model]."""
    tower, n_layers = request.tower, request.tower.cfg.n_layers
    causal, suffix = tower.attends_causally, batch[0].suffix
    pairs = torch.tensor([it.pair for it in batch], device=tower.device)
    kv = None
    if causal and suffix > 0:  # the unchanged prefix enters as cached keys and values, from the first block run
        first = batch[0].start // 2
        kv = [None] * first + [(cache_t[act_name("k", blk)][pairs, :suffix], cache_t[act_name("v", blk)][pairs, :suffix])
                               for blk in range(first, n_layers)]
    states = resumed_residuals(cache_t, [it.state for it in batch]).view(len(batch), batch[0].rows, -1)  # [N, suffix length, d_model]
    rows = torch.tensor([it.row for it in batch], device=tower.device) if causal else None
    edits = [LaterEdit(run, *edit) for run, it in enumerate(batch) for edit in it.edits]
    with torch.no_grad():
        emb = resume(tower, states, [it.start for it in batch], kv, rows, edits)
        values = request.score(emb, _other(request, chunk, batch)).cpu()  # one copy per batch
    _write_cells(batch, chunk, values, effects)


def _write_cells(batch: list[Intervention], chunk: list[int], values: Tensor, effects: Tensor) -> None:
    """Every key of a call has one length: write the batch's cells with one indexed assignment."""
    cells = torch.tensor([(chunk[it.pair], *it.key) for it in batch], device="cpu")  # [N, index dims]
    effects[tuple(cells.T)] = values


def plan_means(plan: Plan, tower: HookedTower, inputs: Tensor, mean: Optional[Tensor], pair_chunk: int) -> dict:
    """{layer: mean activation} over the dataset `inputs` (pairs, and positions up to each pair's
    length), or `mean` as given (one for all layers, or one per layer)."""
    n_layers = tower.cfg.n_layers
    if mean is not None:
        mean = torch.as_tensor(mean, device=tower.device, dtype=tower.dtype)
        site_ndim = plan.kind.site_ndim  # one position's activation: [head, d_head] or [d]
        per_layer = mean.ndim == site_ndim + 1  # decided by rank alone: a [head, d_head] mean is never read per layer
        if mean.ndim not in (site_ndim, site_ndim + 1) or (per_layer and mean.shape[0] != len(plan.layers)):
            raise ValueError(f"mean= has shape {tuple(mean.shape)}; {plan.hook} takes one position's activation "
                             f"({site_ndim} axes) or one per layer ([{len(plan.layers)}, ...])")
        if per_layer:  # no groups here (refused when the request was built)
            return {layer: mean[i] for i, layer in enumerate(plan.layers)}
        return {layer: mean for layer in plan.layers_named}
    names = {plan.kind.hook_name(layer, n_layers) for layer in plan.layers_named}
    lengths = tower.sequence_lengths(inputs)
    sums, count = {}, 0
    for lo in range(0, inputs.shape[0], pair_chunk):
        _, cache = run_cached(tower, inputs[lo : lo + pair_chunk], names)
        # a chunk of texts runs trimmed to its own longest text: count its own positions
        n_positions = next(iter(cache.values())).shape[1]
        valid = torch.arange(n_positions, device=tower.device)[None] < lengths[lo : lo + pair_chunk, None]  # [chunk, pos]
        for name, act in cache.items():  # summed in float32, whatever the model's dtype
            sums[name] = sums.get(name, 0) + act[valid].float().sum(0)
        count += int(valid.sum())
    return {layer: (sums[plan.kind.hook_name(layer, n_layers)] / count).to(tower.dtype) for layer in plan.layers_named}
