"""`clip-lens browse-sae`: the latent browser of an SAE (clip_lens.sae.browser) over an image
folder or a file of texts, written as one self-contained HTML page."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clip_lens.cli.common import add_model_flags, model_from_args

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _lines(path: Path, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file (stripped), refused by name when there are none."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a UTF-8 text file ({error})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path} holds no {what} (one a line)")
    return lines


def _images(folder: Path) -> list[Path]:
    """The image files directly in `folder`, by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}" + (" (it is a file)" if folder.is_file() else ""))
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def _check_sae_path(path: Path) -> None:
    """Refuse a missing SAE before the model is loaded (clip_lens's layout: path.json + path.safetensors)."""
    for file in (path.with_suffix(".json"), path.with_suffix(".safetensors")):
        if not file.is_file():
            raise FileNotFoundError(f"--sae {path}: SAE file not found: {file} (clip_lens's layout is NAME.json "
                                    "beside NAME.safetensors)")


def cmd_browse_sae(args: argparse.Namespace) -> int:
    """Read the inputs, the concepts and the SAE, then write the page."""
    from clip_lens.sae import SparseAutoencoder
    from clip_lens.sae.browser import browser_data, write_browser

    _check_sae_path(args.sae)
    inputs = _images(args.images) if args.images is not None else _lines(args.texts, "texts")
    concepts = _lines(args.concepts, "concepts") if args.concepts is not None else None
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists: pass --overwrite to replace it")
    sae = SparseAutoencoder.load(args.sae)
    start = time.perf_counter()
    model, label = model_from_args(args)
    data = browser_data(model, sae.to(args.device), inputs, hook=args.hook, top=args.top, concepts=concepts,
                        rank_by=args.rank_by, concept_template=args.concept_template, batch_size=args.batch_size,
                        progress=not args.quiet)
    path = write_browser(data, args.out, title=f"Latents of {args.sae.name} on {data['hook']} ({label})")
    alive = sum(bool(latent["top"]) for latent in data["latents"])
    print(f"wrote {path}: {data['n_latents']} latents ({alive} fire on these {data['n_inputs']} inputs) in "
          f"{time.perf_counter() - start:.1f}s")
    return 0


def register(sub) -> None:
    parser = sub.add_parser("browse-sae", help="one self-contained HTML page of an SAE's latents: top inputs, "
                                               "patch heatmaps or token highlights, histograms, concepts")
    parser.add_argument("--sae", type=Path, required=True, help="an SAE saved by clip_lens (NAME for NAME.json + "
                                                                "NAME.safetensors)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of images (for an SAE on the vision tower)")
    source.add_argument("--texts", type=Path, help="text file, one text a line (for an SAE on the text tower)")
    parser.add_argument("--concepts", type=Path, default=None, help="text file of concept names, one a line: each "
                                                                    "latent's best-aligned names are shown")
    parser.add_argument("--concept-template", default="a photo of a {}.",
                        help="the text each concept name is read as, {} the name (default 'a photo of a {}.')")
    parser.add_argument("--hook", default=None, help="hook the SAE reads (default: the hook saved with the SAE)")
    parser.add_argument("--top", type=int, default=9, help="top inputs shown per latent (default 9)")
    parser.add_argument("--rank-by", choices=("pooled", "max"), default="pooled",
                        help="an input's score: the pooled position's activation, or the largest at any position")
    parser.add_argument("--batch-size", type=int, default=32)
    add_model_flags(parser)
    parser.add_argument("--out", type=Path, required=True, help="the HTML page to write (e.g. latents.html)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_browse_sae)
