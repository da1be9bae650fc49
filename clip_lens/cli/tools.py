"""The `clip-lens` commands that are not studies: check, sweep, train-tiny, train-captioner."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

CHECK_SENTENCES = ["There are no giraffes.", "There are some giraffes.", "a photo of a cat on a sofa"]


def _load_pair(model_name: str, pretrained: Optional[str], seed: int):
    """(open_clip model, HookedCLIP) for `model_name`; random weights moved off init without `pretrained`."""
    import open_clip

    import clip_lens
    from clip_lens.model import random_model_pair

    if pretrained is None:
        return random_model_pair(model_name, seed)
    oc = open_clip.create_model(model_name, pretrained=pretrained).eval()
    return oc, clip_lens.HookedCLIP.from_open_clip(oc, tokenizer=open_clip.get_tokenizer(model_name), name=model_name)


def cmd_check(args: argparse.Namespace) -> int:
    """Build a model both ways and report how far clip_lens is from open_clip's own forward pass."""
    start = time.perf_counter()
    oc, model = _load_pair(args.model, args.pretrained, args.seed)
    size = model.vision.cfg.image_size
    pixels = torch.randn(args.images, 3, *size, generator=torch.Generator().manual_seed(args.seed))
    full_tokens = model.to_tokens(CHECK_SENTENCES, trim=False)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = (oc.encode_text(full_tokens), oc.encode_image(pixels), oc.get_logits(pixels, full_tokens)[0])
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokens = model.to_tokens(CHECK_SENTENCES)
        ours = (model.encode_text(tokens), model.encode_image(pixels), model(text=tokens, image=pixels))
        t_ours = time.perf_counter() - t0
        _, cache = model.run_with_cache(text=tokens, image=pixels)
    print(f"clip_lens check: {args.model} ({'pretrained=' + args.pretrained if args.pretrained else 'random weights, perturbed'})")
    text_cfg, vision_cfg = model.text.cfg, model.vision.cfg
    print(f"  text tower:   {text_cfg.n_layers} layers x {text_cfg.n_heads} heads, d_model {text_cfg.d_model}, act {text_cfg.act_fn}")
    print(f"  vision tower: {vision_cfg.n_layers} layers x {vision_cfg.n_heads} heads, d_model {vision_cfg.d_model}, "
          f"patches {vision_cfg.n_patches}")
    worst = 0.0
    for label, a, b in zip(("text embeddings", "image embeddings", "logits"), ours, ref):
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        print(f"  max |clip_lens - open_clip| {label:<17} {diff:.2e}")
    print(f"  hook points cached: {len(cache.keys())} (text {sum(k.startswith('text.') for k in cache.keys())}, "
          f"vision {sum(k.startswith('vision.') for k in cache.keys())})")
    print(f"  forward time: open_clip {t_ref:.2f}s, clip_lens {t_ours:.2f}s (text trimmed to {tokens.shape[1]} of 77 slots)")
    ok = worst <= args.tolerance
    print(f"  parity {'OK' if ok else 'FAILED'} (tolerance {args.tolerance:g}); total {time.perf_counter() - start:.1f}s")
    return 0 if ok else 1


