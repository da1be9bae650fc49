"""`clip-lens cache-activations`: one hook's activations over an image folder or a text file,
written as an activation store (clip_lens.sae.store)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

from clip_lens.cli.common import add_model_flags, model_from_args, model_source


def _positions(value: str):
    """--positions: pooled, all, or a number sampled per input."""
    if value in ("pooled", "all"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r} is not 'pooled', 'all' or a positive number of positions")


def _shard_range(value: str) -> range:
    """--shards A:B (shards A to B-1) or A (one shard)."""
    start, _, stop = value.partition(":")
    try:
        return range(int(start), int(stop) if stop else int(start) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a shard range A:B (e.g. 0:8)") from None


def cmd_cache_activations(args: argparse.Namespace) -> int:
    from clip_lens.sae.store import ActivationStore, fill_store

    fill = dict(positions=args.positions, shard_size=args.shard_size, batch_size=args.batch_size, seed=args.seed,
                dtype=args.store_dtype)
    start = time.perf_counter()
    if args.ray:
        from clip_lens.sweep.activation_store import fill_store_on_ray

        if args.shards is not None:
            raise ValueError("--shards and --ray: Ray hands the workers their shard ranges itself; give one of them")
        source = model_source(args)
        label = source.label()
        result = fill_store_on_ray(source, args.images or args.texts, args.hook, args.out, workers=args.workers,
                                   address=args.ray_address, progress=not args.quiet, **fill)
    else:
        model, label = model_from_args(args)
        result = fill_store(model, args.images or args.texts, args.hook, args.out, progress=not args.quiet,
                            shards=args.shards, **fill)
    seconds = time.perf_counter() - start
    print(f"{label}: wrote {len(result.written)} shards, kept {len(result.kept)} already written, in {seconds:.1f}s")
    if result.complete:
        print(ActivationStore(args.out))
    else:
        print(f"{args.out} is not complete yet: the other shard ranges remain to be filled")
    return 0


# --- train-sae ---------------------------------------------------------------------------------
# each architecture's own training flags (train_sae's keyword of the same name, dashes for underscores)
TRAINING_FLAGS = ("aux_k", "aux_coefficient", "dead_after", "l0_coefficient", "bandwidth", "l1_coefficient")
CHECKPOINT_SUFFIX = ".checkpoint"


def _count(value: str) -> int:
    """A positive integer flag (--latents, --steps, --batch-size, --checkpoint-every)."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return int(value)


