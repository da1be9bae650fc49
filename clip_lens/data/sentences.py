"""Sentences labelled negated or plain (docs/methods.md#negated-sentence), from VALSE pieces
(each instance's caption and foil) and CANNOT files (every distinct sentence), for text-tower
studies that need sentences rather than pairs (the sentence-SAE study).

    frame = negation_sentences(valse=["../shared/data/valse/existence.json"], cannot=["cannot-sources/"])
    frame.columns   # sentence, source, negated
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence, Union

import pandas as pd

from clip_lens.data.cannot import load_cannot
from clip_lens.data.valse import load_valse

NEGATORS = ("no", "not", "never", "nothing", "none", "nobody", "nowhere", "neither", "nor", "cannot", "without")
_NEGATED = re.compile(r"\b(?:" + "|".join(NEGATORS) + r")\b|n't\b", flags=re.IGNORECASE)


def is_negated(sentence: str) -> bool:
    """Whether `sentence` holds a negator word (`NEGATORS`, or a contraction ending in n't)."""
    return _NEGATED.search(sentence) is not None


def negation_sentences(valse: Sequence[Union[str, Path]] = (), cannot: Sequence[Union[str, Path]] = ()) -> pd.DataFrame:
    """Every distinct sentence of the VALSE pieces (each valid instance's caption, then its foil) and the
    CANNOT files, with its source file and whether it is negated; at least one source is needed."""
    if not valse and not cannot:
        raise ValueError("give VALSE pieces (valse=...) or CANNOT files (cannot=...): there is no sentence to read")
    parts = []
    for path in valse:
        pairs = load_valse(path)
        interleaved = [text for caption, foil in zip(pairs["caption"], pairs["foil"]) for text in (caption, foil)]
        parts.append(pd.DataFrame({"sentence": interleaved, "source": str(path)}))
    if cannot:
        parts.append(load_cannot(list(cannot))[["sentence", "source"]])
    frame = pd.concat(parts, ignore_index=True)
    frame = frame[frame["sentence"].str.strip() != ""].drop_duplicates("sentence").reset_index(drop=True)
    return frame.assign(negated=frame["sentence"].map(is_negated))
