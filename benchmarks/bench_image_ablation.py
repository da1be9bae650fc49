"""Image ablation over VALSE existence (12 layers x MHA and MLP), timed against a plain loop.

    python benchmarks/bench_image_ablation.py            # N instances (default 4) both ways
    python benchmarks/bench_image_ablation.py --all      # and clip_lens on every kept instance

(a) a plain loop: for each instance, one open_clip run of the mean-colour image recording every
    MHA / MLP output, then one full open_clip image forward pass per (component, layer) with a
    torch forward hook writing the recorded output;
(b) experiments.image_ablation.run (clip_lens.patch: cached runs, each ablation resumed from the
    residual of its half-layer, both components sharing the cached runs).
Images are generated (VALSE's images are not needed to time the computation). Prints times, the
ratio, peak memory and the largest difference between the two.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from clip_lens.images import mean_colour_pixels
from clip_lens.model import random_model_pair
from clip_lens.studies.analyses import existence, image_ablation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_patching import gemm_rate  # noqa: E402  the one GEMM-rate measurement of the benchmarks

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def build(seed: int):
    return random_model_pair("ViT-B-32", seed)


def plain_loop(oc, pixels, source, caption_emb, foil_emb):
    """(a): d* [n, 2, 12]; ls_1 / ls_2 (identity for ViT-B-32) carry the MHA / MLP branch outputs."""
    blocks = oc.visual.transformer.resblocks
    scale = oc.logit_scale.exp().item()
    out = torch.zeros(len(pixels), 2, len(blocks))
    for i in range(len(pixels)):
        recorded, handles = {}, []
        for l, block in enumerate(blocks):
            for c, module in enumerate((block.ls_1, block.ls_2)):
                handles.append(module.register_forward_hook(lambda m, a, o, key=(c, l): recorded.__setitem__(key, o.detach())))
        with torch.no_grad():
            oc.encode_image(source[i:i + 1])
        for h in handles:
            h.remove()
        for (c, l), value in recorded.items():
            module = (blocks[l].ls_1, blocks[l].ls_2)[c]
            handle = module.register_forward_hook(lambda m, a, o, value=value: value)
            with torch.no_grad():
                emb = oc.encode_image(pixels[i:i + 1])
            handle.remove()
            out[i, c, l] = scale * float(F.cosine_similarity(emb, caption_emb[i:i + 1]) - F.cosine_similarity(emb, foil_emb[i:i + 1]))
    return out


def floor_flops(cfg, n_instances: int) -> float:
    """FLOPs image ablation cannot avoid, per the engine's plan: the target's and the baseline's runs
    (every block but the last at every position; the last at the class token), and per instance and
    layer l, MHA ablated (block l's MLP, then blocks l+1..) and MLP ablated (blocks l+1..), each
    resumed run computing the last block at the class token only. A block costs 24 d^2 per position
    in its linear layers and 4 d P per position in attention (P positions); the last block at the
    class token 4 d^2 P (keys and values) + 20 d^2 + 4 d P."""
    d, n_layers, p = cfg.d_model, cfg.n_layers, cfg.n_patches + 1  # the patches and the class token
    block = (24 * d * d + 4 * d * p) * p
    last = 4 * d * d * p + 20 * d * d + 4 * d * p
    mlp_half = 16 * d * d * p
    cached = 2 * ((n_layers - 1) * block + last)
    ablated = 0.0
    for layer in range(n_layers):
        later = max(n_layers - 2 - layer, 0) * block + (last if layer < n_layers - 1 else 0)
        mha_first = mlp_half if layer < n_layers - 1 else 16 * d * d  # the last block's MLP: class token only
        ablated += (mha_first + later) + later
    return n_instances * (cached + ablated)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=4, help="instances timed both ways (default 4)")
    parser.add_argument("--all", action="store_true", help="also run clip_lens on every kept instance")
    parser.add_argument("--valse", type=Path, default=SHARED / "valse" / "existence.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)

    oc, model = build(args.seed)
    n_kept = len(existence.prepare_existence(existence.load_valse(args.valse), model.to_tokens).pairs)
    pixels_all = torch.randn(n_kept, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        inst = existence.prepare(model, args.valse, images=pixels_all, progress=False)
    print(f"VALSE existence: {len(inst)} instances, generated images; ViT-B-32 vision tower, random weights; "
          f"{torch.get_num_threads()} threads")

    if args.all:
        t0 = time.perf_counter()
        full = image_ablation.run(model, inst, pixels=pixels_all, progress=False)
        t_all = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(f"(b) clip_lens, all {len(inst)} instances x 12 layers x MHA and MLP ({full.d_star.size} ablations): "
              f"{t_all:.1f}s ({t_all / 60:.2f} min), peak RSS {peak_gb:.2f} GB (process, models and pixels included)")
        flops, rate = floor_flops(model.vision.cfg, len(inst)), gemm_rate(model.vision.cfg.d_model)
        print(f"    floor: {flops / 1e12:.2f} TFLOP (cached runs and ablations); float32 GEMM at the tower's width "
              f"{rate / 1e9:.0f} GFLOP/s -> {flops / rate:.1f}s; achieved {flops / t_all / 1e9:.0f} GFLOP/s, "
              f"{t_all / (flops / rate):.2f}x the floor")

    n = args.instances
    sub = inst.subset([i < n for i in range(len(inst))])
    pixels = pixels_all[:n]
    t0 = time.perf_counter()
    ours = image_ablation.run(model, sub, pixels=pixels, progress=False)
    t_b = time.perf_counter() - t0
    source = mean_colour_pixels(pixels, model.preprocess_cfg["mean"], model.preprocess_cfg["std"])
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        caption_emb = oc.encode_text(tokenizer(list(sub.frame["caption"])))
        foil_emb = oc.encode_text(tokenizer(list(sub.frame["foil"])))
    t0 = time.perf_counter()
    plain = plain_loop(oc, pixels, source, caption_emb, foil_emb)
    t_a = time.perf_counter() - t0
    diff = float((torch.from_numpy(ours.d_star).float() - plain).abs().max())
    print(f"{n} instances x 24 ablations: (a) plain open_clip loop {t_a:.2f}s = {t_a / t_b:.1f}x clip_lens; "
          f"(b) clip_lens {t_b:.2f}s ({t_b / n:.3f}s per instance); max |b - a| {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
