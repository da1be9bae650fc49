"""Minimal pairs from any dataset: two texts that differ in one span of tokens, an optional image,
and which text is correct (docs/methods.md#minimal-pairs).

Every loader returns `MinimalPairs`: the kept pairs with their differing token span, checked with
the model's tokenizer, and an exclusion table with a reason for every pair left out, so that no
pair is dropped silently. Loaders: every VALSE piece (`valse_pairs`), VALSE existence through its
rephrasing (`valse_existence_pairs`), and a user's CSV or JSONL file (`read_pairs_file`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
from torch import Tensor

from clip_lens.data.valse import load_valse, prepare_existence

Tokenize = Callable[[list[str]], Tensor]  # texts -> [n, context_length] token ids, padded, EOT the largest id
PAIR_COLUMNS = ["id", "a", "b", "correct", "image", "span_start", "span_end", "length"]
EXCLUDED_COLUMNS = ["id", "a", "b", "reason"]


@dataclass
class MinimalPairs:
    """Minimal pairs of one task, checked with one tokenizer.

    Attributes:
        name: the task's name (e.g. "valse/foil-it").
        pairs: one row per kept pair: id, a, b (the two texts), correct ("a" or "b": the text that
            describes the image; VALSE's caption is a), image (a file name or path, or None),
            span_start, span_end (the token positions [start, end) where a and b differ; position
            0 is the start token), length (tokens up to and including EOT, the same for a and b).
        excluded: one row per pair left out: id, a, b, reason.
    """

    name: str
    pairs: pd.DataFrame
    excluded: pd.DataFrame

    def __len__(self) -> int:
        return len(self.pairs)

    def summary(self) -> pd.DataFrame:
        """Counts of kept pairs and of exclusions by reason: outcome, pairs."""
        kept = pd.DataFrame({"outcome": ["kept"], "pairs": [len(self.pairs)]})
        reasons = self.excluded["reason"].value_counts().rename_axis("outcome").reset_index(name="pairs")
        return pd.concat([kept, reasons], ignore_index=True)


def refuse_if_none_kept(found: Sequence[MinimalPairs], what: str = "file") -> None:
    """A ValueError when none of `found` keeps a pair, with the count of exclusions per reason over
    all of them: a study on no pair would write an empty report that looks like a finished run.

    Args:
        what: what each `MinimalPairs` came from, for the message ("file", "task").
    """
    if any(len(pairs) for pairs in found):
        return
    excluded = [pairs.excluded for pairs in found if len(pairs.excluded)]
    if not excluded:
        raise ValueError(f"no pair to run: the {what}s given hold no pairs")
    reasons = pd.concat(excluded, ignore_index=True)["reason"].value_counts()
    raise ValueError(f"every pair was excluded ({int(reasons.sum())} in {len(found)} {what}(s)), so there is nothing "
                     "to run. Exclusions per reason: " + "; ".join(f"{reason}: {n}" for reason, n in reasons.items()))


def check_pairs(name: str, rows: pd.DataFrame, tokenize: Tokenize) -> MinimalPairs:
    """Keep the rows (id, a, b, correct, image) whose texts are different, fit the context, have
    the same token length and differ in one contiguous span of tokens; the others join the
    exclusion table with the reason."""
    rows = rows.reset_index(drop=True)
    if rows.empty:
        return MinimalPairs(name, pd.DataFrame(columns=PAIR_COLUMNS), pd.DataFrame(columns=EXCLUDED_COLUMNS))
    tokens = tokenize(list(rows["a"]) + list(rows["b"])).cpu().numpy()      # [2n, context]
    n, context = len(rows), tokens.shape[1]
    ends = tokens.argmax(axis=1)                                            # EOT, the largest id
    kept, excluded = [], []
    for i, row in enumerate(rows.itertuples(index=False)):
        a_tokens, b_tokens, a_end, b_end = tokens[i], tokens[n + i], int(ends[i]), int(ends[n + i])
        reason = None
        if row.a == row.b:
            reason = "the two texts are equal"
        elif max(a_end, b_end) >= context - 1:
            reason = f"fills all {context} token slots (may be cut to fit)"
        elif a_end != b_end:
            reason = "unequal token lengths"
        else:
            spans = _spans(a_tokens[: a_end + 1] != b_tokens[: b_end + 1])
            if len(spans) == 0:
                reason = "the two texts have the same tokens"
            elif len(spans) > 1:
                reason = "differs in more than one span of tokens"
        if reason is not None:
            excluded.append(dict(id=row.id, a=row.a, b=row.b, reason=reason))
            continue
        (start, end), = spans
        kept.append(dict(id=row.id, a=row.a, b=row.b, correct=row.correct, image=row.image, span_start=start,
                         span_end=end, length=a_end + 1))
    return MinimalPairs(name, pd.DataFrame(kept, columns=PAIR_COLUMNS), pd.DataFrame(excluded, columns=EXCLUDED_COLUMNS))


def _spans(differs: np.ndarray) -> list[tuple[int, int]]:
    """The contiguous runs [start, end) of True in a 1-d bool array."""
    edges = np.diff(np.concatenate([[0], differs.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


# loaders -------------------------------------------------------------------------------------------
VALSE_PIECES = ("existence", "plurals", "counting-hard", "counting-small-quant", "counting-adversarial", "relations",
                "action-replacement", "actant-swap", "coreference-standard", "coreference-hard", "foil-it")


def valse_pairs(path: Union[str, Path], tokenize: Tokenize, min_caption_votes: int = 2,
                name: Optional[str] = None) -> MinimalPairs:
    """One VALSE piece as minimal pairs: a = caption (correct), b = foil, the instance's image file.
    Invalid instances (`mturk.caption < min_caption_votes`, VALSE's validity filter) are excluded with
    that reason. For existence the pairs are the raw caption and foil; `valse_existence_pairs`
    gives the rephrased ones the negation studies use."""
    path = Path(path)
    name = name or f"valse/{path.stem}"
    frame = load_valse(path, min_caption_votes=0)
    bad = [i for i, (c, f) in enumerate(zip(frame["caption"], frame["foil"])) if not (isinstance(c, str) and isinstance(f, str))]
    if bad:
        raise ValueError(f"{path}: instance {frame['id'][bad[0]]!r} has a caption or foil that is not one text")
    frame = frame.assign(a=frame["caption"], b=frame["foil"], correct="a", image=frame["image_file"])
    invalid = frame["caption_votes"] < min_caption_votes
    checked = check_pairs(name, frame[~invalid], tokenize)
    votes = pd.DataFrame({"id": frame["id"][invalid], "a": frame["a"][invalid], "b": frame["b"][invalid],
                          "reason": f"invalid in VALSE (fewer than {min_caption_votes} annotators chose the caption)"})
    excluded = pd.concat([votes, checked.excluded], ignore_index=True) if len(votes) else checked.excluded
    return MinimalPairs(name, checked.pairs, excluded)


def valse_existence_pairs(path: Union[str, Path], tokenize: Tokenize, min_caption_votes: int = 2) -> MinimalPairs:
    """VALSE existence through the negation studies' rephrasing (docs/methods.md#valse-existence-pairs):
    a = the caption, b = the foil, after "some" is inserted in the non-negated sentence."""
    prepared = prepare_existence(load_valse(path, min_caption_votes), tokenize)
    rows = prepared.pairs.assign(a=prepared.pairs["caption"], b=prepared.pairs["foil"], correct="a",
                                 image=prepared.pairs["image_file"])
    checked = check_pairs("valse/existence (rephrased)", rows, tokenize)
    excluded = prepared.excluded.rename(columns={"caption": "a", "foil": "b"})[EXCLUDED_COLUMNS]
    return MinimalPairs(checked.name, checked.pairs, pd.concat([excluded, checked.excluded], ignore_index=True))


def read_pairs_file(path: Union[str, Path], tokenize: Tokenize, images: Optional[Union[str, Path]] = None,
                    name: Optional[str] = None) -> MinimalPairs:
    """A user's pairs: a CSV or JSONL file with columns `caption` (the correct text), `foil`, and
    optionally `image` (a path, relative to `images` or else to the file's folder), and `id`.

    The file is UTF-8 (a byte-order mark is allowed) or UTF-16 with its byte-order mark. A file
    that cannot be read as such, a CSV line with more or fewer fields than the header (a text
    holding a comma must be quoted), a JSONL line that is not a JSON object, and an empty file are
    errors naming the file and line (`read_pairs_table`). A missing column, an empty text, a pair
    whose texts are equal or an image that does not exist is an error naming the file and row
    (rows count from 1, after the CSV header); pairs that the tokenizer finds unequal in length or
    differing in more than one span are excluded with the reason."""
    path = Path(path)
    frame = read_pairs_table(path)
    for column in ("caption", "foil"):
        if column not in frame.columns:
            raise ValueError(f"{path} has no column {column!r} (columns: {', '.join(map(str, frame.columns))}); a "
                             "pairs file needs caption and foil, and may have image and id")
    folder = Path(images) if images is not None else path.parent
    has_image = "image" in frame.columns
    for row, record in enumerate(frame.to_dict("records"), start=1):
        caption, foil = record["caption"], record["foil"]
        for column, text in (("caption", caption), ("foil", foil)):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}, row {row}: {column} is empty or not a text ({text!r})")
        if caption == foil:
            raise ValueError(f"{path}, row {row}: caption and foil are the same text ({caption!r})")
        if has_image and not (folder / str(record["image"])).is_file():
            raise FileNotFoundError(f"{path}, row {row}: image {record['image']!r} not found in {folder}")
    ids = frame["id"].astype(str) if "id" in frame.columns else pd.Series([str(i) for i in range(1, len(frame) + 1)])
    rows = pd.DataFrame({"id": ids, "a": frame["caption"], "b": frame["foil"], "correct": "a",
                         "image": [str(folder / str(i)) for i in frame["image"]] if has_image else None})
    return check_pairs(name or path.stem, rows, tokenize)


def read_pairs_table(path: Union[str, Path]) -> pd.DataFrame:
    """The rows of a pairs file (.csv or .jsonl), one per pair, as written (CSV values are texts,
    JSONL values as JSON gives them); no column is taken for an index. Every problem reading it is
    a ValueError (a FileNotFoundError when it does not exist) naming the file, and the line where
    there is one."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a pairs file: give a .csv or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"{path}: pairs files are .csv or .jsonl")
    text = _pairs_text(path)
    frame = _csv_rows(path, text) if suffix == ".csv" else _jsonl_rows(path, text)
    if frame.empty:
        raise ValueError(f"{path} holds no pairs")
    return frame


def _pairs_text(path: Path) -> str:
    """The file's text: UTF-16 when it starts with UTF-16's byte-order mark, else UTF-8 (a UTF-8
    byte-order mark dropped); anything else is a ValueError naming the file and line."""
    data = path.read_bytes()
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1 if encoding == "utf-8-sig" else None
        where = f", line {line}" if line is not None else ""
        raise ValueError(f"{path}{where}: not {encoding.removesuffix('-sig').upper()} text ({error.reason} at byte "
                         f"{error.start}); save the pairs file as UTF-8") from None


def _csv_rows(path: Path, text: str) -> pd.DataFrame:
    """A CSV's records under its header (blank lines skipped); a record with more or fewer fields
    than the header, a repeated column or a quoting error is a ValueError naming the line."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, rows = None, []
    try:
        for record in reader:
            if not record:
                continue
            if header is None:
                header = _csv_header(path, record, reader.line_num)
            elif len(record) != len(header):
                raise ValueError(
                    f"{path}, line {reader.line_num}: {len(record)} fields, but the header has {len(header)} "
                    f"({', '.join(header)}); a text holding a comma must be quoted (\"a, b\")")
            else:
                rows.append(record)
    except csv.Error as error:
        raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({error})") from None
    return pd.DataFrame(rows, columns=header or [], dtype=object)


def _csv_header(path: Path, header: list[str], line: int) -> list[str]:
    """The column names, each once."""
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}, line {line}: the header names column {repeated[0]!r} more than once")
    return header


def _jsonl_rows(path: Path, text: str) -> pd.DataFrame:
    """One JSON object per non-blank line; anything else is a ValueError naming the line."""
    records = []
    for line, content in enumerate(text.split("\n"), start=1):  # not splitlines: JSON texts may hold U+2028
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {line}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {line}: expected a JSON object with caption and foil, got "
                             f"{type(record).__name__}")
        records.append(record)
    return pd.DataFrame.from_records(records) if records else pd.DataFrame()


def cannot_pairs(paths, tokenize: Tokenize, spacy_model: str = "en_core_web_sm", nlp=None,
                 progress: bool = True) -> MinimalPairs:
    """CANNOT's sentences in which "no" is a determiner (docs/methods.md#cannot-pairs) as minimal
    pairs: a = the negated sentence, b = its "some" counterpart, no image (so no correct text).
    Sentences the parse or the tokenizer leaves out are in `excluded` with the reason."""
    from clip_lens.data.cannot import load_cannot, no_determiner_pairs

    found = no_determiner_pairs(load_cannot(paths), tokenize=tokenize, spacy_model=spacy_model, nlp=nlp,
                                progress=progress)
    rows = pd.DataFrame({"id": [f"cannot-{i}" for i in range(len(found.pairs))], "a": found.pairs["negated"],
                         "b": found.pairs["non_negated"], "correct": "", "image": None})
    checked = check_pairs("cannot", rows, tokenize)
    dropped = pd.DataFrame({"id": [f"cannot-dropped-{i}" for i in range(len(found.dropped))],
                            "a": found.dropped["sentence"], "b": "", "reason": found.dropped["reason"]})
    return MinimalPairs("cannot", checked.pairs, pd.concat([dropped, checked.excluded], ignore_index=True))


def load_valse_pieces(folder: Union[str, Path], tokenize: Tokenize,
                      pieces: Sequence[str] = VALSE_PIECES) -> dict[str, MinimalPairs]:
    """Every VALSE piece in `folder` (each `<piece>.json`) as minimal pairs, by piece name."""
    folder = Path(folder)
    missing = [piece for piece in pieces if not (folder / f"{piece}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no VALSE piece {missing[0]!r} in {folder} ({folder / (missing[0] + '.json')})")
    return {piece: valse_pairs(folder / f"{piece}.json", tokenize) for piece in pieces}
