"""`clip_lens.patch`: one engine for activation patching, ablation and attribution patching.

An intervention replaces one activation of a *target* run (at a hook kind x layer x position x
head) and measures a metric of the target's embedding against the other modality, S by default.

How the engine keeps a grid of interventions cheap, exactly:
- The target and source runs are cached once per chunk of pairs; every intervention resumes from
  the target's cached residual stream at its own layer (half-layer for attn_out / z patches),
  never from the input.
- In the causal text tower, a change at position q cannot reach positions < q: the engine computes
  only positions q..EOT and takes the keys and values of the earlier positions from the cache.
- A replacement equal to the activation it replaces (e.g. a residual before the negator, where
  source and target agree) changes nothing: its result is the clean target's, with no forward pass.
- Interventions are batched: many resume in one forward pass, each joining at its start layer.
- The other modality's embedding is computed once.

Interventions that are arbitrary hook functions (a user hook, value-only attention) cannot use the
shortcuts above; they run the tower from the first intervened layer with the hook attached.
"""

from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.model import HookedCLIP
from clip_lens.towers import HookedTextTower, HookedVisionTower

HOOK_KINDS = ("resid", "attn_out", "mlp_out", "z", "mlp_post", "pattern")
# the axis of single components a hook kind is split into (hook="z": heads; "mlp_post": neurons;
# any residual-space hook with an SAE: latents)
UNIT_AXES = {"z": "head", "mlp_post": "neuron"}
SAE_HOOKS = ("resid", "attn_out", "mlp_out")
EXACT_INTERVENTIONS = ("patch", "zero", "mean", "resample")
LARGE_GRID = 50_000  # exact interventions per pair above which `patch` suggests attribution patching
Metric = Union[str, Callable[[Tensor, Tensor], Tensor]]


# ---------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------
@dataclass
class PatchResult:
    """What `patch` returns.

    Attributes:
        effects: the metric of each intervened target run, [pair, layer, (position), (head)]
            (+ [embed] with metric="embedding"); NaN where a position lies beyond a pair's last token.
        baseline: [pair] (+ [embed]), the metric of the clean target run.
        source_baseline: [pair], the metric of the clean source run (None without a source).
        dims: names of the axes of `effects`.
        hook: the hook kind ("attn_out+mlp_out" for several, along the "hook" axis).
        layers, positions, heads, neurons, latents: the labels along those axes (None: no such axis).
    """

    effects: Tensor
    baseline: Tensor
    source_baseline: Optional[Tensor]
    dims: tuple[str, ...]
    layers: list
    positions: Optional[list]
    heads: Optional[list]
    hook: str
    intervention: str
    method: str = "exact"
    extra: dict = field(default_factory=dict)
    neurons: Optional[list] = None
    latents: Optional[list] = None

    def to_frame(self) -> pd.DataFrame:
        """One row per pair x intervention (long format), NaN cells dropped.

        Columns: pair, layer, [position], [head | neuron | latent], metric, baseline,
        [source_baseline], hook, intervention, method.
        """
        if "embed" in self.dims:
            raise ValueError("effects are embeddings (metric='embedding'); score them, then tabulate")
        labels = {"pair": list(range(self.effects.shape[0])), "hook": self.hook.split("+"), "layer": self.layers,
                  "position": self.positions, "head": self.heads, "neuron": self.neurons, "latent": self.latents}
        axes = [labels[d] for d in self.dims]
        index = pd.MultiIndex.from_product(axes, names=list(self.dims))
        frame = pd.DataFrame({"metric": self.effects.detach().cpu().reshape(-1).numpy()}, index=index).reset_index()
        frame = frame.dropna(subset=["metric"])
        frame["baseline"] = self.baseline.detach().cpu().numpy()[frame["pair"].to_numpy()]
        if self.source_baseline is not None:
            frame["source_baseline"] = self.source_baseline.detach().cpu().numpy()[frame["pair"].to_numpy()]
        if "hook" not in self.dims:
            frame["hook"] = self.hook
        frame["intervention"], frame["method"] = self.intervention, self.method
        return frame.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# inputs and checks
# ---------------------------------------------------------------------------------------------
def _as_tower_input(model: HookedCLIP, value: Any, name: str):
    """(tower name, tensor) for texts/tokens or images/pixels."""
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and isinstance(value[0], str)):
        return "text", model.to_tokens(value)
    if isinstance(value, Tensor) and value.dtype in (torch.long, torch.int):
        return "text", model.text.trim(model.text.check_tokens(value))
    if isinstance(value, Tensor) and value.ndim == 4:
        return "vision", model.vision.check_pixels(value)
    if isinstance(value, (list, tuple)):
        return "vision", model.to_pixels(value)
    raise ValueError(f"{name}: expected texts, tokens [batch, pos], images or pixels [batch, 3, H, W]; got {type(value).__name__}")


def _other_embeddings(model: HookedCLIP, tower: str, other: Any, n: int) -> Tensor:
    """The other modality's embeddings [n, d_embed], computed once."""
    if other is None:
        raise ValueError(f"patching the {tower} tower needs the other modality: pass "
                         f"{'image=' if tower == 'text' else 'text='}pixels, inputs or embeddings")
    d_embed = model.text.cfg.d_embed
    if isinstance(other, Tensor) and other.ndim == 2 and other.is_floating_point() and other.shape[1] == d_embed:
        emb = other
    else:
        kind, value = _as_tower_input(model, other, "image" if tower == "text" else "text")
        if kind == tower:
            raise ValueError(f"the other modality of a {tower} patch cannot be {kind} input")
        with torch.no_grad():
            emb = model.encode_image(value) if kind == "vision" else model.encode_text(value)
    if emb.shape[0] == 1:
        emb = emb.expand(n, -1)
    if emb.shape[0] != n:
        raise ValueError(f"{emb.shape[0]} embeddings of the other modality for {n} pairs (give 1 or {n})")
    return emb.detach()


