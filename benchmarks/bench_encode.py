"""Encoding images and texts: a tower's full forward pass against `pooled_embedding` (the last block
at the pooled row only), alternating in one run.

    python benchmarks/bench_encode.py                  # 256 noise images, 1,024 texts, random ViT-B-32
    python benchmarks/bench_encode.py --images 512 --rounds 5

Prints the best time of each way over the rounds, their ratio, the largest difference between the
embeddings, and the share of the forward pass's block work the last block's other rows were.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from clip_lens.model import random_model_pair
from clip_lens.scores import encode_images, encode_texts


def best(fn, rounds: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def forward_in_batches(tower, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([tower(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    _, model = random_model_pair("ViT-B-32", 0)
    pixels = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0)).clamp(-2.5, 2.5)
    words = ["red", "dog", "no", "there", "is", "a", "car", "on", "the", "table", "two", "people"]
    rng = torch.Generator().manual_seed(1)
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (int(n),), generator=rng))
             for n in torch.randint(4, 20, (args.texts,), generator=rng)]
    tokens = model.to_tokens(texts)
    for name, full_fn, fast_fn, rows in [
        ("images", lambda: forward_in_batches(model.vision, pixels, 32), lambda: encode_images(model, pixels, progress=False),
         model.vision.cfg.n_ctx),
        ("texts", lambda: forward_in_batches(model.text, tokens, 256), lambda: encode_texts(model, texts),
         float(model.text.sequence_lengths(tokens).float().mean())),
    ]:
        fast_fn()  # warm-up
        full_t, full = best(full_fn, args.rounds)
        fast_t, fast = best(fast_fn, args.rounds)
        n_layers = model.vision.cfg.n_layers if name == "images" else model.text.cfg.n_layers
        saved = (rows - 1) / rows / n_layers  # the last block's other rows, as a share of the blocks' rows
        print(f"{name}: forward {full_t:.2f} s, pooled_embedding {fast_t:.2f} s, ratio {full_t / fast_t:.3f}x "
              f"(block work saved at most {saved:.1%}); max |difference| {float((full - fast).abs().max()):.2e}")


if __name__ == "__main__":
    main()