def cmd_train_tiny(args: argparse.Namespace) -> int:
    from clip_lens import tiny

    if args.threads:
        torch.set_num_threads(args.threads)
    model, report = tiny.train(steps=args.steps, seed=args.seed, lr=args.lr, progress=not args.quiet, out=args.out)
    import clip_lens

    hooked = clip_lens.HookedCLIP.from_pretrained(tiny.register(), pretrained=args.out)
    accuracy = tiny.evaluate(hooked)
    print(f"trained {report.steps} steps in {report.seconds / 60:.1f} min (final loss {report.final_loss:.3f}); "
          f"wrote {args.out}")
    print(f"held-out existence accuracy {accuracy['accuracy']:.3f} (negation in caption "
          f"{accuracy['negation_in_caption']:.3f}, in foil {accuracy['negation_in_foil']:.3f}; {accuracy['pairs']} pairs)")
    return 0


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill PID`) stops the block like Ctrl-C does, so that its clean-up runs (the output
    folder's lock, Ray's processes, the running task recorded as interrupted)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a sweep spec; exit 1 when a task failed (the summary names each one), 130 when stopped
    by Ctrl-C (or SIGTERM) with one line saying how to resume."""
    from clip_lens import sweep

    executor = "ray" if args.ray or args.ray_address else "local"
    try:
        with _terminate_as_interrupt():
            result = sweep.run(args.spec, executor, ray_address=args.ray_address, workers=args.workers,
                               progress=not args.quiet)
    except KeyboardInterrupt:
        command = shlex.join(["clip-lens", *getattr(args, "argv", ["sweep", str(args.spec)])])
        print(f"\nclip-lens sweep: stopped; finished tasks are kept. Resume with the same command: {command}",
              file=sys.stderr)
        return 130
    print(result.summary())
    if result.report is not None:
        print(f"report: {result.report}")
    return 0 if result.ok else 1


def cmd_train_captioner(args: argparse.Namespace) -> int:
    import clip_lens
    from clip_lens import tiny
    from clip_lens.captioning import PrefixCaptioner, train

    if args.threads:
        torch.set_num_threads(args.threads)
    model = clip_lens.HookedCLIP.from_pretrained(tiny.NAME)
    _, report = train.train(model, steps=args.steps, seed=args.seed, n_scenes=args.scenes, lr=args.lr,
                            progress=not args.quiet, out=args.out)
    result = train.evaluate(PrefixCaptioner.load(args.out), model)
    print(f"trained {report.steps} steps in {report.seconds / 60:.1f} min (final loss {report.final_loss:.4f}); "
          f"wrote {args.out}")
    print(f"held-out one-shape scenes ({result['scenes']}, seed {train.EVAL_SEED}): {result['accuracy']:.1%} name the "
          f"shape with its colour (colour {result['colour']:.1%}, shape {result['shape']:.1%}; "
          f"{result['exact']:.1%} word for word)")
    return 0


def register(sub) -> None:
    check = sub.add_parser("check", help="check a model's hooked forward pass against open_clip's")
    check.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    check.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint file (default: random weights)")
    check.add_argument("--images", type=int, default=2, help="random images to compare on")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--tolerance", type=float, default=1e-5)
    check.set_defaults(func=cmd_check)

    sweep = sub.add_parser("sweep", help="models x datasets x studies from a TOML spec; resumes; --ray for Ray")
    sweep.add_argument("spec", type=Path, help="the sweep spec (docs/sweeps.md)")
    sweep.add_argument("--ray", action="store_true", help="run the tasks on a local Ray instance started for the sweep")
    sweep.add_argument("--ray-address", default=None, help="join an existing Ray cluster ('auto' or host:port)")
    sweep.add_argument("--workers", type=int, default=None, help="with Ray: at most this many workers")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(func=cmd_sweep)

    train_cap = sub.add_parser("train-captioner", help="train the prefix captioner of the tiny CLIP on shape scenes")
    train_cap.add_argument("--steps", type=int, default=2000)
    train_cap.add_argument("--seed", type=int, default=0)
    train_cap.add_argument("--scenes", type=int, default=20_000, help="training scenes (embedded once)")
    train_cap.add_argument("--lr", type=float, default=1e-3)
    train_cap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    train_cap.add_argument("--out", type=Path, default=Path("tiny-shapes-captioner.safetensors"))
    train_cap.add_argument("--quiet", action="store_true", help="no progress bar")
    train_cap.set_defaults(func=cmd_train_captioner)

    train = sub.add_parser("train-tiny", help="train the tiny CLIP on synthetic shape scenes")
    train.add_argument("--steps", type=int, default=2400)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    train.add_argument("--out", type=Path, default=Path("tiny-shapes.safetensors"))
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train_tiny)