def _score(model: HookedCLIP, metric: Metric) -> Callable[[Tensor, Tensor], Tensor]:
    if metric == "embedding":
        return lambda emb, other: emb
    if metric == "score":
        # S(t, i) = logit_scale.exp() * cos(t, i)   (METHODS.md)
        return lambda emb, other: model.logit_scale.exp() * F.cosine_similarity(emb, other, dim=-1)
    if callable(metric):
        return metric
    raise ValueError(f"metric={metric!r}: use 'score', 'embedding' or a callable(embedding, other_embedding) -> [batch]")


def _check_list(values, valid: range, what: str) -> list:
    if isinstance(values, str) and values == "all":
        return list(valid)
    if isinstance(values, int):
        values = [values]
    out = []
    for v in values:
        if isinstance(v, (tuple, list, range)):
            out.append(tuple(_check_list(list(v), valid, what)))
            continue
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or int(v) not in valid:
            raise ValueError(f"{what} {v!r} is out of range ({valid.start}..{valid.stop - 1})")
        out.append(int(v))
    return out


@dataclass
class _Plan:
    tower_name: str
    hook: str
    layers: list
    positions: Optional[list]  # None: the whole sequence at once
    units: Optional[list]      # heads (z), neurons (mlp_post) or SAE latents; None: the whole activation
    intervention: Any
    sae: Any = None            # decomposes a residual-space activation into latents (see `patch`)


def _layer_range(tower, hook: str) -> range:
    n = tower.cfg.n_layers
    return range(n + 1) if hook == "resid" else range(n)


def _positions_for(positions, target: Tensor, tower) -> Optional[list]:
    if isinstance(positions, str) and positions == "sequence":
        return None
    max_len = target.shape[1] if target.dtype in (torch.long, torch.int) else tower.cfg.n_ctx
    return _check_list(positions, range(max_len), "position")


def _lengths(tower, target: Tensor) -> Tensor:
    """Tokens in each target sequence (up to and including EOT), or n_ctx for images."""
    if isinstance(tower, HookedTextTower):
        if tower.can_trim:
            return tower.pooled_positions(target) + 1
        return torch.full((target.shape[0],), target.shape[1])
    return torch.full((target.shape[0],), tower.cfg.n_ctx)


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
def hook_site(name: str, n_layers: int) -> tuple[str, int]:
    """(hook kind, layer) that `patch` uses for a tower's hook name, e.g.
    "blocks.11.hook_resid_post" -> ("resid", 12) in a 12-block tower (METHODS.md numbering: the
    residual after block b is layer b + 1), "blocks.3.mlp.hook_post" -> ("mlp_post", 3)."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit():
        block, leaf = int(parts[1]), ".".join(parts[2:])
        if 0 <= block < n_layers:
            kinds = {"hook_resid_pre": ("resid", block), "hook_resid_post": ("resid", block + 1),
                     "hook_attn_out": ("attn_out", block), "hook_mlp_out": ("mlp_out", block),
                     "attn.hook_z": ("z", block), "mlp.hook_post": ("mlp_post", block),
                     "attn.hook_pattern": ("pattern", block)}
            if leaf in kinds:
                return kinds[leaf]
    raise ValueError(f"{name!r} is not a hook `patch` intervenes on: use blocks.<b>.hook_resid_pre / hook_resid_post / "
                     f"hook_attn_out / hook_mlp_out / attn.hook_z / mlp.hook_post (b in 0..{n_layers - 1})")


def _hook_names(hook: str, layer: int, n_layers: int) -> str:
    if hook == "resid":
        return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"
    if hook in ("attn_out", "mlp_out"):
        return f"blocks.{layer}.hook_{hook}"
    if hook == "z":
        return f"blocks.{layer}.attn.hook_z"
    if hook == "mlp_post":
        return f"blocks.{layer}.mlp.hook_post"
    return f"blocks.{layer}.attn.hook_pattern"


def _class_token_pooled(tower) -> bool:
    """A non-causal tower whose embedding reads the class token only (position 0)."""
    return isinstance(tower, HookedVisionTower) and tower.cfg.pooling == "tok" and not tower.cfg.causal


def _run_cached_class_token(tower, inputs: Tensor, names: set[str]) -> tuple[Tensor, dict]:
    """`_run_cached` for a class-token-pooled tower, with its last block computed at the class token
    only (its other positions enter as keys and values and are never read again): the last block's
    hooks are cached as one row, [batch, 1, ...], except its `hook_resid_pre` (the whole input)."""
    last = tower.cfg.n_layers - 1
    prefix = f"blocks.{last}."
    early = {n for n in names if not n.startswith(prefix)}
    late = {n for n in names if n.startswith(prefix)} - {prefix + "hook_resid_pre"}
    store: dict[str, Tensor] = {}

    def save(act: Tensor, hook) -> None:
        store[hook.name] = act

    with torch.no_grad():
        resid, cache = tower.run_with_cache(inputs, stop_at_layer=last, names_filter=lambda n: n in early)
        store.update(cache.cache_dict)
        store[prefix + "hook_resid_pre"] = resid
        with tower.hooks(fwd_hooks=[(n, save) for n in late]):
            emb = tower.pool(_last_block_at_class_token(tower, resid, [2 * last] * len(resid)))
    return emb, store


def _run_cached(tower, inputs: Tensor, names: set[str]) -> tuple[Tensor, dict]:
    with torch.no_grad():
        emb, cache = tower.run_with_cache(inputs, names_filter=lambda n: n in names)
    return emb, cache.cache_dict


def _resume(tower, states: Tensor, starts: list[int], kv: Optional[list[tuple[Tensor, Tensor]]],
            rows: Optional[Tensor]) -> Tensor:
    """Embeddings of N interventions resumed at half-layer points.

    Args:
        states: [N, S, d_model], residual streams (suffix positions only, see `kv`) at each
            item's start point; sorted so that `starts` is ascending. Overwritten.
        starts: half-layer start points, 2b = resid_pre of block b, 2b + 1 = resid_mid of block b.
        kv: per block, cached (keys, values) [N, prefix, head, d_head] of the positions before the
            suffix, or None when the suffix is the whole sequence.
        rows: [N], the pooled position within the suffix (text), or None (vision pools itself).
    """
    x = states  # a buffer of the caller's: updated in place, half-block by half-block
    n_steps = 2 * tower.cfg.n_layers
    # A tower pooled at its class token needs only that row out of the last block (the other rows
    # enter it as keys and values): about 5/6 of the last block's work saved per intervention.
    class_token_only = rows is None and tower.cfg.pooling == "tok" and not tower.cfg.causal
    for step in range(starts[0], n_steps - 2 if class_token_only else n_steps):
        active = bisect.bisect_right(starts, step)
        block = tower.blocks[step // 2]
        if step % 2 == 0:
            past = (kv[step // 2][0][:active], kv[step // 2][1][:active]) if kv is not None else None
            block.attn_half_(x[:active], past)
        else:
            block.mlp_half_(x[:active])
    if class_token_only:
        return tower.pool(_last_block_at_class_token(tower, x, starts))
    if rows is None:
        return tower.pool(x)
    return tower.pool_rows(x[torch.arange(x.shape[0]), rows])


def _last_block_at_class_token(tower, x: Tensor, starts: list[int]) -> Float[Tensor, "batch 1 d_model"]:
    """The residual stream after the last block at the class token (position 0) only, from the
    residuals `x` [N, pos, d_model] at the last block's input (or later, per `starts`)."""
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


