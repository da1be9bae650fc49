"""Kernel launches per intervention of the causal-tracing grid, counted by the profiler on the CPU.

    python benchmarks/bench_launches.py                # 64 VALSE existence pairs, ViT-B-32 text tower
    PYTHONPATH=/path/to/other/tree python benchmarks/bench_launches.py   # the same count for another tree

A launch is a leaf aten operator that computes (views, metadata and allocations excluded): on a GPU
each would be one kernel launch, so their count per intervention says how launch-bound the engine is
where the work per launch is small. Printed with the count of matrix products (addmm / mm / bmm) and
their mean number of rows, the size of the work each launch carries.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import torch

import clip_lens
from clip_lens.data import load_valse, prepare_existence
from clip_lens.model import random_model_pair

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# leaf operators that launch no kernel: views, metadata, allocation
NOT_LAUNCHES = {
    "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::select", "aten::slice", "aten::transpose",
    "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::reshape", "aten::_reshape_alias",
    "aten::alias", "aten::detach", "aten::unbind", "aten::split", "aten::chunk", "aten::t", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::lift_fresh", "aten::set_", "aten::numpy_T",
    "aten::split_with_sizes", "aten::narrow", "aten::result_type", "aten::is_nonzero", "aten::item",
    "aten::_local_scalar_dense", "aten::contiguous", "aten::flatten", "aten::unflatten", "aten::view_as",
    "aten::is_same_size", "aten::resolve_conj", "aten::resolve_neg", "aten::detach_", "aten::to",
}
MATMULS = {"aten::addmm", "aten::mm", "aten::bmm"}


def count_launches(fn) -> tuple[Counter, list[int]]:
    """(launches per operator name, rows of each matrix product) of one call of `fn`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    launches, rows = Counter(), []
    for event in prof.events():
        name = event.name
        if name in MATMULS:  # one launch, whatever it does inside (a CPU addmm copies its bias first)
            launches[name] += 1
            shape = event.input_shapes[1] if name == "aten::addmm" else (event.input_shapes or [None])[0]
            if shape:
                rows.append(shape[0] * (shape[1] if name == "aten::bmm" else 1))
            continue
        if not name.startswith("aten::") or name in NOT_LAUNCHES or _inside_matmul(event):
            continue
        if any(child.name.startswith("aten::") and child.name not in NOT_LAUNCHES for child in event.cpu_children):
            continue  # not a leaf: its children are counted
        launches[name] += 1
    return launches, rows


def _inside_matmul(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in MATMULS:
            return True
        parent = parent.cpu_parent
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64, help="VALSE existence pairs (default 64: one engine chunk)")
    parser.add_argument("--valse", type=Path, default=SHARED / "valse" / "existence.json")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    _, model = random_model_pair("ViT-B-32", 0)
    pairs = prepare_existence(load_valse(args.valse), model.to_tokens).pairs.head(args.pairs)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image_emb = model.encode_image(image)
    kwargs = dict(target=list(pairs["non_negated"]), source=list(pairs["negated"]), image=image_emb, progress=False)
    result = clip_lens.patch(model, **kwargs)  # warm-up, and the count of interventions
    interventions = int((~torch.isnan(result.effects)).sum())
    launches, rows = count_launches(lambda: clip_lens.patch(model, **kwargs))
    total, matmuls = sum(launches.values()), sum(launches[name] for name in MATMULS)
    print(f"clip_lens from {Path(clip_lens.__file__).parent}")
    print(f"{len(pairs)} pairs, {interventions} cells (interventions and no-ops)")
    print(f"  launches: {total} = {total / interventions:.2f} per cell; matrix products: {matmuls} "
          f"({matmuls / interventions:.3f} per cell), mean {sum(rows) / max(len(rows), 1):.0f} rows each")
    print("  most frequent: " + ", ".join(f"{name[6:]} {count}" for name, count in launches.most_common(8)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
