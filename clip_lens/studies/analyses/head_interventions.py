"""Head interventions with accuracy as the outcome (docs/methods.md#head-interventions).

Chosen text-tower heads (by name, or the top k by selectivity) are zero-, mean- or
resample-ablated, or their output scaled by a factor alpha, in the runs of both texts of every
minimal pair; the outcome is each pair's d = S(correct text) - S(other text) against the pair's
image, and the accuracy (the share of pairs with d > 0). The control is k random heads, drawn
with several seeds.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.data import MinimalPairs
from clip_lens.model import HookedCLIP
from clip_lens.patching import hook_name
from clip_lens.scores import score as clip_score
from clip_lens.towers import HookedTextTower

INTERVENTIONS = ("zero", "mean", "resample", "scale")
Head = tuple[int, int]  # (layer, head)


def parse_heads(heads: Sequence[Union[str, Head]], n_layers: int, n_heads: int) -> list[Head]:
    """Heads given as (layer, head) or "a{layer}.h{head}" (as in the circuits' graph), checked."""
    out = []
    for head in heads:
        if isinstance(head, str):
            match = re.fullmatch(r"a(\d+)\.h(\d+)", head.strip())
            if match is None:
                raise ValueError(f"head {head!r}: write a head as 'a<layer>.h<head>' (e.g. 'a4.h2') or (layer, head)")
            layer, index = int(match.group(1)), int(match.group(2))
        else:
            layer, index = (int(x) for x in head)
        if not (0 <= layer < n_layers and 0 <= index < n_heads):
            raise ValueError(f"head {head!r} is outside the tower ({n_layers} layers of {n_heads} heads)")
        out.append((layer, index))
    if not out:
        raise ValueError("heads is empty: give at least one head")
    return out


def random_heads(k: int, n_layers: int, n_heads: int, seed: int, exclude: Sequence[Head] = ()) -> list[Head]:
    """k distinct heads drawn uniformly (seeded), none of `exclude`."""
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in set(exclude)]
    if k > len(pool):
        raise ValueError(f"{k} random heads asked, {len(pool)} available")
    pick = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
    return [pool[i] for i in sorted(pick)]


def head_hooks(tower: HookedTextTower, heads: Sequence[Head], intervention: str, alpha: float = 0.0,
               means: Optional[dict] = None, seed: int = 0,
               draws: Optional[dict[int, Tensor]] = None) -> list[tuple[str, Callable]]:
    """Hooks on `blocks.{l}.attn.hook_z` that apply the intervention to the chosen heads.

    `means`: for "mean", {layer: [head, d_head]} (`head_means`); for "resample", {layer: [texts,
    pos, chosen heads of that layer, d_head]} (`head_pool`), from which each run draws a text:
    with a generator seeded by `seed` (each hook firing draws one pool text per text of its batch),
    or, when `draws` is given, the pool texts {layer: [batch]} of the one batch the hooks are for."""
    if intervention not in INTERVENTIONS:
        raise ValueError(f"intervention={intervention!r}: use one of {INTERVENTIONS}")
    generator = torch.Generator().manual_seed(seed)

    def hook_for(layer: int, chosen: list[int]) -> Callable:
        def hook(z: Tensor, hook) -> Tensor:  # z: [batch, pos, head, d_head]
            z = z.clone()
            if intervention == "zero":
                z[:, :, chosen] = 0.0
            elif intervention == "scale":
                z[:, :, chosen] = z[:, :, chosen] * alpha
            elif intervention == "mean":
                z[:, :, chosen] = means[layer][chosen].to(z.dtype)
            else:  # resample: each text takes the heads' values from a random text of the whole set (seeded)
                pool = means[layer]                                         # [texts, pos, chosen, d_head]
                if draws is None:
                    draw = torch.randint(len(pool), (z.shape[0],), generator=generator, device="cpu")
                else:
                    draw = draws[layer].cpu()
                    if len(draw) != z.shape[0]:
                        raise ValueError(f"draws of layer {layer}: {len(draw)} pool texts for a batch of {z.shape[0]}")
                z[:, :, chosen] = pool[draw, : z.shape[1]].to(device=z.device, dtype=z.dtype)
            return z
        return hook

    return [(hook_name("z", layer, tower.cfg.n_layers), hook_for(layer, chosen))
            for layer, chosen in heads_by_layer(heads).items()]