class _Intervention:
    """Where one exact intervention resumes and what it starts from, for one pair."""

    __slots__ = ("pair", "key", "start", "state", "suffix", "row")

    def __init__(self, pair, key, start, state, suffix, row):
        self.pair, self.key, self.start, self.state, self.suffix, self.row = pair, key, start, state, suffix, row


def _replacement(plan: _Plan, act_t: Tensor, act_s: Optional[Tensor], mean: Optional[Tensor]) -> Tensor:
    """The activation an exact intervention writes, shaped like `act_t`."""
    if plan.intervention == "zero":
        return torch.zeros_like(act_t)
    if plan.intervention == "mean":
        return mean.expand_as(act_t)
    return act_s


def _unit_replacements(plan: _Plan, act_t: Tensor, act_s: Optional[Tensor], mean: Optional[Tensor]):
    """(unit index, unit, activation with that unit replaced) for each unit of one activation.

    `act_t` / `act_s`: [..., (head,) d] at the intervened positions. Units that change nothing
    are yielded with `None` as the activation (their result is the clean run's).
    """
    if plan.units is None:
        rep = _replacement(plan, act_t, act_s, mean)
        yield None, None, (None if torch.equal(rep, act_t) else rep)
        return
    if plan.sae is not None:
        # latent j written as in the replacement run: a + (c_rep_j - c_j) W_dec[j]
        with torch.no_grad():
            codes_t = plan.sae.encode(act_t)
            codes_rep = torch.zeros_like(codes_t) if plan.intervention == "zero" else plan.sae.encode(act_s)
        delta = codes_rep - codes_t                                       # [..., n_latents]
        changed = set((delta != 0).reshape(-1, delta.shape[-1]).any(0).nonzero().flatten().tolist())
        for ui, latent in enumerate(plan.units):
            if latent not in changed:
                yield ui, latent, None
                continue
            yield ui, latent, act_t + delta[..., latent, None] * plan.sae.W_dec[latent].detach()
        return
    rep_full = _replacement(plan, act_t, act_s, mean)
    for ui, unit in enumerate(plan.units):
        unit_t = act_t[..., unit, :] if plan.hook == "z" else act_t[..., unit]
        unit_rep = rep_full[..., unit, :] if plan.hook == "z" else rep_full[..., unit]
        if torch.equal(unit_rep, unit_t):
            yield ui, unit, None
            continue
        rep = act_t.clone()
        if plan.hook == "z":
            rep[..., unit, :] = unit_rep
        else:
            rep[..., unit] = unit_rep
        yield ui, unit, rep


