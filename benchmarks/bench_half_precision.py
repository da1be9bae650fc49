"""Half precision against float32 on the same inputs: errors of the studies' numbers, and times.

    python benchmarks/bench_half_precision.py                     # errors on 32 instances, times on all 490
    python benchmarks/bench_half_precision.py --time-instances 64 # a quicker timing

Errors (bfloat16 and float16 against float32, one model converted from the same float32 weights):
image and text embeddings, S, the causal-tracing grid (CTE) and image ablation (IAE), on the
shipped tiny CLIP (synthetic scenes) and on random ViT-B-32 (VALSE existence pairs, generated
images). Times: the causal-tracing study and image ablation on random ViT-B-32, float32 and
bfloat16, in the same run, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

import clip_lens
from clip_lens import zoo
from clip_lens.data.shapes import export_valse
from clip_lens.model import random_model_pair
from clip_lens.scores import score
from clip_lens.studies.analyses import causal_tracing, existence, image_ablation

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTITIES = ("CTE", "IAE")


def converted(oc, dtype: torch.dtype, name: str) -> clip_lens.HookedCLIP:
    return clip_lens.HookedCLIP.from_open_clip(oc, tokenizer=open_clip.get_tokenizer(name), name=name, dtype=dtype)


def studies(model, inst, pixels, quantities=QUANTITIES) -> dict:
    """The numbers whose precision we measure, all as float32 numpy arrays."""
    with torch.no_grad():
        image_emb = model.encode_image(pixels).float()
        caption_emb = model.encode_text(model.to_tokens(list(inst.frame["caption"]))).float()
    out = {"image embedding": image_emb.numpy(), "text embedding": caption_emb.numpy(),
           "S": score(model, caption_emb, image_emb).detach().numpy()}
    if "CTE" in quantities:
        traced = causal_tracing.run(model, inst, progress=False)
        d = inst.frame["d"].to_numpy()
        # CTE = d*/d divides by d: its error grows where |d| is small (random weights: |d| is small everywhere)
        out["CTE"] = traced.cte
        out["CTE, |d| > 1"] = np.where(np.abs(d)[:, None, None] > 1, traced.cte, np.nan)
    if "IAE" in quantities:
        out["IAE"] = image_ablation.run(model, inst, pixels=pixels, progress=False).iae
    return out


def gemm_rates(n: int = 2048, d: int = 768) -> dict:
    """GFLOP/s of one [n, d] x [d, 4d] product per dtype on this machine (the MLP's shape)."""
    rates = {}
    for name, dtype in [("float32", torch.float32), *HALF.items()]:
        a, b = torch.randn(n, d, dtype=dtype), torch.randn(d, 4 * d, dtype=dtype)
        a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.5:
            a @ b
            reps += 1
        rates[name] = 2 * n * d * 4 * d * reps / (time.perf_counter() - start) / 1e9
    return rates


def errors(reference: dict, other: dict) -> dict:
    out = {}
    for name, ref in reference.items():
        # cells that no run moves (positions before a causal patch site: exactly 0 in every dtype) are left out
        keep = np.isfinite(ref) & np.isfinite(other[name]) & ((ref != 0) | (other[name] != 0))
        diff = np.abs(ref - other[name])[keep]
        if diff.size:  # "CTE, |d| > 1" is empty where no instance has |d| > 1 (random weights)
            out[name] = (float(diff.max()), float(np.median(diff)), float(np.abs(ref[keep]).max()))
    return out


def tiny_case(n: int):
    oc = open_clip.create_model(zoo.register(), pretrained=str(zoo.WEIGHTS)).eval()
    folder = Path(tempfile.mkdtemp())
    scenes = export_valse(folder, n, seed=20_000)
    model = converted(oc, torch.float32, zoo.register())
    inst = existence.prepare(model, scenes, folder / "images", progress=False)
    return oc, zoo.register(), inst, model.to_pixels(list(inst.frame["image_path"]))


def vit_case(n: int, valse: Path, seed: int = 0):
    oc, model = random_model_pair("ViT-B-32", seed)
    n_kept = len(existence.prepare_existence(existence.load_valse(valse), model.to_tokens).pairs)
    pixels = torch.randn(n_kept, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    inst = existence.prepare(model, valse, images=pixels, limit=n, progress=False)
    return oc, "ViT-B-32", inst, pixels[: len(inst)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--error-instances", type=int, default=32, help="instances for the errors (default 32)")
    parser.add_argument("--time-instances", type=int, default=0, help="instances timed (default 0: all kept)")
    parser.add_argument("--valse", type=Path, default=SHARED / "valse" / "existence.json")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    rates = gemm_rates()
    print("GEMM [2048 x 768] x [768 x 3072]: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()))
    slow_fp16 = rates["float16"] < 0.1 * rates["float32"]

    print("\nErrors against float32 (max and median |difference| over the cells any run moves, and the largest "
          "|float32 value| for scale):")
    for label, (oc, name, inst, pixels) in [("tiny CLIP (trained), synthetic scenes", tiny_case(args.error_instances)),
                                            ("random ViT-B-32, VALSE existence", vit_case(args.error_instances, args.valse))]:
        reference = studies(converted(oc, torch.float32, name), inst, pixels)
        print(f"  {label}, {len(inst)} instances")
        for dtype_name, dtype in HALF.items():
            quantities, sub, sub_pixels = QUANTITIES, inst, pixels
            if dtype_name == "float16" and slow_fp16 and name == "ViT-B-32":
                # float16 products run at a fraction of a GFLOP/s on this CPU: embeddings, S and the
                # causal-tracing grid of 8 instances only, no image ablation
                keep = np.arange(len(inst)) < 8
                quantities, sub, sub_pixels = QUANTITIES[:1], inst.subset(keep), pixels[:8]
                ref = studies(converted(oc, torch.float32, name), sub, sub_pixels, quantities)
            else:
                ref = reference
            found = errors(ref, studies(converted(oc, dtype, name), sub, sub_pixels, quantities))
            for quantity, (worst, median, scale) in found.items():
                print(f"    {dtype_name:9s} {quantity:20s} max {worst:.2e}  median {median:.2e}  (|values| up to {scale:.3g}"
                      f"{', ' + str(len(sub)) + ' instances' if len(sub) != len(inst) else ''})")

    oc, name, inst, pixels = vit_case(args.time_instances or None, args.valse)
    print(f"\nTimes, random ViT-B-32, {len(inst)} instances:")
    results = {}
    for dtype_name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        model = converted(oc, dtype, name)
        t_ct = timed(lambda: causal_tracing.run(model, inst, progress=False))  # noqa: B023
        t_ia = timed(lambda: image_ablation.run(model, inst, pixels=pixels, progress=False))  # noqa: B023
        results[dtype_name] = (t_ct, t_ia)
        print(f"  {dtype_name:9s} causal tracing {t_ct:7.1f}s   image ablation {t_ia:7.1f}s")
    (c32, i32), (c16, i16) = results["float32"], results["bfloat16"]
    print(f"  bfloat16 speed-up: causal tracing {c32 / c16:.2f}x, image ablation {i32 / i16:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
