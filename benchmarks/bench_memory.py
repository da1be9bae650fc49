"""Peak memory of a vision-tower patching grid: it grows with `batch_size`, not with the grid.

    python benchmarks/bench_memory.py                          # ViT-B-16, 4 images, layers 10..12
    python benchmarks/bench_memory.py --layers all             # the whole grid (hours on 2 cores)

Runs `clip_lens.patch(hook="resid", positions="all")` on random images in a fresh process per
setting (peak RSS is per process), at the default `pair_chunk` and at `pair_chunk=1`, and prints
each run's peak RSS, its time and the largest difference between the two runs' effects. Before interventions
held recipes instead of residual streams, a chunk's streams were all built before any ran: about
197 x 197 x 768 x 4 bytes = 119 MB per image and layer for ViT-B-16.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one_run(model_name: str, n_images: int, layers, pair_chunk: int, out: str) -> None:
    import logging

    import torch

    import clip_lens

    try:
        from clip_lens.model import random_model_pair
    except ImportError:  # commits before random_model_pair moved to clip_lens.model
        from clip_lens.loading import random_model_pair

    logging.getLogger().setLevel(logging.ERROR)
    _, model = random_model_pair(model_name, 0)
    del _
    pixels = torch.randn(n_images, 3, *model.vision.cfg.image_size, generator=torch.Generator().manual_seed(0))
    text = model.encode_text(model.to_tokens(["a photo of a dog"])).detach()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    t0 = time.perf_counter()
    result = clip_lens.patch(model, target=pixels, source=pixels.flip(0), text=text, hook="resid", layers=layers,
                             positions="all", pair_chunk=pair_chunk, progress=False)
    seconds = time.perf_counter() - t0
    torch.save(result.effects, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"peak_gb": peak, "before_gb": before, "seconds": seconds,
                      "interventions": int((~result.effects.isnan()).sum())}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--layers", default="10,11,12", help="'all' or comma-separated layers (default 10,11,12)")
    parser.add_argument("--one", nargs=2, metavar=("PAIR_CHUNK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    layers = "all" if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    if args.one:
        one_run(args.model, args.images, layers, int(args.one[0]), args.one[1])
        return 0
    import tempfile

    import torch

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in (64, 1):
            out = f"{tmp}/effects_{chunk}.pt"
            line = subprocess.run([sys.executable, __file__, "--model", args.model, "--images", str(args.images),
                                   "--layers", args.layers, "--one", str(chunk), out],
                                  capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[chunk] = json.loads(line)
            runs[chunk]["effects"] = torch.load(out)
    a, b = runs[64]["effects"], runs[1]["effects"]
    diff = float((a - b).nan_to_num().abs().max())
    same = torch.equal(a.isnan(), b.isnan()) and diff <= 1e-5
    print(f"{args.model}, {args.images} images, hook='resid', positions='all', layers {args.layers}:")
    for chunk, run in runs.items():
        print(f"  pair_chunk={chunk:<3d} peak RSS {run['peak_gb']:.2f} GB (model and inputs: {run['before_gb']:.2f} GB), "
              f"{run['seconds']:.1f}s, {run['interventions']} measured cells")
    print(f"  effects at pair_chunk=64 and 1: max |difference| {diff:.1e} ({'equal' if same else 'DIFFERENT'})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