def _build_interventions(plan: _Plan, tower, pair: int, lengths: Tensor, cache_t: dict, cache_s: Optional[dict],
                         src_pair: int, means: dict, causal: bool) -> tuple[list, list]:
    """Interventions for one pair, and the (key, pair) of those that change nothing."""
    n_layers = tower.cfg.n_layers
    length = int(lengths[pair])
    eot = length - 1 if causal else None
    items, noops = [], []
    positions = plan.positions if plan.positions is not None else [None]
    for li, layer in enumerate(plan.layers):
        name = _hook_names(plan.hook, layer, n_layers)
        act_t_full = cache_t[name][pair]
        act_s_full = cache_s[name][src_pair] if cache_s is not None else None
        # the last block of a class-token tower is cached at the class token only (one row): its
        # other positions never reach the embedding, so changing them changes nothing
        class_token_row = act_t_full.shape[0] == 1 and length > 1 and not causal
        for pi, pos in enumerate(positions):
            if pos is not None and pos >= length:
                continue
            base_key = (li,) + ((pi,) if plan.positions is not None else ())
            if class_token_row and pos is not None and pos > 0:
                noops += [(base_key + ((ui,) if plan.units is not None else ()), pair)
                          for ui in (range(len(plan.units)) if plan.units is not None else [None])]
                continue
            # the whole sequence is the pair's own tokens (not the padding of a shorter text)
            sel = slice(0, 1 if class_token_row else length) if pos is None else pos
            act_t = act_t_full[sel]
            act_s = act_s_full[sel] if act_s_full is not None else None
            if act_s is not None and act_s.shape != act_t.shape:
                raise ValueError(f"pair {pair}: source and target differ in length, which a positional patch needs equal")
            for ui, _, rep in _unit_replacements(plan, act_t, act_s, means.get(layer)):
                key = base_key + ((ui,) if ui is not None else ())
                if rep is None:
                    noops.append((key, pair))
                    continue
                start, state = _resume_state(plan.hook, tower, layer, pair, sel, rep, cache_t)
                suffix = (pos if (causal and pos is not None) else 0)
                items.append(_Intervention(pair, key, start, state[suffix:length], suffix,
                                           (eot - suffix) if causal else None))
    return items, noops


def _resume_state(hook: str, tower, layer: int, pair: int, sel, rep: Tensor, cache: dict) -> tuple[int, Tensor]:
    """(half-layer start point, full residual stream [pos, d_model]) after one replacement.

    `rep` is the whole replaced activation at the positions `sel` ([..., head, d_head] for z,
    [..., d_mlp] for mlp_post, [..., d_model] otherwise)."""
    n_layers = tower.cfg.n_layers
    block = tower.blocks[min(layer, n_layers - 1)]
    if hook == "resid":
        if layer < n_layers:
            state = cache[f"blocks.{layer}.hook_resid_pre"][pair].clone()
        else:
            state = cache[f"blocks.{n_layers - 1}.hook_resid_post"][pair].clone()
        state[sel] = rep
        return 2 * layer, state
    if hook in ("mlp_out", "mlp_post"):
        mlp_out = rep
        if hook == "mlp_post":  # the MLP's output recomputed from the edited neurons
            with torch.no_grad():
                mlp_out = block.mlp.project_post(rep)
                if block.ls2 is not None:
                    mlp_out = mlp_out * block.ls2
        state = cache[f"blocks.{layer}.hook_resid_post"][pair].clone()
        state[sel] = cache[f"blocks.{layer}.hook_resid_mid"][pair][sel] + mlp_out
        return 2 * layer + 2, state
    if hook == "attn_out":
        attn_out = rep
    else:  # z: the attention output recomputed at the patched positions
        with torch.no_grad():
            attn_out = block.attn.project_z(rep)
            if block.ls1 is not None:
                attn_out = attn_out * block.ls1
    state = cache[f"blocks.{layer}.hook_resid_mid"][pair].clone()
    state[sel] = cache[f"blocks.{layer}.hook_resid_pre"][pair][sel] + attn_out
    return 2 * layer + 1, state


def _cache_names(hook: str, layers: list, n_layers: int, causal: bool) -> tuple[set, set]:
    """Hook names to cache for (target, source) runs of exact interventions."""
    target = {f"blocks.{n_layers - 1}.hook_resid_post"}
    for b in range(n_layers):
        target |= {f"blocks.{b}.hook_resid_pre", f"blocks.{b}.hook_resid_mid", f"blocks.{b}.hook_resid_post"}
        if causal:
            target |= {f"blocks.{b}.attn.hook_k", f"blocks.{b}.attn.hook_v"}
    source = {_hook_names(hook, layer, n_layers) for layer in layers}
    return target | source, source


