"""`clip-lens attention-cancellation` and `clip-lens attribution`."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_lens.cli.common import run_command, study_parser


def _add_image_flags(parser: argparse.ArgumentParser, captions_help: str) -> None:
    parser.add_argument("--images", type=Path, default=None,
                        help="image folder (labels from labels.csv or sub-folders); default: scikit-image's sample photos")
    parser.add_argument("--captions", type=Path, default=None, help=captions_help)
    parser.add_argument("--labels", type=Path, default=None, help="CSV with columns image, label (default: folder/labels.csv)")


def _image_set(args: argparse.Namespace):
    """(the image set of --images/--captions/--labels, or scikit-image's sample photos written to
    --out/sample_images; the sources that identify it)."""
    from clip_lens.data.image_sets import open_image_set

    image_set = open_image_set(args.images, args.captions, args.labels, args.out / "sample_images")
    sources = {key: value for key, value in (("images", args.images), ("captions", args.captions),
                                             ("labels", args.labels)) if value is not None}
    return image_set, sources or {"images": image_set.source}


def _file_source(value) -> dict:
    """A file or folder an option names (a captioner, an SAE), digested into the run's identity."""
    if value is None:
        return {}
    path = Path(value)
    files = [path, path.with_suffix(".safetensors"), path.with_suffix(".json")]
    return {str(value): [str(f) for f in files if f.exists()]} if any(f.exists() for f in files) else {}


def cmd_attention_cancellation(args: argparse.Namespace) -> int:
    from clip_lens.studies import attention_cancellation

    def make_data(model, options):
        image_set, sources = _image_set(args)
        return image_set, {**sources, **_file_source(options.captioner)}

    def summary(tables: dict) -> str:
        text = tables["summary"].to_string(index=False)
        if "captions_by_setting" in tables:
            text += "\n" + tables["captions_by_setting"].to_string(index=False)
        return text

    return run_command(args, attention_cancellation.STUDY, make_data, summary)


def cmd_attribution(args: argparse.Namespace) -> int:
    from clip_lens.sae import write_browser
    from clip_lens.studies import attribution

    trained: list = []
    pages: list = []

    def make_data(model, options):
        image_set, sources = _image_set(args)
        data = attribution.AttributionData(image_set, trained.append, pages.append)
        return data, {**sources, **_file_source(options.sae)}

    def summary(tables: dict) -> str:
        reliance = tables["reliance"]
        return (f"{tables['deletion_areas'].to_string(index=False)}\n{int(reliance['unexpected'].sum())} of "
                f"{len(reliance)} relied-on latents are unexpected (low alignment with their class)")

    code = run_command(args, attribution.STUDY, make_data, summary)
    if trained:  # the SAE trained in the run, beside its tables (--sae loads it into another run)
        trained[-1].save(args.out / "sae")
    if pages:  # the latent browser the report's latents link to
        write_browser(pages[-1], args.out / attribution.BROWSER_PAGE, title="SAE latents of the attribution run")
    return code


def register(sub) -> None:
    from clip_lens.studies import attention_cancellation, attribution

    cancel = study_parser(sub, "attention-cancellation", attention_cancellation.STUDY,
                          "cancel self-attention in vision layers; attention maps")
    _add_image_flags(cancel, "candidate captions, one per line ('label<TAB>caption')")
    cancel.set_defaults(func=cmd_attention_cancellation)

    attr = study_parser(sub, "attribution", attribution.STUDY, "attribute scores to heads, neurons, positions and SAE "
                                                               "latents; Logit Lens and its faithfulness")
    _add_image_flags(attr, "one 'label<TAB>caption' per line: each image is scored against its label's caption")
    attr.set_defaults(func=cmd_attribution)
