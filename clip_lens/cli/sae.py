"""`clip-lens cache-activations`: one hook's activations over an image folder or a text file,
written as an activation store (clip_lens.sae.store)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clip_lens.cli.common import add_model_flags


def _positions(value: str):
    """--positions: pooled, all, or a number sampled per input."""
    if value in ("pooled", "all"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r} is not 'pooled', 'all' or a positive number of positions")


def _shard_range(value: str) -> range:
    """--shards A:B (shards A to B-1) or A (one shard)."""
    start, _, stop = value.partition(":")
    try:
        return range(int(start), int(stop) if stop else int(start) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a shard range A:B (e.g. 0:8)") from None


def cmd_cache_activations(args: argparse.Namespace) -> int:
    from clip_lens.cli.common import model_from_args
    from clip_lens.sae.store import ActivationStore, fill_store

    model, label = model_from_args(args)
    start = time.perf_counter()
    result = fill_store(model, args.images or args.texts, args.hook, args.out, positions=args.positions,
                        shard_size=args.shard_size, batch_size=args.batch_size, seed=args.seed,
                        dtype=args.store_dtype, progress=not args.quiet, shards=args.shards)
    seconds = time.perf_counter() - start
    print(f"{label}: wrote {len(result.written)} shards, kept {len(result.kept)} already written, in {seconds:.1f}s")
    if result.complete:
        print(ActivationStore(args.out))
    else:
        print(f"{args.out} is not complete yet: the other shard ranges remain to be filled")
    return 0


def register(sub) -> None:
    cache = sub.add_parser("cache-activations",
                           help="store one hook's activations over images or texts as shards on disk (resumes)")
    source = cache.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, default=None, help="image folder (every image file, sorted by name)")
    source.add_argument("--texts", type=Path, default=None, help="text file, one sentence per line")
    cache.add_argument("--hook", required=True,
                       help="hook name with its tower prefix, e.g. vision.blocks.11.hook_resid_post")
    cache.add_argument("--positions", type=_positions, default="pooled",
                       help="pooled (class token / EOT), all (texts: up to EOT), or a number sampled per input")
    cache.add_argument("--shard-size", type=int, default=None,
                       help="vectors per shard, a multiple of the vectors per input (default about 65536)")
    cache.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass")
    cache.add_argument("--seed", type=int, default=0, help="seed of the sampled positions")
    cache.add_argument("--store-dtype", choices=["float32", "float16"], default="float32", help="dtype on disk")
    cache.add_argument("--shards", type=_shard_range, default=None,
                       help="fill only shards A:B (several processes, one range each, fill one store)")
    cache.add_argument("--out", type=Path, required=True, help="the store's folder (a rerun resumes it)")
    cache.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_flags(cache)
    cache.set_defaults(func=cmd_cache_activations)
