"""Causal tracing over VALSE existence pairs, timed three ways in one run.

    python benchmarks/bench_patching.py            # N pairs (default 4) for the three ways
    python benchmarks/bench_patching.py --all      # and clip_lens.patch on every kept pair
    python benchmarks/bench_patching.py --grid-only --save effects.pt   # the all-pairs grid alone
    PYTHONPATH=/path/to/other/tree python benchmarks/bench_patching.py --grid-only   # alternate two trees

(a) a plain loop: one open_clip text forward pass per (pair, layer, position), torch forward hooks;
(b) TransformerLens's patching.get_act_patch_resid_pre on model.text (layers 0..11, its grid);
(c) clip_lens.patch (layers 0..12).
Prints times, ratios, peak memory, the largest difference between results, and the correlation of
attribution-patching estimates with the exact effects.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

import clip_lens
from clip_lens.data import load_valse, prepare_existence
from clip_lens.model import random_model_pair
from clip_lens.report import write_atomically

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def build(seed: int):
    return random_model_pair("ViT-B-32", seed)


def plain_open_clip_loop(oc, tokenizer, negated, non_negated, image_emb):
    """(a): [pairs, 13, pos] S of the patched non-negated run, one full forward pass each."""
    blocks = oc.transformer.resblocks
    out = []
    for neg, pos in zip(negated, non_negated):
        src, tgt = tokenizer([neg]).to(image_emb.device), tokenizer([pos]).to(image_emb.device)
        length = int(tgt.argmax()) + 1
        # source residuals: inputs of every block and of ln_final
        saved = {}
        handles = [blocks[l].register_forward_pre_hook(lambda m, args, l=l: saved.__setitem__(l, args[0].detach()))
                   for l in range(len(blocks))]
        handles.append(oc.ln_final.register_forward_pre_hook(lambda m, args: saved.__setitem__(len(blocks), args[0].detach())))
        with torch.no_grad():
            oc.encode_text(src)
        for h in handles:
            h.remove()
        grid = torch.full((len(blocks) + 1, tgt.shape[1]), float("nan"))
        for layer in range(len(blocks) + 1):
            module = blocks[layer] if layer < len(blocks) else oc.ln_final
            for q in range(length):
                def replace(m, args, layer=layer, q=q):
                    x = args[0].clone()
                    x[:, q] = saved[layer][:, q]
                    return (x,) + tuple(args[1:])
                handle = module.register_forward_pre_hook(replace)
                with torch.no_grad():
                    emb = oc.encode_text(tgt)
                handle.remove()
                grid[layer, q] = oc.logit_scale.exp().item() * F.cosine_similarity(emb, image_emb).item()
        out.append(grid)
    return out


def transformer_lens_loop(model, negated, non_negated, image_emb):
    """(b): TransformerLens's get_act_patch_resid_pre per pair, [12, pos] each."""
    from transformer_lens import patching

    out = []
    for neg, pos in zip(negated, non_negated):
        src, tgt = model.to_tokens([neg]), model.to_tokens([pos])
        _, cache = model.text.run_with_cache(src)
        metric = lambda emb: (model.logit_scale.exp() * F.cosine_similarity(emb, image_emb)).sum()  # noqa: E731
        with torch.no_grad():
            out.append(patching.get_act_patch_resid_pre(model.text, tgt, cache, metric))
    return out


def floor_flops(model, negated, non_negated) -> float:
    """FLOPs the causal-tracing grid cannot avoid: for each intervention that changes something
    (layer l, position q of a pair whose source and target differ at or before q), blocks l.. at
    the positions q..EOT (the earlier positions keep their cached keys and values), then the final
    norm and projection of the EOT row. A block costs 24 d^2 per position in its linear layers
    (QKV 6 d^2, output 2 d^2, MLP 16 d^2) and 4 d (p + 1) in attention for a query at position p."""
    cfg = model.text.cfg
    d, n_layers, d_embed = cfg.d_model, cfg.n_layers, cfg.d_embed
    src, tgt = model.to_tokens(list(negated)), model.to_tokens(list(non_negated))
    total = 0.0
    for s, t in zip(src, tgt):
        length = int(model.text.pooled_positions(t[None])[0]) + 1
        first_difference = int((s[:length] != t[:length]).int().argmax())
        for q in range(first_difference, length):
            per_block = sum(24 * d * d + 4 * d * (p + 1) for p in range(q, length))
            for layer in range(n_layers + 1):
                if layer == n_layers and q != length - 1:
                    continue  # after the last block only the EOT row reaches the embedding
                total += (n_layers - layer) * per_block + 2 * d * d_embed
    return total