def _exact(plans: list[_Plan], tower, target: Tensor, source: Optional[Tensor], other: Tensor, score,
           effects: Tensor, baseline: Tensor, source_baseline: Optional[Tensor], mean, batch_size: int,
           pair_chunk: int, perm: Optional[Tensor], progress: bool) -> None:
    """Exact interventions of one or more plans (hook kinds) sharing the cached target and source
    runs; with several plans, effect keys start with the plan's index (the "hook" axis)."""
    n_layers = tower.cfg.n_layers
    causal = tower.cfg.causal and isinstance(tower, HookedTextTower)
    intervention = plans[0].intervention
    names_t, names_s = set(), set()
    for plan in plans:
        t, s = _cache_names(plan.hook, plan.layers, n_layers, causal)
        names_t, names_s = names_t | t, names_s | s
    lengths = _lengths(tower, target)
    n_pairs = target.shape[0]
    label = "+".join(plan.hook for plan in plans)
    bar = tqdm(total=n_pairs, desc=f"patch {label} ({intervention})", disable=not progress, unit="pair")
    means = [_means(plan, tower, source if source is not None else target, mean, pair_chunk)
             if intervention == "mean" else {} for plan in plans]
    prefixes = [(i,) if len(plans) > 1 else () for i in range(len(plans))]
    run_cached = _run_cached_class_token if _class_token_pooled(tower) else _run_cached
    for lo in range(0, n_pairs, pair_chunk):
        hi = min(lo + pair_chunk, n_pairs)
        chunk_t = target[lo:hi]
        emb_t, cache_t = run_cached(tower, chunk_t, names_t)
        with torch.no_grad():
            baseline[lo:hi] = score(emb_t, other[lo:hi])
        cache_s, src_index = None, None
        if intervention in ("patch", "resample"):
            if intervention == "resample":
                src_index = perm[lo:hi]
                emb_s, cache_s = run_cached(tower, source[src_index], names_s)
                src_index = torch.arange(hi - lo)
            else:
                emb_s, cache_s = run_cached(tower, source[lo:hi], names_s)
                with torch.no_grad():
                    source_baseline[lo:hi] = score(emb_s, other[lo:hi])
        items = []
        for p in range(hi - lo):
            for plan, plan_means, prefix in zip(plans, means, prefixes):
                new, noops = _build_interventions(plan, tower, p, lengths[lo:hi], cache_t, cache_s,
                                                  p if src_index is None else int(src_index[p]), plan_means, causal)
                for item in new:
                    item.key = prefix + item.key
                items += new
                for key, pair in noops:
                    effects[(lo + pair, *prefix, *key)] = baseline[lo + pair]
        _run_items(tower, items, cache_t, other[lo:hi], score, effects, lo, batch_size, causal)
        bar.update(hi - lo)
    bar.close()


def _run_items(tower, items: list, cache_t: dict, other: Tensor, score, effects: Tensor, offset: int,
               batch_size: int, causal: bool) -> None:
    """Run interventions grouped by (suffix start, suffix length), in batches, sorted by start layer."""
    n_layers = tower.cfg.n_layers
    groups: dict[tuple[int, int], list] = {}
    for item in items:
        groups.setdefault((item.suffix, item.state.shape[0]), []).append(item)
    for (suffix, _), group in groups.items():
        group.sort(key=lambda it: it.start)
        for b in range(0, len(group), batch_size):
            batch = group[b : b + batch_size]
            pairs = torch.tensor([it.pair for it in batch])
            kv = None
            if causal and suffix > 0:
                kv = [(cache_t[f"blocks.{blk}.attn.hook_k"][pairs, :suffix], cache_t[f"blocks.{blk}.attn.hook_v"][pairs, :suffix])
                      for blk in range(n_layers)]
            states = torch.stack([it.state for it in batch])
            rows = torch.tensor([it.row for it in batch]) if causal else None
            with torch.no_grad():
                emb = _resume(tower, states, [it.start for it in batch], kv, rows)
                values = score(emb, other[pairs])
            for it, value in zip(batch, values):
                effects[(offset + it.pair, *it.key)] = value


def _means(plan: _Plan, tower, inputs: Tensor, mean, pair_chunk: int) -> dict:
    """Mean activation per layer over the dataset `inputs` (pairs and positions up to EOT), or as given."""
    n_layers = tower.cfg.n_layers
    if mean is not None:
        mean = torch.as_tensor(mean)
        return {layer: mean[i] if mean.ndim > 1 and mean.shape[0] == len(plan.layers) else mean
                for i, layer in enumerate(plan.layers)}
    names = {_hook_names(plan.hook, layer, n_layers) for layer in plan.layers}
    lengths = _lengths(tower, inputs)
    sums, count = {}, 0
    for lo in range(0, inputs.shape[0], pair_chunk):
        _, cache = _run_cached(tower, inputs[lo : lo + pair_chunk], names)
        valid = torch.arange(inputs.shape[1] if inputs.dtype in (torch.long, torch.int) else tower.cfg.n_ctx)[None] \
            < lengths[lo : lo + pair_chunk, None]
        for name, act in cache.items():
            sums[name] = sums.get(name, 0) + act[valid].sum(0)
        count += int(valid.sum())
    return {layer: sums[_hook_names(plan.hook, layer, n_layers)] / count for layer in plan.layers}


# ---------------------------------------------------------------------------------------------
# hook-function interventions (user hooks, value-only attention)
# ---------------------------------------------------------------------------------------------
def value_only_attention(pattern: Float[Tensor, "batch head query key"], hook=None) -> Tensor:
    """Hook for `attn.hook_pattern`: every position attends only to itself, so the block outputs
    out_proj(V) (METHODS.md, attention cancellation)."""
    eye = torch.eye(pattern.shape[-2], pattern.shape[-1], dtype=pattern.dtype, device=pattern.device)
    return eye.expand_as(pattern).clone()


