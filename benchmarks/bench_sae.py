"""The activation store at research scale: write rate, read rate (shuffled sequential batches against
random access), training steps per second from the store, and memory (RSS), in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_sae.py                 # 10^6 vectors of width 768 (3 GB)
    OMP_NUM_THREADS=1 python benchmarks/bench_sae.py --vectors 100000

Synthetic vectors go through the writer (a model forward for 10^6 vectors is too slow on a CPU);
fill_store itself is timed on the tiny CLIP for a few thousand vectors. The store lies in a
temporary folder, deleted at the end. Reads come from the page cache when the store fits in memory
and from disk after the benchmark evicts them (posix_fadvise): both are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clip_lens.sae.store import ActivationStore, fill_store, write_vectors


def rss_mb(field: str = "VmRSS") -> float:
    """The process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux: /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def evict(folder: Path) -> None:
    """Drop the store's files from the page cache (posix_fadvise DONTNEED), so that reads come from disk."""
    for path in folder.glob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def synthetic_chunks(n: int, d: int, chunk: int = 8192):
    gen = torch.Generator().manual_seed(0)
    for start in range(0, n, chunk):
        yield torch.randn(min(chunk, n - start), d, generator=gen)


def bench_write(folder: Path, n: int, d: int, shard_size: int) -> None:
    reset_peak()
    start = time.perf_counter()
    write_vectors(synthetic_chunks(n, d), folder, shard_size=shard_size)
    seconds = time.perf_counter() - start
    print(f"write  : {n / seconds:,.0f} vectors/s ({n * d * 4 / seconds / 1e6:,.0f} MB/s), {seconds:.1f}s "
          f"(synthetic vectors, their generation included); peak RSS {rss_mb('VmHWM'):,.0f} MB")


def bench_sequential(store: ActivationStore, batch_size: int, buffer_shards: int) -> float:
    before = rss_mb()
    reset_peak()
    start, seen = time.perf_counter(), 0
    for batch in store.batches(batch_size, seed=0, buffer_shards=buffer_shards):
        seen += len(batch)
    seconds = time.perf_counter() - start
    assert seen == len(store)
    bound = (buffer_shards * int(store.counts.max()) + batch_size) * store.d * 4 / 2**20
    print(f"read, shuffled batches from sequential shard reads: {seen / seconds:,.0f} vectors/s "
          f"({seen * store.d * 4 / seconds / 1e6:,.0f} MB/s), one pass {seconds:.1f}s")
    print(f"         RSS before the pass {before:,.0f} MB, after {rss_mb():,.0f} MB, peak during it "
          f"{rss_mb('VmHWM'):,.0f} MB; buffer {buffer_shards} shards = {bound:,.0f} MB; "
          f"store {len(store) * store.d * 4 / 2**20:,.0f} MB")
    return seen / seconds


def bench_random(store: ActivationStore, batch_size: int, budget_s: float) -> float:
    before = rss_mb()
    reset_peak()
    gen = np.random.default_rng(0)
    start, seen = time.perf_counter(), 0
    while time.perf_counter() - start < budget_s and seen < len(store):
        seen += len(store.vectors(gen.integers(0, len(store), batch_size)))
    seconds = time.perf_counter() - start
    print(f"read, random access (random indices across shards, memory maps): {seen / seconds:,.0f} vectors/s "
          f"({seen:,} vectors in {seconds:.1f}s)")
    print(f"         RSS before {before:,.0f} MB, after {rss_mb():,.0f} MB (mapped file pages count in RSS; "
          "the page cache can drop them)")
    store.close()
    return seen / seconds


def bench_fill(folder: Path, images: int) -> None:
    import clip_lens
    from clip_lens import tiny

    model = clip_lens.HookedCLIP.from_pretrained(tiny.NAME)
    pixels = torch.randn(images, 3, *model.vision.cfg.image_size, generator=torch.Generator().manual_seed(0))
    n_ctx = model.vision.cfg.n_ctx
    start = time.perf_counter()
    fill_store(model, pixels, "vision.blocks.2.hook_resid_post", folder, positions="all", shard_size=16 * n_ctx,
               batch_size=32, progress=False)
    seconds = time.perf_counter() - start
    store = ActivationStore(folder)
    print(f"fill_store on the tiny CLIP (vision.blocks.2.hook_resid_post, every position): {len(store):,} vectors "
          f"of width {store.d} in {seconds:.1f}s = {len(store) / seconds:,.0f} vectors/s (forward passes included)")


def bench_training(store: ActivationStore, n_latents: int, k: int, batch_size: int, steps: int) -> None:
    """train_sae (TopK) from the store for `steps` steps: steps and vectors per second, the data
    statistics pass that precedes the first step timed apart."""
    from clip_lens.sae import training

    torch.manual_seed(0)
    start = time.perf_counter()
    training._mean_and_variance(store, torch.device("cpu"))  # the pass train_sae makes before its first step
    statistics_s = time.perf_counter() - start
    reset_peak()
    start = time.perf_counter()
    training.train_sae(store, n_latents=n_latents, k=k, steps=steps, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start - statistics_s
    print(f"training: {steps / seconds:.2f} steps/s = {steps * batch_size / seconds:,.0f} vectors/s (TopK, "
          f"{n_latents:,} latents, k={k}, batches of {batch_size} from the store, {steps} steps in {seconds:.1f}s, "
          f"after {statistics_s:.1f}s for the data's mean and variance over {min(len(store), training.STATISTICS_SAMPLE):,} "
          f"vectors); peak RSS {rss_mb('VmHWM'):,.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--shard-size", type=int, default=1 << 15)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--buffer-shards", type=int, default=4)
    parser.add_argument("--random-seconds", type=float, default=20.0, help="time spent on random access")
    parser.add_argument("--fill-images", type=int, default=64, help="tiny-CLIP images for fill_store (x 65 vectors)")
    parser.add_argument("--train-steps", type=int, default=20, help="TopK training steps timed")
    parser.add_argument("--train-latents", type=int, default=8192)
    parser.add_argument("--train-k", type=int, default=32)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_sae_"))
    try:
        print(f"store: {args.vectors:,} vectors x {args.d} float32 = {args.vectors * args.d * 4 / 1e9:.2f} GB, "
              f"shards of {args.shard_size:,} vectors ({args.shard_size * args.d * 4 / 2**20:.0f} MB), in {root}")
        bench_write(root / "synthetic", args.vectors, args.d, args.shard_size)
        store = ActivationStore(root / "synthetic")
        for cache in ("cold (evicted from the page cache)", "warm (in the page cache)"):
            print(f"-- reads, {cache}")
            if cache.startswith("cold"):
                evict(store.folder)
            sequential = bench_sequential(store, args.batch_size, args.buffer_shards)
            if cache.startswith("cold"):
                evict(store.folder)
            random_rate = bench_random(store, args.batch_size, args.random_seconds)
            print(f"sequential / random: {sequential / random_rate:.1f}x")
        bench_training(store, args.train_latents, args.train_k, args.batch_size, args.train_steps)
        bench_fill(root / "tiny", args.fill_images)
        print(f"peak RSS of the whole run (ru_maxrss): {__import__('resource').getrusage(0).ru_maxrss / 1024:,.0f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