def heads_by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    """{layer: [head, ...]} in the order the heads are given."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return by_layer


def length_sorted_batches(tower: HookedTextTower, tokens: Tensor, batch_size: int) -> list[Tensor]:
    """Row indices of `tokens` [texts, pos] in batches of texts of similar length: the rows sorted
    by token length (stably) and cut into batches of `batch_size`, so that a batch trimmed to its
    longest text carries little padding. Index `tokens` with each batch; scatter results back."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: give an integer >= 1")
    lengths = tower.sequence_lengths(tokens).cpu()
    return list(torch.argsort(lengths, stable=True).split(batch_size))


def head_means(tower: HookedTextTower, tokens: Tensor, batch_size: int = 256) -> dict[int, Tensor]:
    """{layer: [head, d_head]}: each head's mean z over the texts' positions up to their EOT."""
    sums, count = {}, 0
    names = {hook_name("z", layer, tower.cfg.n_layers) for layer in range(tower.cfg.n_layers)}
    for rows in length_sorted_batches(tower, tokens, batch_size):
        batch = tower.trim(tokens[rows])
        with torch.no_grad():
            _, cache = tower.run_with_cache(batch, names_filter=lambda n: n in names)
        valid = (torch.arange(batch.shape[1], device=batch.device)[None] < tower.sequence_lengths(batch)[:, None])
        count += int(valid.sum())
        for layer in range(tower.cfg.n_layers):
            z = cache[hook_name("z", layer, tower.cfg.n_layers)].float()[valid]               # [tokens, head, d_head]
            sums[layer] = sums.get(layer, 0) + z.sum(0)
    return {layer: total / count for layer, total in sums.items()}


def head_pool(tower: HookedTextTower, tokens: Tensor, heads: Sequence[Head], batch_size: int = 256) -> dict[int, Tensor]:
    """{layer: [texts, pos, chosen heads, d_head]}: the chosen heads' values in every text's run,
    for resample ablation (on the CPU).

    The texts run in their given order, in batches of `batch_size`, not sorted by length: a longer
    text that draws a shorter one takes its values past the shorter one's EOT too, and those are
    the values at its padding in its batch (zeros past the batch's longest text)."""
    by_layer = heads_by_layer(heads)
    parts: dict[int, list[Tensor]] = {layer: [] for layer in by_layer}
    names = {hook_name("z", layer, tower.cfg.n_layers) for layer in by_layer}
    for lo in range(0, len(tokens), batch_size):
        with torch.no_grad():
            _, cache = tower.run_with_cache(tokens[lo : lo + batch_size], names_filter=lambda n: n in names)
        for layer, chosen in by_layer.items():
            z = cache[hook_name("z", layer, tower.cfg.n_layers)][:, :, chosen].cpu()
            parts[layer].append(torch.nn.functional.pad(z, (0, 0, 0, 0, 0, tokens.shape[1] - z.shape[1])))
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


def pair_tokens(tower: HookedTextTower, pairs: MinimalPairs) -> Tensor:
    """[2 * pairs, pos]: the tokens of every pair's text a, then of every pair's text b (untrimmed)."""
    return torch.cat([tower.to_tokens(list(pairs.pairs[side]), trim=False) for side in ("a", "b")])


def pair_frame(model: Union[HookedCLIP, HookedTextTower], pairs: MinimalPairs, text_emb: Float[Tensor, "two_n d"],
               image_emb: Float[Tensor, "n d"]) -> pd.DataFrame:
    """S of each pair's two texts (text_emb: side a's texts, then side b's) against its image,
    d = S(correct) - S(other), and whether the correct text wins. With a tower alone, S is the
    cosine similarity."""
    n = len(pairs.pairs)
    image = image_emb.to(text_emb.device)
    with torch.no_grad():
        if isinstance(model, HookedCLIP):
            values = [clip_score(model, text_emb[side * n : (side + 1) * n], image).cpu() for side in (0, 1)]
        else:
            values = [torch.nn.functional.cosine_similarity(text_emb[side * n : (side + 1) * n].float(), image.float(),
                                                            dim=-1).cpu() for side in (0, 1)]
    s_a, s_b = (v.numpy() for v in values)
    a_correct = (pairs.pairs["correct"] == "a").to_numpy()
    d = np.where(a_correct, s_a - s_b, s_b - s_a)
    return pd.DataFrame({"id": pairs.pairs["id"], "S_a": s_a, "S_b": s_b, "d": d, "correct": d > 0})


