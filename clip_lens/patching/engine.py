"""`patch`: the front door of the engine. It checks the arguments into a `Request` and hands it to
the runner of its kind (exact, attribution or integrated gradients, hook functions)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from torch import Tensor

from clip_lens.model import HookedCLIP
from clip_lens.patching.attribution_patching import run_attribution
from clip_lens.patching.exact import run_exact
from clip_lens.patching.hook_functions import run_hook_functions
from clip_lens.patching.request import Metric, build_request
from clip_lens.patching.result import PatchResult


def patch(
    model: HookedCLIP,
    *,
    target: Any,
    source: Any = None,
    image: Any = None,
    text: Any = None,
    hook: Union[str, Sequence[str]] = "resid",
    layers: Union[str, int, Sequence] = "all",
    positions: Union[str, int, Sequence[int], Tensor] = "all",
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
    steps: int = 5,
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
        hook: "resid" (layers 0..L, docs/methods.md#layer-numbering), "attn_out", "mlp_out", "z"
            (per head), "mlp_post" (per MLP neuron), or "pattern" (with a hook-function
            intervention); or a list of kinds with the same layers (e.g. ["attn_out", "mlp_out"]),
            which share the cached runs: `effects` then has a "hook" axis after "pair".
        layers: "all", a layer, or a list. An entry may be a tuple of layers intervened on together
            in one run (a joint intervention, e.g. (4, 5, 6)); so may an entry of positions,
            heads, neurons or latents (docs/methods.md#joint-interventions-and-their-interaction).
            Joint interventions are exact (not with method="attribution" / "integrated_gradients");
            `interaction_table` sets them beside their members made one at a time.
        positions: "all" (each position separately), a list of positions (tuples intervened on
            together, e.g. [(3, 5), (3, 6)]), "sequence" (every position at once), or one row per
            pair: an integer array [n_pairs, k] of each pair's own positions, slot by slot (e.g. the
            token before and after each pair's differing word), -1 where a pair has none (its cell
            stays NaN); the "position" axis then counts the k slots (exact method only).
        heads: for hook="z": "all" or a list of heads (tuples together).
        neurons: for hook="mlp_post": "all" or a list of MLP neurons (tuples together).
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
            pass per chunk: baseline + (a_new - a_target) . grad; the estimates themselves are in
            `result.contributions`), or "integrated_gradients": the same with the gradient averaged
            over `steps` points on the straight line from each layer's activation to its
            replacement (all positions and units of the layer at once; docs/methods.md#integrated-gradients).
        steps: m, the points of method="integrated_gradients" (midpoints (k - 1/2) / m); m >= 1.
        batch_size: interventions per forward pass. pair_chunk: pairs cached at a time.

    Returns:
        PatchResult, `effects` shaped [pair, (hook), layer, (position), (head | neuron | latent)].
    """
    request = build_request(model, target=target, source=source, image=image, text=text, hook=hook, layers=layers,
                            positions=positions, heads=heads, neurons=neurons, sae=sae, latents=latents,
                            intervention=intervention, mean=mean, metric=metric, method=method,
                            batch_size=batch_size, pair_chunk=pair_chunk, seed=seed, progress=progress,
                            steps=steps)
    result = request.empty_result()
    if request.by_hook_function:
        run_hook_functions(request, result)
    elif request.method in ("attribution", "integrated_gradients"):
        run_attribution(request, result)
    else:
        run_exact(request, result)
    return result
