"""Attribution patching: every intervention of a grid estimated to first order from one forward
and one backward pass per chunk of pairs (docs/methods.md#attribution-patching):

    metric(intervened) - metric(clean) ~= (a_replacement - a) . d metric / d a   at the clean target.

Integrated gradients (method="integrated_gradients") average the gradient over m points of the
straight line from each layer's activation a to its replacement instead: m forward and backward
passes per layer and chunk, and the estimates of one layer add up to the exact effect of replacing
the whole layer as m grows (docs/methods.md#integrated-gradients).
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.patching.exact import plan_means, replacement
from clip_lens.patching.request import Plan, Request
from clip_lens.patching.result import PatchResult
from clip_lens.patching.resume import run_cached


def run_attribution(request: Request, result: PatchResult) -> None:
    """Fill `result.effects` (baseline + estimate) and `result.contributions` (the estimates)."""
    plan, tower = request.plan, request.tower
    names = [plan.kind.hook_name(layer, tower.cfg.n_layers) for layer in plan.layers]
    lengths = tower.sequence_lengths(request.target)
    dataset = request.source if request.source is not None else request.target
    means = plan_means(plan, tower, dataset, request.mean, request.pair_chunk) if request.intervention == "mean" else {}
    result.contributions = torch.full_like(result.effects, float("nan"))
    chunks = range(0, request.n_pairs, request.pair_chunk)
    for lo in tqdm(chunks, desc=f"{request.method} {plan.hook}", disable=not request.progress):
        hi = min(lo + request.pair_chunk, request.n_pairs)
        acts = _clean_run_with_gradients(request, result, lo, hi, names)
        cache_s = _source_cache(request, result, lo, hi, names)
        for li, (layer, name) in enumerate(zip(plan.layers, names)):
            act, grad = acts[name]
            act_s = cache_s[name] if cache_s is not None else None
            if request.method == "integrated_gradients":
                grad = _path_gradient(request, lo, hi, name, act, replacement(plan, act, act_s, means.get(layer)))
            contrib = first_order_contributions(plan, act, grad, cache_s[name] if cache_s is not None else None,
                                                means.get(layer))             # [batch, pos, (unit)]
            _write(result, plan, contrib, lengths[lo:hi], lo, li)


def _clean_run_with_gradients(request: Request, result: PatchResult, lo: int, hi: int,
                              names: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Run pairs lo..hi with gradients, record their baselines, and return {hook name: (activation,
    the metric's gradient with respect to it)}. The gradient is taken with respect to the hooked
    activations only: no parameter's gradient is computed, and none is left on the weights."""
    acts: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> Tensor:
        if not act.requires_grad:  # weights frozen by the user: the activation becomes where gradients start
            act = act.detach().requires_grad_(True)
        acts[hook.name] = act
        return act

    with torch.enable_grad():
        emb = request.tower.run_with_hooks(request.target[lo:hi], fwd_hooks=[(name, keep) for name in names])
        values = request.score(emb, request.other[lo:hi])
        grads = torch.autograd.grad(values.sum(), [acts[name] for name in names])
    result.baseline[lo:hi] = values.detach().cpu()
    return {name: (acts[name].detach(), grad) for name, grad in zip(names, grads)}


def _path_gradient(request: Request, lo: int, hi: int, name: str, act: Tensor, rep: Tensor) -> Tensor:
    """The metric's gradient at hook `name`, averaged over the midpoints (k - 1/2) / m of the line
    from `act` to `rep` (the hook's whole activation set to each point in turn)."""
    total = torch.zeros_like(act, dtype=torch.float32)
    for k in range(request.steps):
        alpha = (k + 0.5) / request.steps
        point = (act + alpha * (rep - act)).detach().requires_grad_(True)
        with torch.enable_grad():
            emb = request.tower.run_with_hooks(request.target[lo:hi], fwd_hooks=[(name, _returning(point))])
            (grad,) = torch.autograd.grad(request.score(emb, request.other[lo:hi]).sum(), point)
        total += grad.float()
    return total / request.steps


def _returning(value: Tensor):
    """A hook that replaces its activation by `value`."""
    return lambda act, hook: value


def _source_cache(request: Request, result: PatchResult, lo: int, hi: int, names: list[str]) -> Optional[dict]:
    """The source runs' activations for "patch" / "resample" (and the source baselines), else None."""
    if request.intervention not in ("patch", "resample"):
        return None
    if request.intervention == "resample":
        _, cache_s = run_cached(request.tower, request.source[request.resample_pairs[lo:hi]], set(names))
        return cache_s
    emb_s, cache_s = run_cached(request.tower, request.source[lo:hi], set(names))
    with torch.no_grad():
        result.source_baseline[lo:hi] = request.score(emb_s, request.other[lo:hi]).cpu()
    return cache_s


def _write(result: PatchResult, plan: Plan, contrib: Tensor, lengths: Tensor, lo: int, li: int) -> None:
    """Store one layer's contributions [batch, pos, (unit)] of pairs lo.. and baseline + them,
    summed over the pair's own positions ("sequence") or per position (NaN past its length)."""
    # results live on the CPU in float32 (`Request.empty_result`)
    contrib, lengths = contrib.float().cpu(), lengths.cpu()
    n = contrib.shape[0]
    unit_dims = [1] * (contrib.ndim - 2)
    baseline = result.baseline[lo : lo + n].view(-1, *unit_dims)                   # shape = [batch, (1)]
    valid = torch.arange(contrib.shape[1], device=contrib.device)[None] < lengths[:, None]  # [batch, pos]
    contrib = contrib * valid.view(n, -1, *unit_dims)                              # shape = [batch, pos, (unit)]
    if plan.positions is None:
        result.effects[lo : lo + n, li] = baseline + contrib.sum(1)
        result.contributions[lo : lo + n, li] = contrib.sum(1)
        return
    for pi, pos in enumerate(plan.positions):
        if pos < contrib.shape[1]:
            inside = (pos < lengths).view(-1, *unit_dims)
            result.effects[lo : lo + n, li, pi] = torch.where(inside, baseline + contrib[:, pos], torch.nan)
            result.contributions[lo : lo + n, li, pi] = torch.where(inside, contrib[:, pos], torch.nan)


def first_order_contributions(plan: Plan, act: Tensor, grad: Tensor, act_s: Optional[Tensor],
                              mean: Optional[Tensor]) -> Float[Tensor, "batch pos *unit"]:
    """(a_replacement - a) . d metric / d a, per position and unit.

    act, grad: [batch, pos, (head,) d]. Heads sum over d_head, neurons are single coordinates,
    SAE latents j give (c_rep_j - c_j) * (W_dec[j] . grad); without units, a sum over d.
    """
    if plan.sae is not None:
        with torch.no_grad():
            codes = plan.sae.encode(act)
            codes_rep = torch.zeros_like(codes) if plan.intervention == "zero" else plan.sae.encode(act_s)
            along = grad.float() @ plan.sae.W_dec.detach().float().T          # [batch, pos, n_latents]
        return ((codes_rep - codes) * along)[..., plan.units]
    contrib = (replacement(plan, act, act_s, mean).float() - act.float()) * grad.float()  # float32, as the metric
    if plan.kind.unit_axis == "neuron":
        return contrib[..., plan.units] if plan.units is not None else contrib.sum(-1)
    contrib = contrib.sum(-1)
    return contrib[..., plan.units] if plan.units is not None else contrib
