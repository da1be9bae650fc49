"""The GPU check: parity, the engine against hook loops, timings and memory, in one run.

    python benchmarks/gpu_check.py                          # on CUDA: about a minute on an H100
    python benchmarks/gpu_check.py --json out.json          # and keep the figures
    python benchmarks/gpu_check.py --device cpu --small     # the same checks, small, on the CPU (the suite runs this)

1. parity: the hooked model against open_clip's own forward pass, in float32 (tolerance 1e-4) and
   in bfloat16 (both models converted; reported, and against float32);
2. `clip_lens.patch` against a one-at-a-time hook loop, for every exact intervention (patch, zero,
   mean, resample) on every hook kind of the text tower, and patch / zero on the vision tower;
3. the patching benchmark (benchmarks/bench_patching.py) with its open_clip-loop and
   TransformerLens baselines in the same run, and the full causal-tracing grid;
4. image ablation on every VALSE existence instance (generated images), float32 and bfloat16,
   against a plain open_clip loop on a few instances;
5. peak GPU memory of each part.
Random weights (moved off their initial values), ViT-B-32 unless --small (the shipped tiny
architecture). TF32 stays off throughout: the check sets it off explicitly and says so.
Exit status 1 when a parity or equality check fails.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_image_ablation  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import bench_patching  # noqa: E402

import clip_lens  # noqa: E402
from clip_lens import zoo  # noqa: E402
from clip_lens.cli.tools import CHECK_SENTENCES  # noqa: E402
from clip_lens.images import mean_colour_pixels  # noqa: E402
from clip_lens.model import random_model_pair  # noqa: E402
from clip_lens.patching import hook_name  # noqa: E402
from clip_lens.studies.analyses import (
    causal_tracing,  # noqa: E402
    existence,  # noqa: E402
    image_ablation,  # noqa: E402
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NEG = ["There are no giraffes.", "There is no cat on the mat."]
POS = ["There are some giraffes.", "There is a cat on the mat."]


class Timer:
    """Wall time of a block, the device synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else float("nan")


def build(arch: str, device: torch.device, seed: int = 0):
    oc, model = random_model_pair(arch, seed)
    return oc.to(device), model.to(device)


