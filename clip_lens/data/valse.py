"""VALSE loading and the existence rephrasing of METHODS.md.

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

import pandas as pd

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
    `to_tokens`): equal length, one differing position. Pairs that fail the check raise."""
    kept, excluded = [], []
    for row in frame.itertuples(index=False):
        negation_in = "caption" if re.search(r"\bno\b", row.caption) else "foil"
        negated, other = (row.caption, row.foil) if negation_in == "caption" else (row.foil, row.caption)
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
        neg = tokenize(list(pairs["negated"]))
        non = tokenize(list(pairs["non_negated"]))
        for i, (a, b) in enumerate(zip(neg, non)):
            differ = int((a != b).sum())
            if differ != 1 or int(a.argmax()) != int(b.argmax()):
                raise ValueError(f"pair {pairs['id'][i]!r} ({pairs['negated'][i]!r} / {pairs['non_negated'][i]!r}) "
                                 f"differs at {differ} token positions after rephrasing; expected exactly one")
    return ExistencePairs(pairs, pd.DataFrame(excluded, columns=["id", "caption", "foil", "reason"]))