def gemm_rate(d: int, rows: int = 2048, seconds: float = 1.0) -> float:
    """float32 FLOP/s of [rows, d] x [d, 4d] on this machine (the MLP's shape at the tower's width)."""
    a, b = torch.randn(rows, d), torch.randn(d, 4 * d)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * rows * d * 4 * d * reps / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4, help="pairs timed three ways (default 4)")
    parser.add_argument("--all", action="store_true", help="also run clip_lens.patch on all kept pairs")
    parser.add_argument("--grid-only", action="store_true", help="run clip_lens.patch on all kept pairs only "
                        "(no 4-pair comparison): quick runs to alternate two trees")
    parser.add_argument("--save", type=Path, help="with --all or --grid-only: save the grid's effects here (torch.save)")
    parser.add_argument("--valse", type=Path, default=SHARED / "valse" / "existence.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    oc, model = build(args.seed)
    prepared = prepare_existence(load_valse(args.valse), model.to_tokens)
    pairs = prepared.pairs
    print(f"VALSE existence: {len(pairs)} kept pairs ({len(prepared.excluded)} excluded); ViT-B-32 text tower, random weights; "
          f"{torch.get_num_threads()} threads")
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        image_emb = model.encode_image(image)

    print(f"clip_lens from {Path(clip_lens.__file__).parent}")
    if args.all or args.grid_only:
        t0 = time.perf_counter()
        full = clip_lens.patch(model, target=list(pairs["non_negated"]), source=list(pairs["negated"]), image=image_emb, progress=False)
        t_all = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        cells = int((~torch.isnan(full.effects)).sum())
        print(f"(c) clip_lens.patch, all {len(pairs)} pairs x 13 layers x every position ({cells} interventions): "
              f"{t_all:.1f}s, peak RSS {peak_gb:.2f} GB (process, model included)")
        flops, rate = floor_flops(model, pairs["negated"], pairs["non_negated"]), gemm_rate(model.text.cfg.d_model)
        floor = flops / rate
        print(f"    floor: {flops / 1e12:.2f} TFLOP that the grid cannot avoid; float32 GEMM at the tower's width "
              f"{rate / 1e9:.0f} GFLOP/s -> {floor:.1f}s; achieved {flops / t_all / 1e9:.0f} GFLOP/s, "
              f"{t_all / floor:.2f}x the floor")
        if args.save:
            write_atomically(args.save, lambda handle: torch.save(full.effects, handle), binary=True)
        if args.grid_only:
            return 0

    sub = pairs.head(args.pairs)
    neg, pos = list(sub["negated"]), list(sub["non_negated"])
    t0 = time.perf_counter()
    ours = clip_lens.patch(model, target=pos, source=neg, image=image_emb, progress=False)
    t_c = time.perf_counter() - t0
    t0 = time.perf_counter()
    tl = transformer_lens_loop(model, neg, pos, image_emb)
    t_b = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = plain_open_clip_loop(oc, open_clip.get_tokenizer("ViT-B-32"), neg, pos, image_emb)
    t_a = time.perf_counter() - t0

    lengths = [int(t.argmax()) + 1 for t in model.to_tokens(pos)]
    diff_a = max(float((ours.effects[i, :, :n] - g[:, :n]).abs().max()) for i, (g, n) in enumerate(zip(plain, lengths)))
    diff_b = max(float((ours.effects[i, :12, :n] - g[:, :n]).abs().max()) for i, (g, n) in enumerate(zip(tl, lengths)))
    t0 = time.perf_counter()
    approx = clip_lens.patch(model, target=pos, source=neg, image=image_emb, method="attribution", progress=False)
    t_attr = time.perf_counter() - t0
    exact_delta = (ours.effects - ours.baseline[:, None, None]).flatten()
    approx_delta = (approx.effects - approx.baseline[:, None, None]).flatten()
    keep = ~torch.isnan(exact_delta)
    corr = float(np.corrcoef(exact_delta[keep].numpy(), approx_delta[keep].numpy())[0, 1])

    n = len(sub)
    print(f"\n{n} pairs, layers 0..12 x every position:")
    print(f"  (a) plain open_clip loop      {t_a:8.2f}s   {t_a / t_c:7.1f}x clip_lens")
    print(f"  (b) TransformerLens patching  {t_b:8.2f}s   {t_b / t_c:7.1f}x clip_lens   (layers 0..11)")
    print(f"  (c) clip_lens.patch           {t_c:8.2f}s")
    print(f"  attribution patching          {t_attr:8.2f}s   (one forward + backward per chunk)")
    print(f"  max |c - a| = {diff_a:.2e}, max |c - b| = {diff_b:.2e}")
    print(f"  attribution vs exact effects: Pearson r = {corr:.3f} over {int(keep.sum())} cells, "
          f"max |error| = {float((approx_delta - exact_delta)[keep].abs().max()):.3f}")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB (process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