def _general(plan: _Plan, tower, target: Tensor, other: Tensor, score, effects: Tensor, baseline: Tensor,
             pair_chunk: int, progress: bool) -> None:
    """Each layer (or tuple of layers) runs with the hook attached, from its first layer."""
    n_layers = tower.cfg.n_layers
    hook_fn = value_only_attention if plan.intervention == "value_only" else plan.intervention
    starts = sorted({min(l) if isinstance(l, tuple) else l for l in plan.layers})
    names = {f"blocks.{s}.hook_resid_pre" if s < n_layers else f"blocks.{n_layers - 1}.hook_resid_post" for s in starts}
    bar = tqdm(total=target.shape[0] * len(plan.layers), desc=f"patch {plan.hook} (hook)", disable=not progress)
    for lo in range(0, target.shape[0], pair_chunk):
        chunk = target[lo : lo + pair_chunk]
        emb, cache = _run_cached(tower, chunk, names)
        with torch.no_grad():
            baseline[lo : lo + len(chunk)] = score(emb, other[lo : lo + len(chunk)])
        for li, spec in enumerate(plan.layers):
            group = spec if isinstance(spec, tuple) else (spec,)
            start = min(group)
            hooks = [(_hook_names(plan.hook, layer, n_layers), hook_fn) for layer in group]
            resid = cache[_hook_names("resid", start, n_layers)]
            with torch.no_grad():
                if start == n_layers:
                    out = tower.run_with_hooks(chunk, fwd_hooks=hooks)
                else:
                    out = tower.run_with_hooks(chunk, residual=resid, start_at_layer=start, fwd_hooks=hooks)
                effects[lo : lo + len(chunk), li] = score(out, other[lo : lo + len(chunk)])
            bar.update(len(chunk))
    bar.close()


# ---------------------------------------------------------------------------------------------
# attribution patching
# ---------------------------------------------------------------------------------------------
def _attribution(plan: _Plan, tower, target: Tensor, source: Optional[Tensor], other: Tensor, score,
                 effects: Tensor, baseline: Tensor, source_baseline: Optional[Tensor], mean, pair_chunk: int,
                 perm, progress: bool) -> None:
    """effect ~= metric(target) + (a_replacement - a_target) . d metric / d a, at the clean target."""
    n_layers = tower.cfg.n_layers
    names = [_hook_names(plan.hook, layer, n_layers) for layer in plan.layers]
    lengths = _lengths(tower, target)
    means = _means(plan, tower, source if source is not None else target, mean, pair_chunk) if plan.intervention == "mean" else {}
    for lo in tqdm(range(0, target.shape[0], pair_chunk), desc=f"attribution {plan.hook}", disable=not progress):
        chunk = target[lo : lo + pair_chunk]
        n = chunk.shape[0]
        acts: dict[str, Tensor] = {}

        def keep(act, hook):
            act.retain_grad()
            acts[hook.name] = act
            return act

        with torch.enable_grad():
            emb = tower.run_with_hooks(chunk, fwd_hooks=[(name, keep) for name in names])
            values = score(emb, other[lo : lo + n])
            values.sum().backward()
        baseline[lo : lo + n] = values.detach()
        cache_s = None
        if plan.intervention in ("patch", "resample"):
            src = source[perm[lo : lo + n]] if plan.intervention == "resample" else source[lo : lo + n]
            emb_s, cache_s = _run_cached(tower, src, set(names))
            if plan.intervention == "patch":
                with torch.no_grad():
                    source_baseline[lo : lo + n] = score(emb_s, other[lo : lo + n])
        for li, (layer, name) in enumerate(zip(plan.layers, names)):
            act, grad = acts[name].detach(), acts[name].grad
            contrib = _first_order_effects(plan, act, grad, cache_s[name] if cache_s is not None else None,
                                           means.get(layer))        # [batch, pos, (unit)]
            valid = torch.arange(contrib.shape[1])[None] < lengths[lo : lo + n, None]
            contrib = contrib * valid.view(n, -1, *([1] * (contrib.ndim - 2)))
            if plan.positions is None:
                effects[lo : lo + n, li] = baseline[lo : lo + n].view(-1, *([1] * (contrib.ndim - 2))) + contrib.sum(1)
            else:
                for pi, pos in enumerate(plan.positions):
                    if pos < contrib.shape[1]:
                        value = baseline[lo : lo + n].view(-1, *([1] * (contrib.ndim - 2))) + contrib[:, pos]
                        keep_mask = (pos < lengths[lo : lo + n]).view(-1, *([1] * (contrib.ndim - 2)))
                        effects[lo : lo + n, li, pi] = torch.where(keep_mask, value, torch.nan)
        tower.zero_grad(set_to_none=True)


