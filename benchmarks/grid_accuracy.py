"""How far float32 recordings of the causal-tracing grid lie from the same grid in float64.

    python benchmarks/grid_accuracy.py before.pt after.pt     # engine_fingerprint.py recordings
    python benchmarks/grid_accuracy.py --truth truth64.pt before.pt after.pt   # keep the float64 grid

Two float32 runs of the engine that order their sums differently (other batch shapes, another
attention layout) differ by rounding; `engine_fingerprint.py compare` says by how much. This says
which of them lies nearer the exact answer: the grid of the benchmark (every kept VALSE existence
pair x 13 layers x every position, random ViT-B-32, seed 0) recomputed by clip_lens.patch with the
model in float64, the image embedding the float32 one cast up, so that both see the same inputs.
Prints, for each recording, the largest |float32 - float64| and how many cells lie more than 1e-6
from it. About twice the grid's float32 time (65 s here); `--truth FILE` saves the float64 grid, or reads
it if FILE exists.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

from clip_lens.report import write_atomically

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def float64_grid(valse: Path) -> torch.Tensor:
    """The benchmark's grid [pairs, 13, pos] computed with the model in float64."""
    import clip_lens
    from clip_lens.data import load_valse, prepare_existence
    from clip_lens.model import random_model_pair

    _, model = random_model_pair("ViT-B-32", 0)
    pairs = prepare_existence(load_valse(valse), model.to_tokens).pairs
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image_emb = model.encode_image(image)  # float32, as the recordings' runs computed it
    model64 = copy.deepcopy(model).to(torch.float64)
    t0 = time.perf_counter()
    grid = clip_lens.patch(model64, target=list(pairs["non_negated"]), source=list(pairs["negated"]),
                           image=image_emb.double(), progress=False)
    print(f"float64 grid: {time.perf_counter() - t0:.1f}s", flush=True)
    return grid.effects


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recordings", type=Path, nargs="+", help="engine_fingerprint.py recordings (their bench_grid)")
    parser.add_argument("--truth", type=Path, help="the float64 grid: read if it exists, else computed and saved here")
    parser.add_argument("--valse", type=Path, default=SHARED / "valse" / "existence.json")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    if args.truth is not None and args.truth.exists():
        truth = torch.load(args.truth, weights_only=True)
    else:
        truth = float64_grid(args.valse)
        if args.truth is not None:
            write_atomically(args.truth, lambda handle: torch.save(truth, handle), binary=True)
    for path in args.recordings:
        grid = torch.load(path, weights_only=True)["bench_grid"]
        if grid.shape != truth.shape or not torch.equal(grid.isnan(), truth.isnan()):
            print(f"{path}: its grid's shape or NaN cells differ from the float64 grid's")
            continue
        gap = (grid.double() - truth).nan_to_num().abs()
        print(f"{str(path):40s} max |float32 - float64| {float(gap.max()):.2e}, mean {float(gap.mean()):.2e}, "
              f"{int((gap > 1e-6).sum())} of {int((~truth.isnan()).sum())} cells more than 1e-6 away")
    return 0


if __name__ == "__main__":
    sys.exit(main())
