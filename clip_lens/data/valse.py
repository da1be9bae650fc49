"""VALSE loading and the existence rephrasing of docs/methods.md#valse-existence-pairs.

Existence pairs are (negated, non-negated) sentences such as "There are no animals." /
"There are animals."; the non-negated one gets "some" before its subject, so that the two have the
same tokens but for the negator ("There are no animals." / "There are some animals.").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import pandas as pd
from jaxtyping import Float, Int

from clip_lens.images import path_in_folder

NEGATED = re.compile(r"^There (is|are) no (\S.*)$")
NON_NEGATED = re.compile(r"^There (is|are) (\S.*)$")
KEEP_DETERMINERS = {"a", "an", "some"}


def load_valse(path: Union[str, Path], min_caption_votes: int = 2) -> pd.DataFrame:
    """A VALSE piece as a DataFrame (one row per instance), keeping valid instances only
    (`mturk.caption >= min_caption_votes`). Raises a ValueError naming the file when it is not
    a VALSE foil file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VALSE file not found: {path}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, dict) and {"caption", "foil", "mturk"} <= set(v) for v in data.values()):
        raise ValueError(f"{path} is not a VALSE foil file (a JSON object of instances with caption, foil and mturk)")
    rows = [dict(id=key, caption=v["caption"], foil=v["foil"], image_file=v.get("image_file"),
                 caption_votes=v["mturk"].get("caption", 0)) for key, v in data.items()]
    frame = pd.DataFrame(rows)
    return frame[frame["caption_votes"] >= min_caption_votes].reset_index(drop=True)


def rephrase_non_negated(sentence: str) -> str:
    """Insert "some" before the subject of "There is/are <subject> ..." unless a/an/some is there."""
    match = NON_NEGATED.match(sentence)
    if match is None:
        raise ValueError(f"not a 'There is/are ...' sentence: {sentence!r}")
    rest = match.group(2)
    if rest.split()[0].lower() in KEEP_DETERMINERS:
        return sentence
    return f"There {match.group(1)} some {rest}"


@dataclass
class ExistencePairs:
    """Kept pairs (columns: id, caption, foil, image_file, negation_in, negated, non_negated) and
    exclusions (id, caption, foil, reason)."""

    pairs: pd.DataFrame
    excluded: pd.DataFrame


def prepare_existence(frame: pd.DataFrame, tokenize: Callable[[list[str]], "object"]) -> ExistencePairs:
    """Apply the existence rephrasing and check every kept pair with `tokenize` (a model's
    `to_tokens`): equal length, one differing position. A pair that fails the check joins the
    exclusion table with its reason, as every other excluded pair does."""
    kept, excluded = [], []
    for row in frame.itertuples(index=False):
        negation_in = "caption" if re.search(r"\bno\b", row.caption) else "foil"
        negated, other = (row.caption, row.foil) if negation_in == "caption" else (row.foil, row.caption)
        if not (row.caption.rstrip().endswith(".") and row.foil.rstrip().endswith(".")):
            excluded.append(dict(id=row.id, caption=row.caption, foil=row.foil,
                                 reason="caption or foil does not end with '.' (the aligned positions need it)"))
            continue
        if NEGATED.match(negated) is None:
            excluded.append(dict(id=row.id, caption=row.caption, foil=row.foil,
                                 reason="negated sentence does not follow 'There is/are no <subject> ...'"))
            continue
        try:
            non_negated = rephrase_non_negated(other)
        except ValueError:
            excluded.append(dict(id=row.id, caption=row.caption, foil=row.foil,
                                 reason="non-negated sentence does not follow 'There is/are <subject> ...'"))
            continue
        caption, foil = (negated, non_negated) if negation_in == "caption" else (non_negated, negated)
        kept.append(dict(id=row.id, caption=caption, foil=foil, image_file=row.image_file,
                         negation_in=negation_in, negated=negated, non_negated=non_negated))
    pairs = pd.DataFrame(kept)
    if len(pairs):
        both = tokenize(list(pairs["negated"]) + list(pairs["non_negated"]))  # one width for both sides
        neg, non = both[: len(pairs)], both[len(pairs):]
        aligned = []
        for i, (a, b) in enumerate(zip(neg, non)):
            differ = int((a != b).sum())
            aligned.append(differ == 1 and int(a.argmax()) == int(b.argmax()))
            if not aligned[-1]:
                excluded.append(dict(id=pairs["id"][i], caption=pairs["caption"][i], foil=pairs["foil"][i],
                                     reason=f"differs at {differ} token positions after rephrasing (one is needed)"))
        pairs = pairs[aligned].reset_index(drop=True)
    return ExistencePairs(pairs, pd.DataFrame(excluded, columns=["id", "caption", "foil", "reason"]))


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
@dataclass
class ResolvedImages:
    """Pairs whose image was found (with an `image_path` column) and those whose image was not
    (id, image_file)."""

    pairs: pd.DataFrame
    missing: pd.DataFrame


