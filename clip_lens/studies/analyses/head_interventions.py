"""Head interventions with accuracy as the outcome (docs/methods.md#head-interventions).

Chosen text-tower heads (by name, or the top k by selectivity) are zero-, mean- or
resample-ablated, or their output scaled by a factor alpha, in the runs of both texts of every
minimal pair; the outcome is each pair's d = S(correct text) - S(other text) against the pair's
image, and the accuracy (the share of pairs with d > 0). The control is k random heads, drawn
with several seeds.
"""

from __future__ import annotations

import re
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
               means: Optional[dict] = None, seed: int = 0) -> list[tuple[str, Callable]]:
    """Hooks on `blocks.{l}.attn.hook_z` that apply the intervention to the chosen heads.

    `means`: for "mean", {layer: [head, d_head]} (`head_means`); for "resample", {layer: [texts,
    pos, chosen heads of that layer, d_head]} (`head_pool`), from which each run draws a text."""
    if intervention not in INTERVENTIONS:
        raise ValueError(f"intervention={intervention!r}: use one of {INTERVENTIONS}")
    generator = torch.Generator().manual_seed(seed)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

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
                draw = torch.randint(len(pool), (z.shape[0],), generator=generator, device="cpu")
                z[:, :, chosen] = pool[draw, : z.shape[1]].to(device=z.device, dtype=z.dtype)
            return z
        return hook

    return [(hook_name("z", layer, tower.cfg.n_layers), hook_for(layer, chosen)) for layer, chosen in by_layer.items()]


def head_means(tower: HookedTextTower, tokens: Tensor, batch_size: int = 256) -> dict[int, Tensor]:
    """{layer: [head, d_head]}: each head's mean z over the texts' positions up to their EOT."""
    sums, count = {}, 0
    names = {hook_name("z", layer, tower.cfg.n_layers) for layer in range(tower.cfg.n_layers)}
    for lo in range(0, len(tokens), batch_size):
        batch = tower.trim(tokens[lo : lo + batch_size])
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
    for resample ablation (on the CPU)."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    parts: dict[int, list[Tensor]] = {layer: [] for layer in by_layer}
    names = {hook_name("z", layer, tower.cfg.n_layers) for layer in range(tower.cfg.n_layers)}
    for lo in range(0, len(tokens), batch_size):
        with torch.no_grad():
            _, cache = tower.run_with_cache(tokens[lo : lo + batch_size], names_filter=lambda n: n in names)
        for layer, chosen in by_layer.items():
            z = cache[hook_name("z", layer, tower.cfg.n_layers)][:, :, chosen].cpu()
            parts[layer].append(torch.nn.functional.pad(z, (0, 0, 0, 0, 0, tokens.shape[1] - z.shape[1])))
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


def pair_scores(model: Union[HookedCLIP, HookedTextTower], pairs: MinimalPairs, image_emb: Float[Tensor, "n d"],
                hooks: Sequence = (), batch_size: int = 256) -> pd.DataFrame:
    """S of each pair's two texts against its image under `hooks`, d = S(correct) - S(other), and
    whether the correct text wins. With a tower alone, S is the cosine similarity."""
    tower = model.text if isinstance(model, HookedCLIP) else model
    frame = pairs.pairs
    out = {}
    for side in ("a", "b"):
        tokens = tower.to_tokens(list(frame[side]), trim=False)
        values = []
        for lo in range(0, len(tokens), batch_size):
            with torch.no_grad():
                emb = tower.run_with_hooks(tokens[lo : lo + batch_size], fwd_hooks=list(hooks))
                other = image_emb[lo : lo + batch_size].to(emb.device)
                if isinstance(model, HookedCLIP):
                    values.append(clip_score(model, emb, other).cpu())
                else:
                    values.append(torch.nn.functional.cosine_similarity(emb.float(), other.float(), dim=-1).cpu())
        out[side] = torch.cat(values).numpy()
    a_correct = (frame["correct"] == "a").to_numpy()
    d = np.where(a_correct, out["a"] - out["b"], out["b"] - out["a"])
    return pd.DataFrame({"id": frame["id"], "S_a": out["a"], "S_b": out["b"], "d": d, "correct": d > 0})


def intervention_study(model: Union[HookedCLIP, HookedTextTower], pairs: MinimalPairs, image_emb: Tensor,
                       heads: Sequence[Union[str, Head]], *, intervention: str = "zero",
                       alphas: Sequence[float] = (0.0,), random_seeds: Sequence[int] = (0, 1, 2),
                       batch_size: int = 256) -> pd.DataFrame:
    """Accuracy and mean d with no intervention, with the chosen heads intervened on (for each
    alpha when `intervention="scale"`), and with as many random heads (one row per seed).

    Returns one row per condition: condition ("none" / "chosen" / "random"), heads, alpha, seed,
    accuracy, mean_d, pairs."""
    tower = model.text if isinstance(model, HookedCLIP) else model
    chosen = parse_heads(heads, tower.cfg.n_layers, tower.cfg.n_heads)
    means = None
    texts = torch.cat([tower.to_tokens(list(pairs.pairs[side]), trim=False) for side in ("a", "b")])
    if intervention == "mean":
        means = head_means(tower, texts)
    rows = []

    def measure(condition: str, which: list[Head], alpha: float, seed: int) -> None:
        pool = head_pool(tower, texts, which) if intervention == "resample" and which else means
        hooks = head_hooks(tower, which, intervention, alpha, pool, max(seed, 0)) if which else []
        scores = pair_scores(model, pairs, image_emb, hooks, batch_size)
        rows.append(dict(condition=condition, heads=" ".join(f"a{l}.h{h}" for l, h in which), alpha=alpha, seed=seed,
                         accuracy=float(scores["correct"].mean()), mean_d=float(scores["d"].mean()),
                         pairs=len(scores)))

    measure("none", [], 1.0, -1)
    for alpha in (alphas if intervention == "scale" else [0.0]):
        measure("chosen", chosen, alpha, -1)
        for seed in random_seeds:
            measure("random", random_heads(len(chosen), tower.cfg.n_layers, tower.cfg.n_heads, seed, chosen), alpha, seed)
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
