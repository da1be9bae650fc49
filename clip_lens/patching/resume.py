"""Cached runs of the target and source, and runs resumed from a cached half-layer.

Steps count half-layers (docs/methods.md#layer-numbering): step 2b is the residual before block b,
step 2b + 1 the residual between its attention and its MLP; the last step, 2L, is the residual
after the last block.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.components import hooks_attached
from clip_lens.hooks import act_name
from clip_lens.towers import HookedTower


def cached_names(tower: HookedTower, plans: Sequence, source_names: set[str]) -> set[str]:
    """Hooks a target run caches for the exact interventions of `plans`, and no more: the residuals
    the asked layers resume from (`HookKind.read_residuals`), the keys and values of a causal tower's
    blocks from the earliest one any run computes on (the unchanged prefix of a resumed run), and
    the hooks read from the source."""
    n_layers = tower.cfg.n_layers
    names = set(source_names)
    first_block = n_layers
    for plan in plans:
        for layer in plan.layers_named:
            names |= plan.kind.read_residuals(layer, n_layers)
            first_block = min(first_block, plan.kind.start_step(layer) // 2)
    if tower.attends_causally:
        names |= {act_name(kv, b) for b in range(first_block, n_layers) for kv in ("k", "v")}
    return names


def reaches_pooled_row_only(tower: HookedTower, name: str) -> bool:
    """Whether hook `name` reaches the embedding at the pooled row only: the hooks of the last block
    other than its input (and the residual after it), in a tower that pools one row (a class token,
    or a causal tower's EOT). An intervention at another row there changes nothing."""
    prefix = f"blocks.{tower.cfg.n_layers - 1}."
    pools_one_row = tower.pools_class_token or tower.attends_causally
    return pools_one_row and name.startswith(prefix) and name != act_name("resid_pre", tower.cfg.n_layers - 1)


def cached_at_class_token_only(tower: HookedTower, name: str) -> bool:
    """Whether `run_cached(embedding_only=True)` keeps hook `name` at the class token only ([batch, 1, ...]): the hooks
    of a class-token tower's last block other than its input. Their other positions never reach
    the embedding, so an intervention there changes nothing."""
    prefix = f"blocks.{tower.cfg.n_layers - 1}."
    return tower.pools_class_token and name.startswith(prefix) and name != act_name("resid_pre", tower.cfg.n_layers - 1)


def run_cached(tower: HookedTower, inputs: Tensor, names: set[str], *,
               embedding_only: bool = False) -> tuple[Tensor, dict]:
    """(embeddings [batch, d_embed], {name: activation}) of a run without gradients.

    With `embedding_only`, a class-token tower computes its last block at the class token only
    and caches that block's hooks as one row (`cached_at_class_token_only`): about 5/6 of the
    block's work, for runs whose other positions are never read (exact interventions)."""
    if embedding_only and tower.pools_class_token:
        return _run_cached_class_token(tower, inputs, names)
    with torch.no_grad():
        emb, cache = tower.run_with_cache(inputs, names_filter=lambda n: n in names)
    return emb, cache.cache_dict


def _run_cached_class_token(tower: HookedTower, inputs: Tensor, names: set[str]) -> tuple[Tensor, dict]:
    last = tower.cfg.n_layers - 1
    prefix = f"blocks.{last}."
    late = {n for n in names if cached_at_class_token_only(tower, n)}
    early = {n for n in names if not n.startswith(prefix)}
    store: dict[str, Tensor] = {}

    def save(act: Tensor, hook) -> None:
        store[hook.name] = act

    with torch.no_grad():
        resid, cache = tower.run_with_cache(inputs, stop_at_layer=last, names_filter=lambda n: n in early)
        store.update(cache.cache_dict)
        store[act_name("resid_pre", last)] = resid
        with tower.hooks(fwd_hooks=[(n, save) for n in late]):
            emb = tower.pool(last_block_at_class_token(tower, resid, [2 * last] * len(resid)))
    return emb, store


def run_cached_after_shared_prefix(tower: HookedTower, inputs: Tensor, names: set[str], target_cache: dict,
                                   target: Tensor) -> tuple[Tensor, dict]:
    """`run_cached(tower, inputs, names, embedding_only=True)` for sources that begin with their
    targets' tokens (`target` [batch, pos], row i the target of source i), whose runs are cached in
    `target_cache`. A causal tower computes a position from the earlier ones alone, so a source's
    activations before its first token that differs from its target's are the target's, copied;
    the positions from there on are computed, the target's cached keys and values standing in for
    the shared prefix. Same values to float rounding; on VALSE existence every source shares its
    first 3 tokens, a third of its positions.

    Falls back to `run_cached` where that does not hold or is not known to: a tower that is not
    causal, a hook attached to it, `names` other than the residual stream (`residual_steps`), or a
    target cache without every block's keys and values."""
    n_layers = tower.cfg.n_layers
    kv_names = [act_name(kv, b) for b in range(n_layers) for kv in ("k", "v")]
    if (not tower.attends_causally or hooks_attached(*tower._hook_points())
            or not set(names) <= residual_steps(tower).keys() or not all(n in target_cache for n in kv_names)):
        return run_cached(tower, inputs, names, embedding_only=True)
    tokens = tower.input_tokens(inputs)
    pooled = tower.pooled_positions(tokens)
    starts = _first_differences(tokens, tower.input_tokens(target), pooled)
    emb: Optional[Tensor] = None
    with torch.no_grad():
        embedded = tower.embed_tokens(tokens)  # [batch, pos, d_model]
        cache = {name: embedded.new_empty(embedded.shape) for name in names}
        for start in sorted(set(starts)):
            rows = torch.tensor([i for i, s in enumerate(starts) if s == start], device=tokens.device)
            x = embedded[rows, start:]  # indexing copies
            for b, block in enumerate(tower.blocks):
                _write_source_rows(cache, act_name("resid_pre", b), rows, start, x, target_cache)
                past = (target_cache[kv_names[2 * b]][rows, :start], target_cache[kv_names[2 * b + 1]][rows, :start])
                x = block(x, past)
            _write_source_rows(cache, act_name("resid_post", n_layers - 1), rows, start, x, target_cache)
            rows_emb = tower.pool_rows(x[torch.arange(len(rows), device=x.device), pooled[rows] - start])
            emb = rows_emb.new_empty(len(starts), rows_emb.shape[-1]) if emb is None else emb
            emb[rows] = rows_emb
    return emb, cache


def _first_differences(tokens: Tensor, target: Tensor, pooled: Tensor) -> list[int]:
    """Each source's first position whose token differs from its target's, at most its pooled
    position (a source equal to its target still computes the row it is pooled at)."""
    width = min(tokens.shape[1], target.shape[1])
    differs = tokens[:, :width] != target[:, :width]  # [batch, width]
    first = torch.where(differs.any(dim=-1), differs.int().argmax(dim=-1), width)
    return torch.minimum(first, pooled).tolist()


def _write_source_rows(cache: dict, name: str, rows: Tensor, start: int, suffix: Tensor, target_cache: dict) -> None:
    """Hook `name`'s activation of sources `rows` into `cache` [batch, pos, d_model] (if it is
    asked for): the target's cached positions before `start`, the computed `suffix`
    [rows, pos - start, d_model] from there on."""
    if name in cache:
        cache[name][rows, :start] = target_cache[name][rows, :start]
        cache[name][rows, start:] = suffix


@dataclass(frozen=True)
class LaterEdit:
    """A replacement one resumed run makes after its start: the part of a joint intervention
    (several layers at once) that lies beyond the layer the run resumes from.

    Attributes:
        run: the run's index within the batch of `resume`.
        hook: the hook name whose activation it replaces (a later layer of the same hook kind).
        index: the positions it replaces, counted within the run's computed rows (a causal run
            computes its suffix only; a class-token tower's last block its class token only).
        apply: the activation at those positions as the run computed it -> its replacement.
    """

    run: int
    hook: str
    index: Union[list, slice]
    apply: Callable[[Tensor], Tensor]


def resume(tower: HookedTower, states: Float[Tensor, "N S d_model"], starts: list[int],
           kv: Optional[list[tuple[Tensor, Tensor]]], rows: Optional[Tensor],
           edits: Sequence[LaterEdit] = ()) -> Float[Tensor, "N d_embed"]:
    """Embeddings of N runs resumed at half-layer steps, in one batch.

    Args:
        states: residual streams (suffix positions only, see `kv`) at each run's start step,
            sorted so that `starts` ascends. Updated in place.
        starts: each run's start step; a run joins the batch when the loop reaches it.
        kv: per block, cached (keys, values) [N, prefix, head, d_head] of the positions before
            the suffix (causal towers), or None when the suffix is the whole sequence.
        rows: [N], the pooled position within the suffix (text), or None (the tower pools itself).
        edits: replacements at layers after a run's start (joint interventions): residual-stream
            edits are written into the stream before the step that reads it, the others through
            hooks on the tower (removed on exit).
    """
    residual, hooked = _split_edits(tower, edits)
    if not hooked:
        return _resume(tower, states, starts, kv, rows, residual)
    with tower.hooks(fwd_hooks=[(name, functools.partial(_apply_edits, group)) for name, group in hooked.items()]):
        return _resume(tower, states, starts, kv, rows, residual)


def residual_steps(tower: HookedTower) -> dict[str, int]:
    """{hook name: half-layer step} of the hooks that hold the residual stream a resumed run reads:
    each block's input (step 2b) and the residual after the last block (step 2L). A later edit of
    one of these is written into the stream; an edit of any other hook goes through a hook."""
    n_layers = tower.cfg.n_layers
    steps = {act_name("resid_pre", b): 2 * b for b in range(n_layers)}
    steps[act_name("resid_post", n_layers - 1)] = 2 * n_layers
    return steps


def _split_edits(tower: HookedTower, edits: Sequence[LaterEdit]) -> tuple[dict, dict]:
    """({half-layer step: edits of the residual read at that step}, {hook name: edits through hooks}).
    The residual after the last block (step 2L) is edited after the loop."""
    steps = residual_steps(tower)
    residual: dict[int, list[LaterEdit]] = {}
    hooked: dict[str, list[LaterEdit]] = {}
    for edit in edits:
        if edit.hook in steps:
            residual.setdefault(steps[edit.hook], []).append(edit)
        else:
            hooked.setdefault(edit.hook, []).append(edit)
    return residual, hooked


def _apply_edits(edits: list[LaterEdit], act: Tensor, hook=None) -> Tensor:
    """Each edit written into its run's rows of `act` [active runs, positions, ...] (in place)."""
    for edit in edits:
        act[edit.run, edit.index] = edit.apply(act[edit.run, edit.index])
    return act


def _resume(tower: HookedTower, states: Tensor, starts: list[int], kv, rows: Optional[Tensor],
            residual: dict) -> Tensor:
    x = states
    n_steps = 2 * tower.cfg.n_layers
    # the last block matters at one row only: a class-token tower's class token, or a causal tower's
    # pooled row, which is each run's last computed row (its suffix ends at EOT)
    class_token_only = rows is None and tower.pools_class_token
    if rows is not None and not bool((rows == x.shape[1] - 1).all()):
        raise RuntimeError("resumed causal runs must end at their pooled row")  # run_items guarantees it
    for step in range(starts[0], n_steps - 2):
        active = bisect.bisect_right(starts, step)  # runs that have joined by this step
        block = tower.blocks[step // 2]
        _apply_edits(residual.get(step, ()), x)
        if step % 2 == 0:
            past = (kv[step // 2][0][:active], kv[step // 2][1][:active]) if kv is not None else None
            block.attn_half_(x[:active], past)
        else:
            block.mlp_half_(x[:active])
    _apply_edits(residual.get(n_steps - 2, ()), x)  # the last block's input, read by every key
    if class_token_only:
        x = last_block_at_class_token(tower, x, starts)
    elif rows is not None:
        x = last_block_at_last_row(tower, x, starts, kv[-1] if kv is not None else None)
    else:
        for step in range(max(starts[0], n_steps - 2), n_steps):  # a tower pooling every row (mean of patches)
            active = bisect.bisect_right(starts, step)
            if active:
                (tower.blocks[-1].attn_half_ if step % 2 == 0 else tower.blocks[-1].mlp_half_)(x[:active])
    _apply_edits(residual.get(n_steps, ()), x)
    if rows is None:
        return tower.pool(x)
    return tower.pool_rows(x[:, 0])


def last_block_at_last_row(tower: HookedTower, x: Float[Tensor, "N S d_model"], starts: list[int],
                           prefix_kv: Optional[tuple[Tensor, Tensor]]) -> Float[Tensor, "N 1 d_model"]:
    """The residual after a causal tower's last block at each run's last row (its pooled EOT), from
    residuals at the last block's input (or, per `starts`, at its middle): the other rows enter only
    as keys and values, after the cached ones of the positions before the suffix (`prefix_kv`)."""
    block, last = tower.blocks[-1], 2 * tower.cfg.n_layers - 2
    out = x[:, -1:].clone()
    active = bisect.bisect_right(starts, last)
    if active:
        keys, values = block.attn.keys_values(block.ln1(x[:active, :-1]))
        if prefix_kv is not None:
            keys = torch.cat([prefix_kv[0][:active], keys], dim=1)
            values = torch.cat([prefix_kv[1][:active], values], dim=1)
        out[:active] = block.attn_half(x[:active, -1:], (keys, values))
    active = bisect.bisect_right(starts, last + 1)
    if active:
        out[:active] = block.mlp_half(out[:active])
    return out


def last_block_at_class_token(tower: HookedTower, x: Float[Tensor, "N pos d_model"],
                              starts: list[int]) -> Float[Tensor, "N 1 d_model"]:
    """The residual after the last block at the class token (position 0) only, from residuals at
    the last block's input (or, per `starts`, at its middle)."""
    block, last = tower.blocks[-1], 2 * tower.cfg.n_layers - 2
    cls = x[:, :1].clone()
    active = bisect.bisect_right(starts, last)
    if active:  # non-causal attention: the order of the keys does not matter
        past = block.attn.keys_values(block.ln1(x[:active, 1:]))
        cls[:active] = block.attn_half(x[:active, :1], past)
    active = bisect.bisect_right(starts, last + 1)
    if active:
        cls[:active] = block.mlp_half(cls[:active])
    return cls
