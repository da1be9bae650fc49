"""Record every output kind of the patching engine, to check a refactoring changes no bit of it.

    python benchmarks/engine_fingerprint.py record before.pt       # at the old commit
    python benchmarks/engine_fingerprint.py record after.pt        # at the new one
    python benchmarks/engine_fingerprint.py compare before.pt after.pt

Recorded (random ViT-B-32, seed 0): the patching benchmark's grid (all kept VALSE existence pairs
x 13 layers x every position), attribution patching, every hook kind (resid, attn_out, mlp_out,
z, mlp_post, pattern with value-only attention), every intervention (patch, zero, mean,
resample), SAE latents, both towers, and image ablation on the first N instances (default 64).
`compare` prints, per output, whether it is bitwise identical (NaN where NaN) and, if not, how far
the two lie apart; it exits 1 unless all are identical.
To record at an old commit, check it out in a worktree and put it first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHORT = {"exact": "exact", "attribution": "attr"}  # output names, as recorded since the first fingerprint


def record(out: Path, n_ablation: int, valse: Path) -> None:
    import clip_lens
    from clip_lens.data import load_valse, prepare_existence
    from clip_lens.studies.analyses import existence, image_ablation

    try:
        from clip_lens.model import random_model_pair
    except ImportError:  # commits before random_model_pair moved to clip_lens.model
        from clip_lens.loading import random_model_pair
    from clip_lens.sae import TopKSAE

    print(f"clip_lens from {Path(clip_lens.__file__).parent}", flush=True)
    _, model = random_model_pair("ViT-B-32", 0)
    pairs = prepare_existence(load_valse(valse), model.to_tokens).pairs
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image_emb = model.encode_image(image)
    out_ = {}
    t0 = time.perf_counter()
    grid = clip_lens.patch(model, target=list(pairs["non_negated"]), source=list(pairs["negated"]), image=image_emb,
                           progress=False)
    print(f"benchmark grid: {time.perf_counter() - t0:.1f}s", flush=True)
    out_["bench_grid"], out_["bench_grid_baseline"] = grid.effects, grid.baseline
    neg, pos = list(pairs["negated"][:8]), list(pairs["non_negated"][:8])
    text = dict(image=image_emb, progress=False)
    out_["attr_resid"] = clip_lens.patch(model, target=pos, source=neg, method="attribution", **text).effects
    for kind in ("attn_out", "mlp_out", "z", "mlp_post"):
        units = dict(neurons=list(range(0, 2048, 97))) if kind == "mlp_post" else {}
        for method in ("exact", "attribution"):
            out_[f"{SHORT[method]}_{kind}"] = clip_lens.patch(model, target=pos[:3], source=neg[:3], hook=kind, method=method,
                                                       **units, **text).effects
    out_["mean_multi"] = clip_lens.patch(model, target=pos, hook=["attn_out", "mlp_out"], intervention="mean",
                                         positions="sequence", **text).effects
    out_["zero_resid"] = clip_lens.patch(model, target=pos, intervention="zero", layers=[0, 5, 12], **text).effects
    out_["value_only"] = clip_lens.patch(model, target=pos, hook="pattern", intervention="value_only",
                                         layers=[1, (2, 3), 11], **text).effects
    torch.manual_seed(1)
    sae = TopKSAE(512, 64, k=8)
    for method in ("exact", "attribution"):
        out_[f"sae_{SHORT[method]}"] = clip_lens.patch(model, target=pos[:2], source=neg[:2], layers=[4, 12], sae=sae,
                                                method=method, **text).effects
    px = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    out_["vision_z"] = clip_lens.patch(model, target=px[:2], source=px[1:3], text=["a dog", "a cat"], hook="z",
                                       layers=[0, 11], positions=[0, 5, 49], progress=False).effects
    out_["vision_resample"] = clip_lens.patch(model, target=px, text=["a dog"], intervention="resample", layers=[3, 12],
                                              positions=[0, 7], progress=False).effects
    pixels = torch.randn(len(pairs), 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inst = existence.prepare(model, valse, images=pixels, progress=False)
    t0 = time.perf_counter()
    ablated = image_ablation.run(model, inst.subset([i < n_ablation for i in range(len(inst))]),
                                 pixels=pixels[:n_ablation], progress=False)
    print(f"image ablation ({n_ablation} instances): {time.perf_counter() - t0:.1f}s", flush=True)
    out_["image_ablation_d_star"] = torch.from_numpy(ablated.d_star)
    try:
        from clip_lens.report import write_atomically
    except ImportError:  # commits before the atomic writer (d998a43)
        torch.save(out_, out)
    else:
        write_atomically(out, lambda handle: torch.save(out_, handle), binary=True)
    print(f"wrote {out}: {len(out_)} outputs")


def compare(before: Path, after: Path) -> bool:
    a, b = torch.load(before, weights_only=True), torch.load(after, weights_only=True)
    same_all = a.keys() == b.keys()
    for name in a:
        x, y = a[name], b.get(name)
        if y is None:
            same_all = False
            print(f"{name:24s} missing from {after}")
            continue
        same = x.shape == y.shape and torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())
        same_all &= same
        print(f"{name:24s} {str(tuple(x.shape)):18s} {'bitwise identical' if same else 'DIFFERENT'} "
              f"({int((~x.isnan()).sum())} values){'' if same else _difference(x, y)}")
    print("all bitwise identical" if same_all else "differences found")
    return same_all


def _difference(x: torch.Tensor, y: torch.Tensor) -> str:
    """How far two recordings of one output lie apart, where their shapes and NaNs agree."""
    if x.shape != y.shape or not torch.equal(x.isnan(), y.isnan()):
        return ": shapes or NaN places differ"
    gap = (x.double() - y.double()).nan_to_num().abs()
    return (f": max |difference| {float(gap.max()):.2e}, {int((gap > 1e-6).sum())} values apart by more than 1e-6, "
            f"max |value| {float(x.nan_to_num().abs().max()):.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--ablation-instances", type=int, default=64)
    rec.add_argument("--valse", type=Path, default=SHARED / "valse" / "existence.json")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    if args.command == "record":
        record(args.out, args.ablation_instances, args.valse)
        return 0
    return 0 if compare(args.before, args.after) else 1


if __name__ == "__main__":
    sys.exit(main())
