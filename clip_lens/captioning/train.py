"""Train and evaluate the prefix captioner of the tiny CLIP on synthetic shape scenes.

    clip-lens train-captioner --seed 0 --steps 3000 --out tiny-shapes-captioner.safetensors

The CLIP stays frozen: its image embeddings of `scenes` training scenes (zero to three shapes, plus
as many one-shape scenes) are computed once, and the captioner learns to say `shapes.describe` of
each. `evaluate` captions held-out one-shape scenes from a seed training does not use.
"""

from __future__ import annotations

import math
import random
import re
import time
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from clip_lens import zoo
from clip_lens.captioning.prefix import PrefixCaptioner, PrefixConfig
from clip_lens.captioning.vocabulary import WordVocabulary
from clip_lens.data import shapes
from clip_lens.zoo import TrainReport

EVAL_SEED = 10_000
_MENTION = re.compile(r"\b(" + "|".join(shapes.COLOURS) + r") (" + "|".join(shapes.SHAPES) + r")\b")


def vocabulary() -> WordVocabulary:
    """Every word `shapes.describe` can say, in a fixed order."""
    texts = ["There are no shapes.", "There is a, and."]
    texts += [f"{colour} {kind}" for colour in shapes.COLOURS for kind in shapes.SHAPES]
    return WordVocabulary.from_texts(texts)


def random_captioner(d_embed: int, seed: int = 0) -> PrefixCaptioner:
    """An untrained prefix captioner with the shapes vocabulary, for `d_embed`-dimensional image
    embeddings (runs end to end on any CLIP; its words carry no meaning)."""
    torch.manual_seed(seed)
    captioner = PrefixCaptioner(PrefixConfig(d_embed=d_embed, words=tuple(vocabulary().words))).eval()
    captioner.name = f"random prefix captioner (seed {seed})"
    return captioner


def mentions(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, in order."""
    return _MENTION.findall(caption.lower())


def scenes(n: int, seed: int) -> list[tuple[shapes.Scene, random.Random]]:
    """`n` training scenes: alternately a random scene (zero to three shapes) and a one-shape scene,
    each with the generator that renders it."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        local = random.Random(rng.randrange(2**31))
        out.append((shapes.one_shape_scene(local) if i % 2 else shapes.random_scene(local), local))
    return out


@torch.no_grad()
def embed_scenes(model, items: list[tuple[shapes.Scene, random.Random]], batch_size: int = 500,
                 progress: bool = False) -> torch.Tensor:
    """The CLIP's image embeddings [n, d_embed] of rendered scenes."""
    out = []
    for lo in tqdm(range(0, len(items), batch_size), desc="embedding scenes", disable=not progress):
        images = [shapes.render(scene, rng) for scene, rng in items[lo : lo + batch_size]]
        out.append(model.encode_image(model.to_pixels(images)).float().cpu())
    return torch.cat(out)




def train(model, steps: int = 3000, seed: int = 0, n_scenes: int = 20_000, batch_size: int = 256, lr: float = 1e-3,
          progress: bool = True, out: Optional[Union[str, Path]] = None) -> tuple[PrefixCaptioner, TrainReport]:
    """Train a prefix captioner on `model`'s image embeddings; deterministic for a given seed (and
    thread count). Saves it to `out` when given."""
    items = scenes(n_scenes, seed)
    captions = [shapes.describe(scene) for scene, _ in items]
    embeddings = embed_scenes(model, items, progress=progress)
    torch.manual_seed(seed)
    captioner = PrefixCaptioner(PrefixConfig(d_embed=model.vision.cfg.d_embed, words=tuple(vocabulary().words),
                                             clip=getattr(model, "name", None) or zoo.NAME)).train()
    optimizer = torch.optim.AdamW(captioner.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    order = torch.Generator().manual_seed(seed)
    start, loss_value = time.perf_counter(), float("nan")
    bar = tqdm(range(steps), desc="training captioner", disable=not progress)
    for _ in bar:
        batch = torch.randint(len(items), (batch_size,), generator=order)
        loss = captioner.loss(embeddings[batch], [captions[i] for i in batch.tolist()])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.4f}")
    captioner.eval()
    if out is not None:
        captioner.save(out)
    return captioner, TrainReport(steps, time.perf_counter() - start, loss_value)


def held_out_one_shape(n: int, seed: int = EVAL_SEED) -> list[tuple[shapes.Scene, random.Random]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        local = random.Random(rng.randrange(2**31))
        out.append((shapes.one_shape_scene(local), local))
    return out


@torch.no_grad()
def evaluate(captioner: PrefixCaptioner, model, n: int = 500, seed: int = EVAL_SEED, beams: int = 1) -> dict:
    """Captions of `n` held-out one-shape scenes: `accuracy`, the share whose caption names exactly
    the scene's shape with its colour and nothing else; `exact`, the share equal to
    `shapes.describe`; `colour` and `shape`, the shares naming the right colour / kind alone."""
    items = held_out_one_shape(n, seed)
    captions = captioner.caption(model.to_pixels([shapes.render(scene, rng) for scene, rng in items]), model, beams=beams)
    right = [(s.shapes[0].colour, s.shapes[0].kind) for s, _ in items]
    named = [mentions(c) for c in captions]
    return {"accuracy": sum(m == [r] for m, r in zip(named, right)) / n,
            "exact": sum(c == shapes.describe(s) for c, (s, _) in zip(captions, items)) / n,
            "colour": sum(len(m) == 1 and m[0][0] == r[0] for m, r in zip(named, right)) / n,
            "shape": sum(len(m) == 1 and m[0][1] == r[1] for m, r in zip(named, right)) / n,
            "scenes": n}
