"""Interventions that are hook functions: a user's `f(activation, hook)`, or value-only attention.

They may change anything, so none of the exact path's shortcuts apply: each layer (or group of
layers) runs the tower from its first intervened layer with the hook attached.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.patching.request import Request
from clip_lens.patching.result import PatchResult
from clip_lens.patching.resume import run_cached
from clip_lens.patching.sites import hook_name


def value_only_attention(pattern: Float[Tensor, "batch head query key"], hook=None) -> Tensor:
    """Hook for `attn.hook_pattern`: every position attends only to itself, so the block outputs
    out_proj(V) (docs/methods.md#attention-cancellation)."""
    eye = torch.eye(pattern.shape[-2], pattern.shape[-1], dtype=pattern.dtype, device=pattern.device)
    return eye.expand_as(pattern).clone()


def run_hook_functions(request: Request, result: PatchResult) -> None:
    """Each layer (or tuple of layers) of the grid runs with the hook attached, from its first layer."""
    plan, tower, n_layers = request.plan, request.tower, request.tower.cfg.n_layers
    hook_fn = value_only_attention if plan.intervention == "value_only" else plan.intervention
    groups = [layer if isinstance(layer, tuple) else (layer,) for layer in plan.layers]
    resid_names = {hook_name("resid", min(group), n_layers) for group in groups}
    bar = tqdm(total=request.n_pairs * len(groups), desc=f"patch {plan.hook} (hook)", disable=not request.progress)
    for lo in range(0, request.n_pairs, request.pair_chunk):
        chunk = request.target[lo : lo + request.pair_chunk]
        other = request.other[lo : lo + len(chunk)]
        emb, cache = run_cached(tower, chunk, resid_names)
        with torch.no_grad():
            result.baseline[lo : lo + len(chunk)] = request.score(emb, other).cpu()
        for li, group in enumerate(groups):
            start = min(group)
            hooks = [(plan.kind.hook_name(layer, n_layers), hook_fn) for layer in group]
            with torch.no_grad():
                if start == n_layers:
                    out = tower.run_with_hooks(chunk, fwd_hooks=hooks)
                else:
                    resid = cache[hook_name("resid", start, n_layers)]
                    out = tower.run_with_hooks(chunk, residual=resid, start_at_layer=start, fwd_hooks=hooks)
                result.effects[lo : lo + len(chunk), li] = request.score(out, other).cpu()
            bar.update(len(chunk))
    bar.close()
