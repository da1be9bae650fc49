"""EAP over every edge of the ViT-B-32 text tower for all VALSE existence pairs, against exact
edge patching, in one run (random weights moved off their initial values; a random image each).

    python benchmarks/bench_circuits.py                  # all 490 pairs; exact patching of every edge on 2 pairs
    python benchmarks/bench_circuits.py --exact-pairs 1  # quicker
    python benchmarks/bench_circuits.py --agreement 16   # also: EAP and EAP-IG against exact on the top 200 edges

Prints:
- EAP's time over all pairs and its peak memory (RSS);
- exact edge patching of every edge on a few pairs, its time, the projected time for all pairs,
  and the ratio to EAP;
- EAP-IG's time for m = 1, 2, 4, 8 on a few pairs (it should grow linearly with m);
- with --agreement N: on N pairs, the rank correlation (Spearman) and mean |error| of EAP and of
  EAP-IG (inputs and activations paths) against exact edge patching, on the top 200 edges of each
  method's own ranking and on their union.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from clip_lens import circuits as C
from clip_lens.data import load_valse, prepare_existence
from clip_lens.model import random_model_pair

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_task(n: int, seed: int, device: str = "cpu"):
    logging.getLogger().setLevel(logging.ERROR)
    _, model = random_model_pair("ViT-B-32", seed)
    model = model.to(device)
    pairs = prepare_existence(load_valse(SHARED / "valse" / "existence.json"), model.to_tokens).pairs
    pairs = pairs.head(n) if n else pairs
    images = torch.randn(len(pairs), 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        image_emb = torch.cat([model.encode_image(chunk.to(device)) for chunk in images.split(64)])
    task = C.make_task(model, clean=list(pairs["negated"]), corrupt=list(pairs["non_negated"]), image=image_emb)
    return model, task


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def agreement(task, n_pairs: int, steps: int) -> pd.DataFrame:
    """EAP and EAP-IG against exact edge patching on the top 200 edges of each, and on their union."""
    sub = task.rows(0, n_pairs)
    methods = {"EAP": C.edge_attribution(sub, method="eap", progress=False),
               f"EAP-IG inputs m={steps}": C.edge_attribution(sub, method="eap-ig", steps=steps, progress=False),
               f"EAP-IG activations m={steps}": C.edge_attribution(sub, method="eap-ig", steps=steps,
                                                                   path="activations", progress=False)}
    tops = {name: scores.top(200) for name, scores in methods.items()}
    union = sorted({edge for top in tops.values() for edge in top})
    t0 = time.perf_counter()
    exact = C.path_patch(sub, union, progress=False).effects.mean(0).numpy()
    print(f"  exact edge patching of {len(union)} edges on {n_pairs} pairs: {time.perf_counter() - t0:.1f}s")
    by_edge = dict(zip(union, exact))
    rows = []
    for name, scores in methods.items():
        for label, edges in (("own top 200", tops[name]), (f"union ({len(union)})", union)):
            truth = np.array([by_edge[e] for e in edges])
            estimate = np.array([float(scores.scores[e]) for e in edges])
            rows.append({"method": name, "edges": label, "spearman": spearman(truth, estimate),
                         "mean_abs_error": float(np.abs(estimate - truth).mean()),
                         "relative_error": float(np.abs(estimate - truth).sum() / np.abs(truth).sum())})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=0, help="VALSE existence pairs for EAP (default: all)")
    parser.add_argument("--exact-pairs", type=int, default=2, help="pairs for exact patching of every edge")
    parser.add_argument("--ig-pairs", type=int, default=16, help="pairs for the EAP-IG timings")
    parser.add_argument("--agreement", type=int, default=0, help="pairs for the agreement table (0: skip)")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG's m in the agreement table")
    parser.add_argument("--batch-size", type=int, default=512, help="exact runs per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    _, task = build_task(args.pairs, args.seed, args.device)
    graph = C.Graph.of(task.tower)
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"ViT-B-32 text tower (random weights), {graph.describe()}; {task.n_pairs} VALSE existence pairs; "
          f"{where}; before the runs: peak RSS {peak_gb():.2f} GB")

    t0 = time.perf_counter()
    C.edge_attribution(task, method="eap", progress=False)
    synchronize()
    eap_seconds = time.perf_counter() - t0
    print(f"EAP, every edge, all {task.n_pairs} pairs: {eap_seconds:.1f}s ({eap_seconds / task.n_pairs * 1e3:.1f} ms a pair); "
          f"peak RSS {peak_gb():.2f} GB")

    edges = [(int(s), int(r)) for s, r in graph.valid.nonzero()]
    sub = task.rows(0, args.exact_pairs)
    t0 = time.perf_counter()
    exact = C.path_patch(sub, edges, batch_size=args.batch_size, progress=False)
    exact_seconds = time.perf_counter() - t0
    projected = exact_seconds / args.exact_pairs * task.n_pairs
    print(f"exact edge patching, all {len(edges):,} edges, {args.exact_pairs} pairs: {exact_seconds:.1f}s; projected for "
          f"{task.n_pairs} pairs: {projected / 3600:.2f} h = {projected / eap_seconds:,.0f} x EAP's time; "
          f"peak RSS {peak_gb():.2f} GB")
    eap_sub = C.edge_attribution(sub, method="eap", progress=False)
    truth = exact.effects.mean(0).numpy()
    estimate = np.array([float(eap_sub.scores[e]) for e in edges])
    print(f"  on those pairs, EAP against exact over all edges: Spearman {spearman(truth, estimate):.3f}, "
          f"mean |error| {np.abs(truth - estimate).mean():.2e} (mean |exact| {np.abs(truth).mean():.2e})")

    ig_task = task.rows(0, args.ig_pairs)
    base = None
    for steps in (1, 2, 4, 8):
        t0 = time.perf_counter()
        C.edge_attribution(ig_task, method="eap-ig", steps=steps, progress=False)
        seconds = time.perf_counter() - t0
        base = base or seconds
        print(f"EAP-IG m={steps}, {args.ig_pairs} pairs: {seconds:.2f}s ({seconds / base:.2f} x m=1)")

    if args.agreement:
        print(f"agreement with exact edge patching, {args.agreement} pairs:")
        print(agreement(task, args.agreement, args.steps).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