def pair_scores(model: Union[HookedCLIP, HookedTextTower], pairs: MinimalPairs, image_emb: Float[Tensor, "n d"],
                hooks: Sequence = (), batch_size: int = 256) -> pd.DataFrame:
    """S of each pair's two texts against its image under `hooks`, d = S(correct) - S(other), and
    whether the correct text wins. With a tower alone, S is the cosine similarity.

    The texts run in batches of similar length (`length_sorted_batches`); a hook that draws at
    random per batch (resample hooks of `head_hooks` without `draws`) sees them in that order."""
    tower = model.text if isinstance(model, HookedCLIP) else model
    tokens = pair_tokens(tower, pairs)
    embeddings = []
    batches = length_sorted_batches(tower, tokens, batch_size)
    for rows in batches:
        with torch.no_grad():
            embeddings.append(tower.run_with_hooks(tower.trim(tokens[rows]), fwd_hooks=list(hooks)))
    return pair_frame(model, pairs, scatter_rows(embeddings, batches), image_emb)


def scatter_rows(parts: Sequence[Tensor], batches: Sequence[Tensor]) -> Tensor:
    """The rows of `parts` (one [batch, ...] per batch of row indices) back in the original order."""
    order = torch.cat(list(batches)).to(parts[0].device)
    out = parts[0].new_empty((len(order), *parts[0].shape[1:]))
    out[order] = torch.cat(list(parts))
    return out


@dataclass
class Condition:
    """One condition of `intervention_study`: its kind ("none" / "chosen" / "random"), the heads
    intervened on, alpha (for "scale") and the random heads' seed (-1 for none and chosen)."""

    condition: str
    heads: list[Head]
    alpha: float
    seed: int

    def start_layer(self) -> int:
        """The first layer whose heads are intervened on: the runs share everything before it."""
        return min(layer for layer, _ in self.heads)


def conditions(chosen: list[Head], intervention: str, alphas: Sequence[float], random_seeds: Sequence[int],
               n_layers: int, n_heads: int) -> list[Condition]:
    """No intervention, then for each alpha ("scale"; else alpha 0) the chosen heads and as many
    random heads per seed."""
    out = [Condition("none", [], 1.0, -1)]
    for alpha in (alphas if intervention == "scale" else [0.0]):
        out.append(Condition("chosen", chosen, alpha, -1))
        for seed in random_seeds:
            out.append(Condition("random", random_heads(len(chosen), n_layers, n_heads, seed, chosen), alpha, seed))
    return out


def resample_draws(heads: Sequence[Head], n_pairs: int, seed: int, batch_size: int) -> dict[int, Tensor]:
    """{layer: [2 * n_pairs]}: the pool text each text (side a's, then side b's) takes its resampled
    head values from. These are the draws of `head_hooks`' generator (seeded with `seed`) when each
    side's texts run in their order in batches of `batch_size`, the hooks firing in layer order
    within a batch, so that a run in any other batching draws the same pool text for each text."""
    generator = torch.Generator().manual_seed(seed)
    layers = sorted(heads_by_layer(heads))
    parts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for _side in ("a", "b"):
        for lo in range(0, n_pairs, batch_size):
            for layer in layers:
                size = min(batch_size, n_pairs - lo)
                parts[layer].append(torch.randint(2 * n_pairs, (size,), generator=generator, device="cpu"))
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


def condition_values(tower: HookedTextTower, texts: Tensor, runs: list[Condition], intervention: str,
                     batch_size: int) -> list[Optional[dict]]:
    """Per condition, what its hooks replace the heads' values with (`head_hooks`' `means`): the
    heads' means for "mean", their values in every text's run for "resample" (one pass for the
    heads of all conditions), else None."""
    if intervention == "mean":
        means = head_means(tower, texts, batch_size)
        return [means for _ in runs]
    if intervention != "resample":
        return [None for _ in runs]
    every = sorted({head for run in runs for head in run.heads})
    pool, by_layer = head_pool(tower, texts, every, batch_size), heads_by_layer(every)
    return [{layer: pool[layer][:, :, [by_layer[layer].index(h) for h in chosen]]
             for layer, chosen in heads_by_layer(run.heads).items()} for run in runs]


