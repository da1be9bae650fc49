"""A tiny CLIP trained here on synthetic shape scenes (`clip_lens.data.shapes`), shipped with the
package as `clip_lens/tiny-shapes`: a model whose behaviour is real and whose ground truth we
control, for demos and tests on machines without pretrained CLIP weights.

    model = clip_lens.HookedCLIP.from_pretrained("clip_lens/tiny-shapes")
    clip-lens train-tiny --seed 0 --steps 3000 --out tiny-shapes.safetensors   # retrain

Training is contrastive (image <-> caption within the batch, foils as extra negatives) plus a
pairwise term that asks each image to prefer its caption over its foil.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clip_lens.data import shapes
from clip_lens.scores import pair_scores
from clip_lens.zoo import ARCHITECTURE, CONFIG, MODELS, NAME, WEIGHTS, TrainReport, register  # noqa: F401 (the shipped model's facts, re-exported)

TRAIN_KINDS = ("existence", "existence", "existence", "colour", "count")
EVAL_SEED = 10_000


def create_open_clip(seed: int = 0):
    """The untrained open_clip model, initialised from `seed`."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(register())




def _batch(model, batch: list[shapes.Example], transform, tokenizer):
    pixels = torch.stack([transform(shapes.image_of(ex)) for ex in batch])
    captions = tokenizer([ex.caption for ex in batch])
    foils = tokenizer([ex.foil for ex in batch])
    return pixels, captions, foils


def train(steps: int = 3000, seed: int = 0, batch_size: int = 128, lr: float = 1e-3, progress: bool = True,
          out: Optional[Union[str, Path]] = None) -> tuple[torch.nn.Module, TrainReport]:
    """Train the tiny CLIP from scratch; deterministic for a given seed (and thread count).

    Saves float16 weights as safetensors to `out` when given (what ships with the package).
    """
    import open_clip

    torch.manual_seed(seed)
    model = create_open_clip(seed).train()
    tokenizer = open_clip.get_tokenizer(register())
    transform = open_clip.image_transform(model.visual.image_size, is_train=False)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    stream = shapes.examples(steps * batch_size, seed=seed, kinds=TRAIN_KINDS)
    start, loss_value, agree = time.perf_counter(), float("nan"), 0.0
    bar = tqdm(range(steps), desc="training tiny-shapes", disable=not progress)
    for step in bar:
        batch = [next(stream) for _ in range(batch_size)]
        pixels, captions, foils = _batch(model, batch, transform, tokenizer)
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(torch.cat([captions, foils])), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * image @ text.T                                   # [B, 2B]: captions then foils
        target = torch.arange(len(batch))
        pair = torch.stack([logits[target, target], logits[target, target + len(batch)]], dim=1)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : len(batch)].T, target)) / 2 \
            + F.cross_entropy(pair, torch.zeros_like(target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        agree = 0.95 * agree + 0.05 * float((pair[:, 0] > pair[:, 1]).float().mean()) if step else float((pair[:, 0] > pair[:, 1]).float().mean())
        bar.set_postfix(loss=f"{loss_value:.3f}", caption_over_foil=f"{agree:.2f}")
    seconds = time.perf_counter() - start
    model.eval()
    if out is not None:
        save(model, out)
    return model, TrainReport(steps, seconds, loss_value)


def save(model: torch.nn.Module, path: Union[str, Path]) -> Path:
    """float16 safetensors of the open_clip state dict (a few MB)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def evaluate(model, n: int = 1000, seed: int = EVAL_SEED, batch_size: int = 250) -> dict:
    """Held-out existence accuracy (caption preferred over foil) of a HookedCLIP: overall and per
    negation placement, on scenes from a seed the training stream does not use."""
    data = list(shapes.examples(n, seed=seed))
    correct = {"caption": [], "foil": []}
    for i in range(0, n, batch_size):
        part = data[i:i + batch_size]
        with torch.no_grad():
            image_emb = model.encode_image(model.to_pixels([shapes.image_of(ex) for ex in part]))
        scores = pair_scores(model, [ex.caption for ex in part], [ex.foil for ex in part], image_emb)
        for ex, ok in zip(part, scores["correct"]):
            correct[ex.negation_in].append(bool(ok))
    everything = correct["caption"] + correct["foil"]
    return {"accuracy": sum(everything) / len(everything),
            "negation_in_caption": sum(correct["caption"]) / len(correct["caption"]),
            "negation_in_foil": sum(correct["foil"]) / len(correct["foil"]), "pairs": len(everything)}