def _first_order_effects(plan: _Plan, act: Tensor, grad: Tensor, act_s: Optional[Tensor],
                         mean: Optional[Tensor]) -> Float[Tensor, "batch pos *unit"]:
    """(a_replacement - a) . d metric / d a, per position and unit.

    act, grad: [batch, pos, (head,) d]. Heads sum over d_head, neurons are single coordinates,
    SAE latents j give (c_rep_j - c_j) * (W_dec[j] . grad); without units, a sum over d.
    """
    if plan.sae is not None:
        with torch.no_grad():
            codes = plan.sae.encode(act)
            codes_rep = torch.zeros_like(codes) if plan.intervention == "zero" else plan.sae.encode(act_s)
            along = grad @ plan.sae.W_dec.detach().T                          # [batch, pos, n_latents]
        return ((codes_rep - codes) * along)[..., plan.units]
    contrib = (_replacement(plan, act, act_s, mean) - act) * grad
    if plan.hook == "mlp_post":
        return contrib[..., plan.units] if plan.units is not None else contrib.sum(-1)
    contrib = contrib.sum(-1)
    return contrib[..., plan.units] if plan.units is not None else contrib


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------
def patch(
    model: HookedCLIP,
    *,
    target: Any,
    source: Any = None,
    image: Any = None,
    text: Any = None,
    hook: Union[str, Sequence[str]] = "resid",
    layers: Union[str, int, Sequence] = "all",
    positions: Union[str, int, Sequence[int]] = "all",
    heads: Union[str, int, Sequence[int]] = "all",
    neurons: Union[str, int, Sequence[int]] = "all",
    sae: Any = None,
    latents: Union[str, int, Sequence[int]] = "all",
    intervention: Union[str, Callable] = "patch",
    mean: Optional[Tensor] = None,
    metric: Metric = "score",
    method: str = "exact",
    batch_size: int = 256,
    pair_chunk: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> PatchResult:
    """Intervene on the target runs over a grid of layers x positions (x units) and measure a metric.

    Args:
        model: a HookedCLIP.
        target: the runs intervened on: texts / tokens [n_pairs, pos] (text tower) or images /
            pixels [n_pairs, 3, H, W] (vision tower).
        source: the runs activations are taken from (same kind and, for positional patches, the
            same token lengths as `target`); for `intervention="patch"`, and the dataset for "mean"
            and "resample" (default: the targets).
        image / text: the other modality, as inputs or embeddings [1 or n_pairs, d_embed].
        hook: "resid" (layers 0..L, METHODS.md numbering), "attn_out", "mlp_out", "z" (per head),
            "mlp_post" (per MLP neuron), or "pattern" (with a hook-function intervention); or a list
            of kinds with the same
            layers (e.g. ["attn_out", "mlp_out"]), which share the cached runs: `effects` then has a
            "hook" axis after "pair".
        layers: "all", a layer, or a list; with hook-function interventions an entry may be a
            tuple of layers intervened together (e.g. (1, 2, 3)).
        positions: "all" (each position separately), a list of positions, or "sequence" (every
            position at once).
        heads: for hook="z": "all" or a list of heads.
        neurons: for hook="mlp_post": "all" or a list of MLP neurons.
        sae: split a resid / attn_out / mlp_out activation into sparse-autoencoder latents: any
            object with `encode(x [..., d]) -> codes [..., n_latents]` and `W_dec`
            [n_latents, d] (e.g. `clip_lens.sae.TopKSAE`). Intervening on latent j writes
            a + (c'_j - c_j) W_dec[j]: "zero" removes the latent's contribution, "patch" /
            "resample" take its code from the source; the SAE's reconstruction error stays.
            `effects` gains a "latent" axis; latents whose code does not change cost nothing.
        latents: with `sae`: "all" or a list of latents.
        intervention: "patch" (from source), "zero", "mean" (`mean` given, or the mean over the
            source runs), "resample" (from another pair, seeded), "value_only" (identity attention
            pattern; hook="pattern"), or a hook function `f(activation, hook) -> activation`.
        metric: "score" (S = logit_scale.exp() * cos with the other modality), "embedding" (keep
            the intervened runs' embeddings: `effects` gains a trailing d_embed axis, and the other
            modality is optional; score them against many texts or images afterwards), or a
            callable `(embedding [batch, d_embed], other [batch, d_embed]) -> [batch]`.
        method: "exact", or "attribution" for attribution patching (one forward and one backward
            pass per chunk: baseline + (a_new - a_target) . grad).
        batch_size: interventions per forward pass. pair_chunk: pairs cached at a time.

    Returns:
        PatchResult, `effects` shaped [pair, layer, (position), (head | neuron | latent)].
    """
    hooks = [hook] if isinstance(hook, str) else list(hook)
    for kind in hooks:
        if kind not in HOOK_KINDS:
            raise ValueError(f"Unknown hook kind {kind!r}; use one of {HOOK_KINDS}")
    if not hooks:
        raise ValueError("hook: give a hook kind or a list of them")
    hook = hooks[0]
    hook_intervention = callable(intervention) or intervention == "value_only"
    if not hook_intervention and intervention not in EXACT_INTERVENTIONS:
        raise ValueError(f"Unknown intervention {intervention!r}; use one of {EXACT_INTERVENTIONS}, 'value_only' or a hook function")
    if hook == "pattern" and not hook_intervention:
        raise ValueError("hook='pattern' takes a hook-function intervention (e.g. 'value_only')")
    if method not in ("exact", "attribution"):
        raise ValueError(f"Unknown method {method!r}; use 'exact' or 'attribution'")
    embedding_metric = isinstance(metric, str) and metric == "embedding"
    if method == "attribution" and embedding_metric:
        raise ValueError("attribution patching needs a scalar metric, not metric='embedding'")
    if len(hooks) > 1 and (hook_intervention or method == "attribution" or set(hooks) & set(UNIT_AXES) or sae is not None):
        raise ValueError("several hook kinds at once are for exact patch/zero/mean/resample interventions "
                         "on resid, attn_out or mlp_out")
    if method == "attribution" and hook_intervention:
        raise ValueError("attribution patching needs a patch, zero, mean or resample intervention")

    tower_name, target = _as_tower_input(model, target, "target")
    tower = model.text if tower_name == "text" else model.vision
    n_pairs = target.shape[0]
    if source is not None:
        source_kind, source = _as_tower_input(model, source, "source")
        if source_kind != tower_name:
            raise ValueError(f"source is {source_kind} input but target is {tower_name} input")
    if intervention in ("patch", "resample") and source is None:
        if intervention == "patch":
            raise ValueError("intervention='patch' needs a source")
        source = target
    if intervention == "patch" and source.shape[0] != n_pairs:
        raise ValueError(f"{source.shape[0]} sources for {n_pairs} targets")
    other_input = image if tower_name == "text" else text
    if embedding_metric and other_input is None:
        other = torch.zeros(n_pairs, 0)
    else:
        other = _other_embeddings(model, tower_name, other_input, n_pairs)
    score = _score(model, metric)

    layers_list = _check_list(layers, _layer_range(tower, hook), "layer")
    if any(_layer_range(tower, kind) != _layer_range(tower, hook) for kind in hooks):
        raise ValueError(f"hook kinds {hooks} have different layer ranges; patch them separately")
    if not hook_intervention and any(isinstance(l, tuple) for l in layers_list):
        raise ValueError("layer groups (tuples) are for hook-function interventions")
    pos_list = None if hook_intervention else _positions_for(positions, target, tower)
    unit_axis, unit_list = _units(tower, hook, hook_intervention, heads, neurons, sae, latents, intervention)
    if tower_name == "text" and source is not None and intervention == "patch":
        _check_equal_lengths(tower, source, target)
    plans = [_Plan(tower_name, kind, layers_list, pos_list, unit_list, intervention, sae) for kind in hooks]
    plan = plans[0]

    hook_axis = ["hook"] if len(hooks) > 1 else []
    dims = ["pair", *hook_axis, "layer"] + (["position"] if pos_list is not None else []) + ([unit_axis] if unit_axis else [])
    shape = [n_pairs, *([len(hooks)] if hook_axis else []), len(layers_list)] + ([len(pos_list)] if pos_list is not None else []) + ([len(unit_list)] if unit_axis else [])
    value_shape = [tower.cfg.d_embed] if embedding_metric else []
    dims += ["embed"] if embedding_metric else []
    per_pair = int(np.prod(shape[1:]))
    if method == "exact" and not hook_intervention and per_pair > LARGE_GRID:
        warnings.warn(f"{per_pair:,} exact interventions per pair (each a partial forward pass); method='attribution' "
                      "estimates them all from one forward and one backward pass", stacklevel=2)
    effects = torch.full(shape + value_shape, float("nan"))
    baseline = torch.full([n_pairs] + value_shape, float("nan"))
    source_baseline = torch.full([n_pairs] + value_shape, float("nan")) if intervention == "patch" else None
    perm = None
    if intervention == "resample":
        perm = torch.randperm(source.shape[0], generator=torch.Generator().manual_seed(seed))[:n_pairs]
        if tower_name == "text" and not torch.equal(_lengths(tower, source[perm]), _lengths(tower, target)):
            raise ValueError("intervention='resample' needs all texts to have the same token length")

    if hook_intervention:
        _general(plan, tower, target, other, score, effects, baseline, pair_chunk, progress)
    elif method == "attribution":
        _attribution(plan, tower, target, source, other, score, effects, baseline, source_baseline, mean,
                     pair_chunk, perm, progress)
    else:
        _exact(plans, tower, target, source, other, score, effects, baseline, source_baseline, mean,
               batch_size, pair_chunk, perm, progress)
    return PatchResult(effects=effects, baseline=baseline, source_baseline=source_baseline, dims=tuple(dims),
                       layers=layers_list, positions=pos_list, hook=hook if not hook_axis else "+".join(hooks),
                       heads=unit_list if unit_axis == "head" else None, neurons=unit_list if unit_axis == "neuron" else None,
                       latents=unit_list if unit_axis == "latent" else None,
                       intervention=intervention if isinstance(intervention, str) else getattr(intervention, "__name__", "hook"),
                       method=method, extra={"resample_pairs": perm} if perm is not None else {})


def _units(tower, hook: str, hook_intervention: bool, heads, neurons, sae, latents, intervention) -> tuple[Optional[str], Optional[list]]:
    """(axis name, labels) of the components one activation is split into, or (None, None)."""
    if sae is not None:
        if hook not in SAE_HOOKS or hook_intervention:
            raise ValueError(f"sae= splits a {'/'.join(SAE_HOOKS)} activation with a patch, zero or resample "
                             f"intervention; got hook={hook!r}, intervention={intervention!r}")
        if intervention == "mean":
            raise ValueError("sae= takes intervention 'zero', 'patch' or 'resample' (a mean latent code is not defined here)")
        if not (hasattr(sae, "encode") and hasattr(sae, "W_dec")):
            raise ValueError("sae= needs an object with encode(x) and W_dec [n_latents, d], e.g. clip_lens.sae.TopKSAE")
        n_latents, d_in = sae.W_dec.shape
        if d_in != tower.cfg.d_model:
            raise ValueError(f"the SAE reads {d_in}-dimensional activations but {hook} has d_model={tower.cfg.d_model}")
        labels = _check_list(latents, range(n_latents), "latent")
        return "latent", labels
    if hook_intervention or hook not in UNIT_AXES:
        return None, None  # a hook-function intervention sees every head at once: no head axis
    if hook == "z":
        return "head", _check_list(heads, range(tower.cfg.n_heads), "head")
    return "neuron", _check_list(neurons, range(tower.cfg.d_mlp), "neuron")


def _check_equal_lengths(tower, source: Tensor, target: Tensor) -> None:
    ls, lt = _lengths(tower, source), _lengths(tower, target)
    bad = (ls != lt).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"pair {i}: source has {int(ls[i])} tokens and target {int(lt[i])}; a positional patch needs "
            "equal token lengths"
        )