def _k(value: str):
    """--k: a positive number, kept an integer when it is one (TopK needs an integer)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of active latents") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r}: k must be positive")
    return int(number) if number.is_integer() else number


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_training_flags(args: argparse.Namespace) -> None:
    """Refuse, naming the flag, --k where the architecture has none (or its absence where it needs
    one) and a training flag of another architecture."""
    from clip_lens.sae.training import DEFAULTS, WITH_K

    arch = args.architecture
    if arch in WITH_K and args.k is None:
        raise ValueError(f"--architecture {arch} needs --k (active latents per input)")
    if arch not in WITH_K and args.k is not None:
        raise ValueError(f"--k is for --architecture {' or '.join(WITH_K)}, not {arch}")
    foreign = [_flag(name) for name in TRAINING_FLAGS if getattr(args, name) is not None and name not in DEFAULTS[arch]]
    if foreign:
        own = ", ".join(_flag(name) for name in DEFAULTS[arch])
        raise ValueError(f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not for --architecture {arch} "
                         f"(its own: {own})")


def sae_output(out: Path, layout: str) -> Path:
    """The path `clip_lens.sae.save` is given: the folder (saelens) or the stem of NAME.json +
    NAME.safetensors (clip_lens; a path ending in either suffix is taken as its stem)."""
    if layout == "clip_lens" and out.suffix in (".json", ".safetensors"):
        return out.with_suffix("")
    return out


def claim_sae_output(out: Path, layout: str, overwrite: bool) -> None:
    """Refuse an output that exists (without `overwrite`) or cannot be written in `layout`."""
    if layout == "saelens":
        if out.is_file():
            raise FileExistsError(f"--out {out} is a file; the saelens layout writes a folder")
        taken = [out] if out.is_dir() and any(out.iterdir()) else []
    else:
        if out.is_dir():
            raise FileExistsError(f"--out {out} is a folder; the clip_lens layout writes {out.name}.json and "
                                  f"{out.name}.safetensors (give a file stem, or --layout saelens)")
        taken = [p for p in (out.with_suffix(".json"), out.with_suffix(".safetensors")) if p.exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, taken))} exists: pass --overwrite to replace it, or choose "
                              "another --out")


def checkpoint_folder(out: Path) -> Path:
    """Where train-sae keeps its checkpoint: beside the output, NAME.checkpoint/."""
    return out.parent / (out.name + CHECKPOINT_SUFFIX)


def checkpoint_step(folder: Path) -> Optional[int]:
    """The step of the checkpoint in `folder`, or None when there is none."""
    import torch

    path = folder / "checkpoint.pt"
    if not path.is_file():
        return None
    return int(torch.load(path, weights_only=True, map_location="cpu", mmap=True)["step"])


def announce_resume(folder: Path, steps: int, restart: bool) -> None:
    """Say whether training resumes from a checkpoint; refuse one already past --steps."""
    step = None if restart else checkpoint_step(folder)
    if step is None:
        return
    if step > steps:
        raise ValueError(f"the checkpoint in {folder} is at step {step}, beyond --steps {steps}: pass --steps {step} "
                         "or more, or --restart to train afresh")
    print(f"resuming from the checkpoint in {folder} at step {step} of {steps}")


def open_store(folder: Path):
    """The activation store at --store, refused by name when it is not one."""
    from clip_lens.sae.store import ActivationStore

    if not folder.is_dir():
        raise FileNotFoundError(f"--store {folder}: no such folder (an activation store written by "
                                "clip-lens cache-activations)")
    return ActivationStore(folder)


def train_from_args(args: argparse.Namespace, store, checkpoints: Path):
    """train_sae on the store with the command's settings; (SAE, history)."""
    from clip_lens.sae.training import train_sae

    settings = {name: getattr(args, name) for name in TRAINING_FLAGS}
    try:
        return train_sae(store, args.latents, args.k, architecture=args.architecture, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, **settings,
                         checkpoint_dir=checkpoints, checkpoint_every=args.checkpoint_every,
                         resume=not args.restart, progress=not args.quiet, hook=store.manifest.get("hook"),
                         device=args.device)
    except ValueError as error:
        if str(error).startswith("checkpoint in"):  # a checkpoint of other settings: say how to start afresh here
            raise ValueError(f"{error}; from the command line: the same arguments as the run that wrote it, "
                             "or --restart") from None
        raise


def cmd_train_sae(args: argparse.Namespace) -> int:
    """Check the flags and the output, train from the store (resuming), save, print the statistics."""
    from clip_lens.sae import layouts
    from clip_lens.sae.training import STATISTICS_SAMPLE, sae_statistics

    check_training_flags(args)
    out = sae_output(args.out, args.layout)
    claim_sae_output(out, args.layout, args.overwrite)
    store = open_store(args.store)
    checkpoints = checkpoint_folder(out)
    announce_resume(checkpoints, args.steps, args.restart)
    start = time.perf_counter()
    sae, _ = train_from_args(args, store, checkpoints)
    seconds = time.perf_counter() - start
    model_name = (store.manifest.get("model") or {}).get("name")
    written = layouts.save(sae, out, layout=args.layout, **({"model_name": model_name} if args.layout == "saelens" else {}))
    stats = sae_statistics(sae, store)
    print(f"wrote {written} ({args.layout} layout; checkpoint in {checkpoints}) after {args.steps} steps in {seconds:.1f}s")
    print(f"{sae.architecture} SAE, {sae.n_latents} latents on {sae.hook}: explained variance "
          f"{stats['explained_variance']:.4f}, mean active latents {stats['mean_active']:.1f}, dead latents "
          f"{stats['dead_latents']} ({stats['dead_share']:.1%}) on {min(len(store), STATISTICS_SAMPLE)} vectors of the store")
    return 0