# 1. parity ------------------------------------------------------------------------------------
def parity(oc, model, device: torch.device, n_images: int) -> dict:
    size = model.vision.cfg.image_size
    pixels = torch.randn(n_images, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
    texts = CHECK_SENTENCES
    out = {}
    with torch.no_grad():
        tokens = model.to_tokens(texts, trim=False)
        ref = (oc.encode_text(tokens).float(), oc.encode_image(pixels).float())
        ours = (model.encode_text(model.to_tokens(texts)), model.encode_image(pixels))
        out["float32"] = max(float((a - b).abs().max()) for a, b in zip(ours, ref))
        oc16, model16 = copy.deepcopy(oc).to(torch.bfloat16), half_copy(oc, model, torch.bfloat16)
        ref16 = (oc16.encode_text(tokens).float(), oc16.encode_image(pixels.bfloat16()).float())
        ours16 = (model16.encode_text(model16.to_tokens(texts)).float(), model16.encode_image(pixels).float())
        out["bfloat16_vs_open_clip_bfloat16"] = max(float((a - b).abs().max()) for a, b in zip(ours16, ref16))
        out["bfloat16_vs_float32"] = max(float((a - b).abs().max()) for a, b in zip(ours16, ref))
        out["embedding_scale"] = max(float(r.abs().max()) for r in ref)
    return out


@functools.lru_cache(maxsize=2)
def half_copy(oc, model, dtype: torch.dtype):
    """The hooked model again, converted from the float32 open_clip weights to `dtype`: built once
    per (model, dtype) and shared by the checks, which only read it."""
    return clip_lens.HookedCLIP.from_open_clip(oc, tokenizer=model.tokenizer, name=model.name, dtype=dtype)


# 2. the engine against hook loops --------------------------------------------------------------
def hook_loop_effect(tower, inputs, other, model, name, index, value) -> float:
    """S of one full forward pass with act[index] = value at hook `name`."""
    def edit(act, hook):
        act = act.clone()
        act[index] = value
        return act

    with torch.no_grad():
        emb = tower.run_with_hooks(inputs, fwd_hooks=[(name, edit)])
    return float(model.logit_scale.detach().exp() * F.cosine_similarity(emb.float(), other.float()))


def engine_against_hook_loops(model, device: torch.device) -> dict:
    """max |patch - hook loop| per (tower, kind, intervention)."""
    image = torch.randn(1, 3, *model.vision.cfg.image_size, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        image_emb = model.encode_image(image)
    text_emb = model.encode_text(model.to_tokens(POS[:1])).detach()
    out = {}
    cases = [("text", kind, iv) for kind in ("resid", "attn_out", "mlp_out", "z", "mlp_post")
             for iv in ("patch", "zero", "mean", "resample")]
    cases += [("vision", kind, iv) for kind in ("resid", "z") for iv in ("patch", "zero")]
    for tower_name, kind, iv in cases:
        tower = getattr(model, tower_name)
        n = tower.cfg.n_layers
        if tower_name == "text":
            targets, sources = model.to_tokens(POS), model.to_tokens(NEG)
            other, positions = image_emb, "all"
        else:
            targets = torch.randn(2, 3, *model.vision.cfg.image_size, generator=torch.Generator().manual_seed(3)).to(device)
            sources, other, positions = targets.flip(0), text_emb, [0, 1, tower.cfg.n_ctx - 1]
        if iv == "resample":
            targets, sources = targets[:1].repeat(2, 1), torch.cat([sources[:1], targets[:1]])
        layers = [0, n // 2, n] if kind == "resid" else [0, n - 1]
        units = {"z": dict(heads=[0, tower.cfg.n_heads - 1]), "mlp_post": dict(neurons=[0, 7])}.get(kind, {})
        result = clip_lens.patch(model, target=targets, source=None if iv == "zero" else sources, hook=kind,
                                 layers=layers, positions=positions,
                                 intervention=iv, progress=False, **units,
                                 **({"image": other} if tower_name == "text" else {"text": other}))
        with torch.no_grad():
            _, cache_s = tower.run_with_cache(sources)
            _, cache_t = tower.run_with_cache(targets)
        # the reference's own facts, not the result's: lengths up to EOT, the positions asked for, and
        # the resample partners as documented (randperm seeded with seed=0, the default)
        if tower_name == "text":
            lengths = [int(row.argmax()) + 1 for row in targets]
        else:
            lengths = [tower.cfg.n_ctx] * targets.shape[0]
        pos_list = list(range(targets.shape[1])) if positions == "all" else positions
        partners = torch.randperm(sources.shape[0], generator=torch.Generator().manual_seed(0))[: targets.shape[0]]
        worst = 0.0
        for i in range(targets.shape[0]):
            for li, layer in enumerate(layers):
                name = hook_name(kind, layer, n)
                if iv == "mean":  # the engine's mean: over every pair and each pair's own positions
                    acts = cache_s[name]
                    source_lengths = torch.tensor([int(r.argmax()) + 1 for r in sources] if tower_name == "text"
                                                  else [tower.cfg.n_ctx] * sources.shape[0], device=device)
                    valid = torch.arange(acts.shape[1], device=device)[None] < source_lengths[:, None]
                    mean = acts[valid].mean(0)
                for pi, q in enumerate(pos_list):
                    if q >= lengths[i]:
                        continue
                    unit_list = list(units.values())[0] if units else [None]
                    for ui, unit in enumerate(unit_list):
                        index = (0, q) if unit is None else (0, q, unit)
                        src_row = int(partners[i]) if iv == "resample" else i
                        value = {"patch": lambda: cache_s[name][(src_row,) + index[1:]],
                                 "resample": lambda: cache_s[name][(src_row,) + index[1:]],
                                 "zero": lambda: torch.zeros_like(cache_t[name][(i,) + index[1:]]),
                                 "mean": lambda: mean[index[2:]] if unit is not None else mean}[iv]()
                        expected = hook_loop_effect(tower, targets[i:i + 1, :lengths[i]] if tower_name == "text"
                                                    else targets[i:i + 1], other, model, name, index, value)
                        got = float(result.effects[(i, li, pi) + ((ui,) if unit is not None else ())])
                        worst = max(worst, abs(got - expected))
        out[f"{tower_name}/{kind}/{iv}"] = worst
    return out


# 3. the patching benchmark ------------------------------------------------------------------------
def patching_benchmark(oc, model, device: torch.device, valse: Path, n_pairs: int, all_pairs: int) -> dict:
    import open_clip

    from clip_lens.data import load_valse, prepare_existence

    pairs = prepare_existence(load_valse(valse), model.to_tokens).pairs
    pairs = pairs.head(all_pairs) if all_pairs else pairs
    image = torch.randn(1, 3, *model.vision.cfg.image_size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        image_emb = model.encode_image(image)
    sub = pairs.head(n_pairs)
    neg, pos = list(sub["negated"]), list(sub["non_negated"])
    clip_lens.patch(model, target=pos[:1], source=neg[:1], image=image_emb, progress=False)  # warm-up
    with Timer(device) as t_c:
        ours = clip_lens.patch(model, target=pos, source=neg, image=image_emb, progress=False)
    with Timer(device) as t_b:
        tl = bench_patching.transformer_lens_loop(model, neg, pos, image_emb)
    tokenizer = model.tokenizer.source if model.tokenizer.source is not None else open_clip.get_tokenizer("ViT-B-32")
    with Timer(device) as t_a:
        plain = bench_patching.plain_open_clip_loop(oc, tokenizer, neg, pos, image_emb)
    lengths = ours.lengths.tolist()
    diff_a = max(float((ours.effects[i, :, :n] - g[:, :n].cpu()).abs().max()) for i, (g, n) in enumerate(zip(plain, lengths)))
    diff_b = max(float((ours.effects[i, :-1, :n] - g[:, :n].cpu()).abs().max()) for i, (g, n) in enumerate(zip(tl, lengths)))
    reset_peak(device)
    with Timer(device) as t_all:
        full = clip_lens.patch(model, target=list(pairs["non_negated"]), source=list(pairs["negated"]), image=image_emb,
                               progress=False)
    rates = grid_rates(oc, model, device, pairs, image_emb, t_all.seconds)
    return {**rates, "pairs_timed": len(sub), "plain_open_clip_loop_s": t_a.seconds, "transformer_lens_s": t_b.seconds,
            "clip_lens_s": t_c.seconds, "plain_over_clip_lens": t_a.seconds / t_c.seconds,
            "transformer_lens_over_clip_lens": t_b.seconds / t_c.seconds, "max_diff_plain": diff_a,
            "max_diff_transformer_lens": diff_b, "all_pairs": len(pairs),
            "all_pairs_interventions": int((~torch.isnan(full.effects)).sum()), "all_pairs_s": t_all.seconds,
            "all_pairs_peak_gpu_gb": peak_gb(device)}


def gemm_rate(d: int, device: torch.device, dtype: torch.dtype, rows: int = 8192, seconds: float = 0.5) -> float:
    """FLOP/s of [rows, d] x [d, 4d] on `device` in `dtype` (the MLP's shape at the tower's width),
    the device synchronised around the timed loop."""
    a = torch.randn(rows, d, device=device, dtype=dtype)
    b = torch.randn(d, 4 * d, device=device, dtype=dtype)
    a @ b
    reps = 0
    with Timer(device) as t:
        while reps < 3 or time.perf_counter() - t.start < seconds:
            a @ b
            reps += 1
    return 2 * rows * d * 4 * d * reps / t.seconds


def grid_rates(oc, model, device: torch.device, pairs, image_emb, float32_s: float) -> dict:
    """The causal-tracing grid's achieved TFLOP/s (its unavoidable FLOPs, `bench_patching.floor_flops`,
    over its time) in float32 (timed by the caller) and bfloat16, each against the device's GEMM rate
    in that dtype measured in the same run. The CPU version runs bfloat16 on two pairs (a CPU's
    bfloat16 products are slow); its speedup is then the ratio of the two rates."""
    pairs16 = pairs if device.type == "cuda" else pairs.head(2)
    flops, flops16 = (bench_patching.floor_flops(model, p["negated"], p["non_negated"]) for p in (pairs, pairs16))
    model16 = half_copy(oc, model, torch.bfloat16)
    image16 = image_emb.bfloat16()
    clip_lens.patch(model16, target=list(pairs16["non_negated"][:1]), source=list(pairs16["negated"][:1]),
                    image=image16, progress=False)  # warm-up
    with Timer(device) as t16:
        clip_lens.patch(model16, target=list(pairs16["non_negated"]), source=list(pairs16["negated"]), image=image16,
                        progress=False)
    out = {"grid_tflop": flops / 1e12, "bf16_pairs": len(pairs16), "all_pairs_bf16_s": t16.seconds}
    rows = 8192 if device.type == "cuda" else 1024  # the CPU version keeps its check short
    for name, work, seconds, dtype in (("float32", flops, float32_s, torch.float32),
                                       ("bfloat16", flops16, t16.seconds, torch.bfloat16)):
        achieved, gemm = work / seconds, gemm_rate(model.text.cfg.d_model, device, dtype, rows=rows)
        out[f"grid_tflops_{name}"], out[f"gemm_tflops_{name}"] = achieved / 1e12, gemm / 1e12
        out[f"grid_over_gemm_{name}"] = achieved / gemm
    out["grid_bf16_speedup"] = out["grid_tflops_bfloat16"] / out["grid_tflops_float32"]
    return out


def causal_tracing_half_precision(oc, model, device: torch.device, pairs_path: Path, all_pairs: int) -> dict:
    """The full causal-tracing grid in float32 and bfloat16: time and CTE error."""
    n_kept = len(existence.prepare_existence(existence.load_valse(pairs_path), model.to_tokens).pairs)
    emb = torch.randn(n_kept, model.text.cfg.d_embed, generator=torch.Generator().manual_seed(4)).to(device)
    inst = existence.prepare(model, pairs_path, images=emb, limit=all_pairs or None, progress=False)
    out = {}
    cte = {}
    for dtype in (torch.float32, torch.bfloat16):
        run_model = model if dtype == torch.float32 else half_copy(oc, model, dtype)
        reset_peak(device)
        with Timer(device) as t:
            traced = causal_tracing.run(run_model, inst, progress=False)
        cte[dtype] = traced.cte
        out[f"{str(dtype).split('.')[-1]}_s"] = t.seconds
        out[f"{str(dtype).split('.')[-1]}_peak_gpu_gb"] = peak_gb(device)
    a, b = cte[torch.float32], cte[torch.bfloat16]
    # as bench_half_precision.errors: cells no run moves (exactly 0 in every dtype) are left out
    keep = np.isfinite(a) & np.isfinite(b) & ((a != 0) | (b != 0))
    out["cte_max_abs_error_bf16"] = float(np.abs(a - b)[keep].max())
    out["cte_median_abs_error_bf16"] = float(np.median(np.abs(a - b)[keep]))
    out["cte_p99_abs_error_bf16"] = float(np.quantile(np.abs(a - b)[keep], 0.99))
    out["instances"] = len(inst)
    return out


# 4. image ablation ------------------------------------------------------------------------------------
def image_ablation_check(oc, model, device: torch.device, pairs_path: Path, n_plain: int, limit: int) -> dict:
    n_kept = len(existence.prepare_existence(existence.load_valse(pairs_path), model.to_tokens).pairs)
    size = model.vision.cfg.image_size
    pixels_all = torch.randn(n_kept, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    inst = existence.prepare(model, pairs_path, images=pixels_all, limit=limit or None, progress=False)
    pixels = pixels_all[: len(inst)]
    out = {"instances": len(inst)}
    d_star = {}
    for dtype in (torch.float32, torch.bfloat16):
        run_model = model if dtype == torch.float32 else half_copy(oc, model, dtype)
        reset_peak(device)
        with Timer(device) as t:
            d_star[dtype] = image_ablation.run(run_model, inst, pixels=pixels, progress=False).d_star
        name = str(dtype).split(".")[-1]
        out[f"{name}_s"], out[f"{name}_peak_gpu_gb"] = t.seconds, peak_gb(device)
    out["bf16_speedup"] = out["float32_s"] / out["bfloat16_s"]
    out["iae_max_abs_error_bf16"] = float(np.abs(d_star[torch.float32] - d_star[torch.bfloat16]).max())
    sub = inst.subset([i < n_plain for i in range(len(inst))])
    source = mean_colour_pixels(pixels[:n_plain], model.preprocess_cfg["mean"], model.preprocess_cfg["std"])
    with torch.no_grad():
        caption_emb, foil_emb = (oc.encode_text(model.to_tokens(list(sub.frame[c]), trim=False)) for c in ("caption", "foil"))
    with Timer(device) as t_plain:
        plain = bench_image_ablation.plain_loop(oc, pixels[:n_plain], source, caption_emb, foil_emb)
    with Timer(device) as t_ours:
        ours = image_ablation.run(model, sub, pixels=pixels[:n_plain], progress=False)
    out.update(plain_instances=n_plain, plain_loop_s=t_plain.seconds, clip_lens_s=t_ours.seconds,
               plain_over_clip_lens=t_plain.seconds / t_ours.seconds,
               max_diff_plain=float((torch.from_numpy(ours.d_star).float() - plain.cpu()).abs().max()))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--small", action="store_true", help="the tiny architecture and a few instances (for the suite)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--valse", type=Path, default=SHARED / "valse" / "existence.json", help="VALSE existence.json")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*token slots")  # VALSE texts longer than the tiny model's context
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --device cpu --small for the CPU version", file=sys.stderr)
        return 2
    # TF32 off for the check, whatever this process's settings (restored at the end): float32
    # parity means float32 arithmetic
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _checks(args, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _checks(args: argparse.Namespace, device: torch.device) -> int:
    arch = zoo.register() if args.small else "ViT-B-32"
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "architecture": arch, "tf32": False}
    start = time.perf_counter()
    oc, model = build(arch, device)
    print(f"gpu_check on {figures['device']} (torch {torch.__version__}), {arch} with random weights; TF32 off")

    figures["parity"] = p = parity(oc, model, device, n_images=2)
    print(f"1. parity: float32 max |clip_lens - open_clip| {p['float32']:.2e} (tolerance 1e-4); bfloat16 vs open_clip "
          f"in bfloat16 {p['bfloat16_vs_open_clip_bfloat16']:.2e}, vs float32 {p['bfloat16_vs_float32']:.2e} "
          f"(embeddings up to {p['embedding_scale']:.2f})")

    reset_peak(device)
    figures["hook_loops"] = h = engine_against_hook_loops(model, device)
    worst = max(h.values())
    print(f"2. patch against hook loops: {len(h)} (tower, kind, intervention) cases, worst max |difference| {worst:.2e} "
          f"({max(h, key=h.get)}); peak GPU memory {peak_gb(device):.2f} GB")

    figures["patching"] = b = patching_benchmark(oc, model, device, args.valse, n_pairs=4, all_pairs=16 if args.small else 0)
    print(f"3. causal tracing, {b['pairs_timed']} pairs: plain open_clip loop {b['plain_open_clip_loop_s']:.2f}s "
          f"({b['plain_over_clip_lens']:.1f}x clip_lens), TransformerLens {b['transformer_lens_s']:.2f}s "
          f"({b['transformer_lens_over_clip_lens']:.1f}x), clip_lens {b['clip_lens_s']:.3f}s; max |difference| "
          f"{b['max_diff_plain']:.1e} / {b['max_diff_transformer_lens']:.1e}. All {b['all_pairs']} pairs "
          f"({b['all_pairs_interventions']} interventions): {b['all_pairs_s']:.2f}s, peak {b['all_pairs_peak_gpu_gb']:.2f} GB")
    print(f"   the grid's {b['grid_tflop']:.2f} TFLOP: float32 {b['grid_tflops_float32']:.2f} TFLOP/s = "
          f"{b['grid_over_gemm_float32']:.0%} of the device's float32 GEMM ({b['gemm_tflops_float32']:.1f} TFLOP/s); "
          f"bfloat16 ({b['bf16_pairs']} pairs) {b['all_pairs_bf16_s']:.2f}s, {b['grid_tflops_bfloat16']:.2f} TFLOP/s = "
          f"{b['grid_over_gemm_bfloat16']:.0%} of its GEMM ({b['gemm_tflops_bfloat16']:.1f} TFLOP/s), "
          f"{b['grid_bf16_speedup']:.2f}x float32")
    figures["causal_tracing_precision"] = c = causal_tracing_half_precision(oc, model, device, args.valse, all_pairs=16 if args.small else 0)
    print(f"   causal-tracing study ({c['instances']} instances): float32 {c['float32_s']:.2f}s, bfloat16 "
          f"{c['bfloat16_s']:.2f}s; CTE error in bfloat16: max {c['cte_max_abs_error_bf16']:.3f}, median "
          f"{c['cte_median_abs_error_bf16']:.4f}, 99th percentile {c['cte_p99_abs_error_bf16']:.3f}")

    figures["image_ablation"] = a = image_ablation_check(oc, model, device, args.valse, n_plain=2 if args.small else 4,
                                                         limit=8 if args.small else 0)
    print(f"4. image ablation, {a['instances']} instances: float32 {a['float32_s']:.2f}s (peak {a['float32_peak_gpu_gb']:.2f} GB), "
          f"bfloat16 {a['bfloat16_s']:.2f}s ({a['bf16_speedup']:.2f}x); IAE error in bfloat16 max "
          f"{a['iae_max_abs_error_bf16']:.3f}. Plain open_clip loop on {a['plain_instances']}: {a['plain_over_clip_lens']:.1f}x "
          f"clip_lens, max |difference| {a['max_diff_plain']:.1e}")

    figures["seconds"] = time.perf_counter() - start
    tolerance = 1e-4
    failures = [name for name, value in [("parity float32", p["float32"]), ("hook loops", worst),
                                         ("plain loop", b["max_diff_plain"]),
                                         ("TransformerLens", b["max_diff_transformer_lens"]),
                                         ("image ablation plain loop", a["max_diff_plain"])] if not value <= tolerance]
    figures["failures"] = failures
    print(f"5. total {figures['seconds']:.0f}s; {'all checks passed' if not failures else 'FAILED: ' + ', '.join(failures)}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
