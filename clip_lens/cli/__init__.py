"""The `clip-lens` command: one module per group of sub-commands, each adding its parsers."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from clip_lens.cli import circuits, demo, negation, pairs, sae, sae_browse, tools, vision

COMMAND_GROUPS = (tools, negation, vision, demo, circuits, pairs, sae, sae_browse)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-lens", description="Mechanistic interpretability for CLIP.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random init on every build
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded in each study's manifest
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, RuntimeError, ValueError) as err:  # bad input: say what, not where
        if args.debug:
            raise
        print(f"clip-lens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
