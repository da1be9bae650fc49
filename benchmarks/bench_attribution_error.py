"""Where attribution patching departs from exact patching: causal tracing on VALSE existence pairs
(random ViT-B-32, text tower, residual at layers 0..12 x every position), both ways.

    python benchmarks/bench_attribution_error.py [--pairs 16]

Prints, per layer, the largest and the mean absolute difference between the attribution estimate
and the exact change of S (over measured cells where the exact change is not zero), the
correlation of the two, and the same at the EOT position of the last layer, where the patched
residual feeds the final norm directly.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

import clip_lens
from clip_lens.data import load_valse, prepare_existence
from clip_lens.model import random_model_pair

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--valse", type=Path, default=SHARED / "valse" / "existence.json")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    _, model = random_model_pair("ViT-B-32", 0)
    pairs = prepare_existence(load_valse(args.valse), model.to_tokens).pairs.head(args.pairs)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    grid = dict(target=list(pairs["non_negated"]), source=list(pairs["negated"]), image=image, progress=False)
    exact = clip_lens.patch(model, **grid)
    approx = clip_lens.patch(model, method="attribution", **grid)
    d_exact, d_approx = exact.changes(), approx.changes()                      # [pair, layer, position]
    moved = exact.measured() & (d_exact != 0)
    print(f"{len(pairs)} pairs, random ViT-B-32; S changes by {float(d_exact[moved].abs().mean()):.3f} on average "
          "where a patch changes it")
    print("layer  max |approx - exact|  mean |approx - exact|  Pearson r")
    for layer in exact.layers:
        mask = moved[:, layer]
        a, e = d_approx[:, layer][mask], d_exact[:, layer][mask]
        r = float(np.corrcoef(a.numpy(), e.numpy())[0, 1]) if len(a) > 2 else float("nan")
        print(f"{layer:5d}  {float((a - e).abs().max()):20.4f}  {float((a - e).abs().mean()):21.4f}  {r:9.3f}")
    eot = exact.lengths - 1
    rows = torch.arange(len(pairs))
    e, a = d_exact[rows, -1, eot], d_approx[rows, -1, eot]
    print(f"last layer at EOT: exact change {float(e.abs().mean()):.3f} on average, estimate off by "
          f"{float((a - e).abs().mean()):.3f} on average (max {float((a - e).abs().max()):.3f}), "
          f"relative error {float(((a - e).abs() / e.abs()).mean()):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