# --- evaluate-sae ------------------------------------------------------------------------------
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_images(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, label of each, classes) of an image folder laid out FOLDER/CLASS/IMAGE: the
    sub-folder names, sorted, are the classes; every image file directly inside one is labelled by
    it. An empty folder, one without sub-folders, an empty class or a loose image is refused by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder" + (" (it is a file)" if folder.is_file() else ""))
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    layout = f"{folder}/CLASS/IMAGE: one sub-folder per class, named by the class"
    if not classes:
        what = "is empty" if not any(folder.iterdir()) else "has no class sub-folders"
        raise ValueError(f"--images {folder} {what}; give an image folder laid out {layout}")
    loose = _image_files(folder)
    if loose:
        raise ValueError(f"--images {folder}: {loose[0].name} lies outside the class sub-folders "
                         f"({len(loose)} images do); the layout is {layout}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _image_files(folder / name)
        if not files:
            raise ValueError(f"--images {folder}: class sub-folder {name!r} holds no images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += files
        labels += [label] * len(files)
    return paths, labels, classes


def check_template(template: str) -> None:
    """--template must hold one {} for the class name."""
    try:
        filled = template.format("\0")
    except (IndexError, KeyError, ValueError) as error:
        raise ValueError(f"--template {template!r} is not a prompt with one {{}} for the class name ({error})") from None
    if filled.count("\0") != 1:
        raise ValueError(f"--template {template!r} must hold exactly one {{}} for the class name")


def load_sae_for(args: argparse.Namespace):
    """The SAE at --sae (either layout) with a hook that names its tower (--tower for one that does not)."""
    from clip_lens.hooks import split_tower_prefix
    from clip_lens.sae import layouts

    try:
        sae = layouts.load(args.sae, tower=args.tower)
    except ValueError as error:
        if "which tower" in str(error):  # a SAELens hook without a tower: the flag that says it
            raise ValueError(f"{error} (command line: --tower vision or --tower text)") from None
        raise
    if sae.hook is None:
        raise ValueError(f"--sae {args.sae}: the SAE records no hook, so there is no telling where it reads the model")
    if split_tower_prefix(sae.hook)[0] is None:
        if args.tower is None:
            raise ValueError(f"--sae {args.sae}: its hook {sae.hook!r} names no tower; pass --tower vision or --tower text")
        sae.hook = f"{args.tower}.{sae.hook}"
    return sae


def print_table(table) -> None:
    """The one-row table, a column a line."""
    row = table.iloc[0]
    width = max(map(len, table.columns))
    for column in table.columns:
        value = row[column]
        print(f"{column:<{width}}  {value:.4f}" if isinstance(value, float) else f"{column:<{width}}  {value}")


def cmd_evaluate_sae(args: argparse.Namespace) -> int:
    """Read the images and the SAE, load the model, evaluate, write and print the table."""
    from clip_lens.report import write_text_atomically
    from clip_lens.sae.evaluation import evaluate_sae

    check_template(args.template)
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists: pass --overwrite to replace it, or choose another --out")
    paths, labels, classes = class_images(args.images)
    sae = load_sae_for(args)
    model, label = model_from_args(args)
    start = time.perf_counter()
    table = evaluate_sae(model, sae.to(args.device), images=model.to_pixels(paths), labels=labels, classes=classes,
                         template=args.template, dense_above=args.dense_above, batch_size=args.batch_size)
    write_text_atomically(args.out, table.to_csv(index=False))
    print(f"{label}, {args.sae} on {len(paths)} images of {len(classes)} classes in {args.images}:")
    print_table(table)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


# --- the parsers -------------------------------------------------------------------------------
def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """The architecture, its size and train_sae's settings."""
    from clip_lens.sae.architectures import ARCHITECTURES

    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="topk", help="default topk")
    parser.add_argument("--latents", type=_count, required=True, help="number of latents (e.g. 8192)")
    parser.add_argument("--k", type=_k, default=None, help="active latents per input (topk, batchtopk)")
    parser.add_argument("--steps", type=_count, default=2000, help="training steps (default 2000)")
    parser.add_argument("--batch-size", type=_count, default=4096, help="vectors per step (default 4096)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batch order")
    parser.add_argument("--aux-k", type=int, default=None, help="topk, batchtopk: dead latents in the AuxK loss "
                                                                "(default d/2)")
    parser.add_argument("--aux-coefficient", type=float, default=None, help="topk, batchtopk: weight of AuxK (1/32)")
    parser.add_argument("--dead-after", type=int, default=None, help="topk, batchtopk: a latent silent for this "
                                                                     "many inputs is dead (10^7)")
    parser.add_argument("--l0-coefficient", type=float, default=None, help="jumprelu: weight of L0 (1e-3)")
    parser.add_argument("--bandwidth", type=float, default=None, help="jumprelu: straight-through width (1e-3)")
    parser.add_argument("--l1-coefficient", type=float, default=None, help="standard: weight of L1 (1e-2)")
    parser.add_argument("--checkpoint-every", type=_count, default=500, help="steps between checkpoints (default 500)")


def add_out_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", type=Path, required=True, help=what)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register_train(sub) -> None:
    parser = sub.add_parser("train-sae", help="train an SAE on an activation store (checkpoints; a rerun resumes)")
    parser.add_argument("--store", type=Path, required=True, help="activation store folder (clip-lens cache-activations)")
    add_training_flags(parser)
    parser.add_argument("--layout", choices=("clip_lens", "saelens"), default="clip_lens",
                        help="clip_lens: OUT.json + OUT.safetensors; saelens: folder OUT with cfg.json + "
                             "sae_weights.safetensors")
    parser.add_argument("--restart", action="store_true", help="ignore the checkpoint of an earlier run (OUT.checkpoint)")
    parser.add_argument("--device", default="cpu", help="torch device of the training, e.g. cpu, cuda")
    add_out_flags(parser, "the SAE to write; its checkpoint lies beside it in OUT.checkpoint/")
    parser.set_defaults(func=cmd_train_sae)


def register_evaluate(sub) -> None:
    parser = sub.add_parser("evaluate-sae", help="an SAE's evaluation table: explained variance, L0, dead and dense "
                                                 "latents, S and zero-shot accuracy recovered")
    parser.add_argument("--sae", type=Path, required=True, help="the SAE: NAME (NAME.json + NAME.safetensors) or a "
                                                                "SAELens folder")
    parser.add_argument("--tower", choices=("vision", "text"), default=None,
                        help="the tower of a SAELens SAE whose hook name carries none")
    parser.add_argument("--images", type=Path, required=True,
                        help="labelled images: FOLDER/CLASS/IMAGE, the sub-folder names are the classes")
    parser.add_argument("--template", default="a photo of a {}.", help="class prompt, {} the sub-folder's name")
    parser.add_argument("--dense-above", type=float, default=0.1, help="a latent firing on more of the vectors is dense")
    parser.add_argument("--batch-size", type=_count, default=32, help="images per forward pass")
    add_model_flags(parser)
    add_out_flags(parser, "the table to write (CSV)")
    parser.set_defaults(func=cmd_evaluate_sae)


def register(sub) -> None:
    cache = sub.add_parser("cache-activations",
                           help="store one hook's activations over images or texts as shards on disk (resumes)")
    source = cache.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, default=None, help="image folder (every image file, sorted by name)")
    source.add_argument("--texts", type=Path, default=None, help="text file, one sentence per line")
    cache.add_argument("--hook", required=True,
                       help="hook name with its tower prefix, e.g. vision.blocks.11.hook_resid_post")
    cache.add_argument("--positions", type=_positions, default="pooled",
                       help="pooled (class token / EOT), all (texts: up to EOT), or a number sampled per input")
    cache.add_argument("--shard-size", type=int, default=None,
                       help="vectors per shard, a multiple of the vectors per input (default about 65536)")
    cache.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass")
    cache.add_argument("--seed", type=int, default=0, help="seed of the sampled positions")
    cache.add_argument("--store-dtype", choices=["float32", "float16"], default="float32", help="dtype on disk")
    cache.add_argument("--shards", type=_shard_range, default=None,
                       help="fill only shards A:B (several processes, one range each, fill one store)")
    cache.add_argument("--ray", action="store_true", help="fill on Ray workers, each its own range of shards "
                                                          "(pip install 'clip_lens[ray]')")
    cache.add_argument("--workers", type=_count, default=None, help="with --ray: at most this many workers "
                                                                   "(default: as many as the cluster's CPUs)")
    cache.add_argument("--ray-address", default=None, help="with --ray: a running cluster ('auto' or host:port); "
                                                           "default: a local instance started for the run")
    cache.add_argument("--out", type=Path, required=True, help="the store's folder (a rerun resumes it)")
    cache.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_flags(cache)
    cache.set_defaults(func=cmd_cache_activations)
    register_train(sub)
    register_evaluate(sub)