def resolve_images(pairs: pd.DataFrame, image_dir: Union[str, Path], missing: str = "raise") -> ResolvedImages:
    """Find each pair's `image_file` in `image_dir`.

    Args:
        missing: "raise" (a FileNotFoundError naming the missing files) or "skip" (drop those pairs
            and report them in `ResolvedImages.missing`).
    """
    if missing not in ("raise", "skip"):
        raise ValueError(f"missing must be 'raise' or 'skip', not {missing!r}")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Image folder not found: {image_dir}")
    paths = [path_in_folder(image_dir, name, f"VALSE instance {key}") for key, name in zip(pairs["id"], pairs["image_file"])]
    found = np.array([p.is_file() for p in paths], dtype=bool)
    absent = pairs.loc[~found, ["id", "image_file"]].reset_index(drop=True)
    if len(absent) and missing == "raise":
        names = ", ".join(absent["image_file"].astype(str).head(5))
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise FileNotFoundError(
            f"{len(absent)} image(s) missing from {image_dir}: {names}{more}. "
            "Put VALSE's Visual7W images there, or pass missing='skip' (CLI: --missing-images skip) "
            "to drop those instances with a report."
        )
    kept = pairs.loc[found].copy()
    kept["image_path"] = [str(p) for p, ok in zip(paths, found) if ok]
    return ResolvedImages(kept.reset_index(drop=True), absent)


# ---------------------------------------------------------------------------------------------
# aligned positions
# ---------------------------------------------------------------------------------------------
# Existence sentences tokenise as  SOT There is/are <negator> <subject> [more ...] . EOT, so one
# layout serves all instances; the "further subject tokens" slot takes the mean of a variable
# number of positions (none for one-token subjects).
ALIGNED_SLOTS = ("SOT", "There", "is/are", "negator", "subject", "further subject", ".", "EOT")
NEGATOR_POSITION = 3
FURTHER_SLOT = ALIGNED_SLOTS.index("further subject")


def align_positions(values: Float[np.ndarray, "n ... pos"], eot: Int[np.ndarray, " n"]) -> tuple[np.ndarray, np.ndarray]:
    """Map per-position values of existence sentences onto the 8 aligned slots.

    Args:
        values: [n, ..., pos] (positions beyond a row's EOT are ignored).
        eot: [n], each row's EOT position (the '.' is at eot - 1).

    Returns:
        aligned [n, ..., 8] (the further-subject slot is the mean over positions 5..eot-2, 0 when
        there are none) and further_counts [n], the number of those positions (the weight of that
        slot when averaging over instances: see `weighted_slot_mean`).
    """
    values = np.asarray(values, dtype=float)
    eot = np.asarray(eot, dtype=int)
    if (eot < NEGATOR_POSITION + 3).any():
        bad = int(np.flatnonzero(eot < NEGATOR_POSITION + 3)[0])
        raise ValueError(f"row {bad}: EOT at {eot[bad]} is too early for 'There is/are <negator> <subject> .'")
    aligned = np.zeros(values.shape[:-1] + (len(ALIGNED_SLOTS),))
    counts = eot - 1 - (NEGATOR_POSITION + 2)
    for i, end in enumerate(eot):
        row = values[i]
        aligned[i, ..., :5] = row[..., :5]
        aligned[i, ..., FURTHER_SLOT] = row[..., 5:end - 1].mean(axis=-1) if counts[i] else 0.0
        aligned[i, ..., 6] = row[..., end - 1]
        aligned[i, ..., 7] = row[..., end]
    return aligned, counts


def weighted_slot_mean(aligned: Float[np.ndarray, "n ... 8"], further_counts: Int[np.ndarray, " n"]) -> np.ndarray:
    """Mean over instances [..., 8], the further-subject slot weighted by each instance's number of
    further tokens (so it is the mean over all such tokens; 0 when no instance has any)."""
    aligned = np.asarray(aligned, dtype=float)
    mean = aligned.mean(axis=0)
    weights = np.asarray(further_counts, dtype=float).reshape((-1,) + (1,) * (aligned.ndim - 2))
    total = weights.sum()
    mean[..., FURTHER_SLOT] = (aligned[..., FURTHER_SLOT] * weights).sum(axis=0) / total if total else 0.0
    return mean