def condition_embeddings(tower: HookedTextTower, texts: Tensor, runs: list[Condition], intervention: str,
                         batch_size: int) -> list[Tensor]:
    """Per condition, the text embeddings [texts, d_embed] (texts: side a's, then side b's).

    Batches of texts of similar length; in each, one clean run (condition "none") caches the
    residual at each condition's first intervened layer, and each condition runs from there. Runs
    with no hook in the last block compute it at the EOT row only
    (`HookedTower.pooled_embedding_with_hooks`)."""
    values = condition_values(tower, texts, runs, intervention, batch_size)
    draws = [resample_draws(run.heads, len(texts) // 2, max(run.seed, 0), batch_size)
             if intervention == "resample" and run.heads else None for run in runs]
    starts = {hook_name("resid", run.start_layer(), tower.cfg.n_layers) for run in runs if run.heads}
    batches = length_sorted_batches(tower, texts, batch_size)
    parts: list[list[Tensor]] = [[] for _ in runs]
    for rows in batches:
        tokens = tower.trim(texts[rows])
        with torch.no_grad():
            cache = {}
            keep = [(name, functools.partial(_keep, cache)) for name in starts]
            clean = tower.pooled_embedding_with_hooks(tokens, keep)
            for i, run in enumerate(runs):
                if not run.heads:
                    parts[i].append(clean)
                    continue
                batch_draws = None if draws[i] is None else {layer: d[rows] for layer, d in draws[i].items()}
                hooks = head_hooks(tower, run.heads, intervention, run.alpha, values[i], max(run.seed, 0), batch_draws)
                start = run.start_layer()
                residual = cache[hook_name("resid", start, tower.cfg.n_layers)]
                parts[i].append(tower.pooled_embedding_with_hooks(tokens, hooks, residual=residual,
                                                                  start_at_layer=start))
        del cache
    return [scatter_rows(chunks, batches) for chunks in parts]


def _keep(cache: dict, activation: Tensor, hook) -> None:
    """Hook function: the activation kept in `cache` under its hook's name."""
    cache[hook.name] = activation


def intervention_study(model: Union[HookedCLIP, HookedTextTower], pairs: MinimalPairs, image_emb: Tensor,
                       heads: Sequence[Union[str, Head]], *, intervention: str = "zero",
                       alphas: Sequence[float] = (0.0,), random_seeds: Sequence[int] = (0, 1, 2),
                       batch_size: int = 256) -> pd.DataFrame:
    """Accuracy and mean d with no intervention, with the chosen heads intervened on (for each
    alpha when `intervention="scale"`), and with as many random heads (one row per seed).

    Returns one row per condition: condition ("none" / "chosen" / "random"), heads, alpha, seed,
    accuracy, mean_d, pairs."""
    tower = model.text if isinstance(model, HookedCLIP) else model
    if intervention not in INTERVENTIONS:
        raise ValueError(f"intervention={intervention!r}: use one of {INTERVENTIONS}")
    chosen = parse_heads(heads, tower.cfg.n_layers, tower.cfg.n_heads)
    runs = conditions(chosen, intervention, alphas, random_seeds, tower.cfg.n_layers, tower.cfg.n_heads)
    texts = tower.trim(pair_tokens(tower, pairs))
    rows = []
    for run, emb in zip(runs, condition_embeddings(tower, texts, runs, intervention, batch_size)):
        scores = pair_frame(model, pairs, emb, image_emb)
        rows.append(dict(condition=run.condition, heads=" ".join(f"a{l}.h{h}" for l, h in run.heads), alpha=run.alpha,
                         seed=run.seed, accuracy=float(scores["correct"].mean()), mean_d=float(scores["d"].mean()),
                         pairs=len(scores)))
    return pd.DataFrame(rows)


def top_heads_by_attribution(model: HookedCLIP, pairs: MinimalPairs, image_emb: Tensor, k: int,
                             marked: Union[str, np.ndarray] = "b") -> list[Head]:
    """The k heads with the largest mean |attribution-patching estimate| of patching the unmarked
    text's head output (all positions) from the marked text's, S against the image
    (docs/methods.md#attribution-patching)."""
    from clip_lens.patching import patch
    from clip_lens.studies.analyses.minimal_pairs import orient

    if not isinstance(model, HookedCLIP):
        raise ValueError("heads by attribution need the CLIP model (S against the image), not a tower alone")
    marked_texts, unmarked = orient(pairs, marked)
    result = patch(model, target=unmarked, source=marked_texts, image=image_emb, hook="z", positions="sequence",
                   method="attribution", progress=False)
    importance = result.contributions.abs().mean(0)                      # [layer, head]
    order = importance.flatten().argsort(descending=True)[:k].tolist()
    n_heads = importance.shape[1]
    return [(i // n_heads, i % n_heads) for i in order]
