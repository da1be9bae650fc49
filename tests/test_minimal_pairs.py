"""Minimal pairs (docs/methods.md#minimal-pairs): every VALSE piece loads with its kept and
excluded counts pinned (ViT-B-32's tokenizer), existence through the rephrasing gives the negation
studies' pairs, and a user's file is checked row by row."""

import open_clip
import pandas as pd
import pytest
from conftest import SHARED_DATA

from clip_lens.data import VALSE_PIECES, check_pairs, load_valse_pieces, prepare_existence, read_pairs_file, valse_existence_pairs
from clip_lens.data.valse import load_valse
from clip_lens.tokenization import Tokenizer

VALSE = SHARED_DATA / "valse"
INVALID = "invalid in VALSE (fewer than 2 annotators chose the caption)"
UNEQUAL, SPANS = "unequal token lengths", "differs in more than one span of tokens"

# piece: (kept, {reason: excluded}, kept pairs that differ in exactly one token)
EXPECTED = {
    "existence": (82, {UNEQUAL: 423, INVALID: 29}, 82),
    "plurals": (34, {UNEQUAL: 813, INVALID: 149, SPANS: 4}, 0),
    "counting-hard": (560, {SPANS: 195, INVALID: 132, UNEQUAL: 113}, 554),
    "counting-small-quant": (337, {SPANS: 497, INVALID: 100, UNEQUAL: 66}, 322),
    "counting-adversarial": (459, {SPANS: 134, UNEQUAL: 98, INVALID: 65}, 457),
    "relations": (535, {INVALID: 79}, 535),
    "action-replacement": (334, {UNEQUAL: 314, INVALID: 131}, 249),
    "actant-swap": (150, {SPANS: 432, UNEQUAL: 367, INVALID: 93}, 0),
    "coreference-standard": (708, {INVALID: 208}, 708),
    "coreference-hard": (104, {INVALID: 37}, 104),
    "foil-it": (894, {INVALID: 57, UNEQUAL: 47, SPANS: 2}, 894),
}


@pytest.fixture(scope="module")
def tokenize():
    return Tokenizer.from_open_clip(open_clip.get_tokenizer("ViT-B-32"))


def test_every_valse_piece_loads_with_its_counts(tokenize):
    assert set(EXPECTED) == set(VALSE_PIECES)
    pieces = load_valse_pieces(VALSE, tokenize)
    for piece, (kept, reasons, one_token) in EXPECTED.items():
        pairs = pieces[piece]
        assert len(pairs) == kept, piece
        assert pairs.excluded["reason"].value_counts().to_dict() == reasons, piece
        assert len(pairs) + len(pairs.excluded) == len(load_valse(VALSE / f"{piece}.json", min_caption_votes=0))
        assert int(((pairs.pairs["span_end"] - pairs.pairs["span_start"]) == 1).sum()) == one_token, piece
        summary = pairs.summary().set_index("outcome")["pairs"]
        assert summary["kept"] == kept and summary.drop("kept").to_dict() == reasons


def test_spans_are_where_the_tokens_differ(tokenize):
    pairs = load_valse_pieces(VALSE, tokenize, pieces=["foil-it", "counting-hard"])
    for piece in pairs.values():
        rows = piece.pairs.head(50)
        a, b = tokenize(list(rows["a"])), tokenize(list(rows["b"]))
        for i, row in enumerate(rows.itertuples()):
            differ = (a[i] != b[i]).nonzero().flatten().tolist()
            assert differ == list(range(row.span_start, row.span_end))
            assert int(a[i].argmax()) + 1 == int(b[i].argmax()) + 1 == row.length


def test_existence_through_the_rephrasing_gives_the_studies_pairs(tokenize):
    pairs = valse_existence_pairs(VALSE / "existence.json", tokenize)
    studies = prepare_existence(load_valse(VALSE / "existence.json"), tokenize)
    assert len(pairs) == len(studies.pairs) == 490
    assert pairs.pairs["a"].tolist() == studies.pairs["caption"].tolist()
    assert pairs.pairs["b"].tolist() == studies.pairs["foil"].tolist()
    assert (pairs.pairs["span_end"] - pairs.pairs["span_start"] == 1).all()  # the negator and its twin


def test_check_pairs_names_each_reason(tokenize):
    rows = pd.DataFrame({"id": ["same", "long", "length", "two", "ok"],
                         "a": ["a dog.", "dog " * 80, "a dog.", "a red dog on a mat.", "a red dog."],
                         "b": ["a dog.", "cat " * 80, "a big dog.", "a blue dog on the mat.", "a blue dog."],
                         "correct": "a", "image": None})
    checked = check_pairs("made up", rows, tokenize)
    assert checked.pairs["id"].tolist() == ["ok"] and checked.pairs["span_start"].tolist() == [2]
    assert dict(zip(checked.excluded["id"], checked.excluded["reason"])) == {
        "same": "the two texts are equal", "long": "fills all 77 token slots (may be cut to fit)",
        "length": UNEQUAL, "two": SPANS}


def _write(path, frame, folder):
    (folder / "images").mkdir(exist_ok=True)
    (folder / "images" / "dog.png").write_bytes(b"not read here")
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_users_file(tmp_path, tokenize, suffix):
    frame = pd.DataFrame({"caption": ["a red dog.", "a dog."], "foil": ["a blue dog.", "a big dog."],
                          "image": ["images/dog.png", "images/dog.png"]})
    pairs = read_pairs_file(_write(tmp_path / f"mine{suffix}", frame, tmp_path), tokenize)
    assert pairs.pairs["a"].tolist() == ["a red dog."] and pairs.pairs["image"].iloc[0].endswith("images/dog.png")
    assert pairs.excluded["reason"].tolist() == [UNEQUAL] and pairs.name == "mine"


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"caption": ["a red dog."], "image": ["images/dog.png"]}), "has no column 'foil'"),
    (pd.DataFrame({"caption": ["a red dog.", "a dog."], "foil": ["a blue dog.", "a dog."]}),
     "row 2: caption and foil are the same text"),
    (pd.DataFrame({"caption": ["a red dog."], "foil": ["a blue dog."], "image": ["images/cat.png"]}),
     "row 1: image 'images/cat.png' not found"),
    (pd.DataFrame({"caption": ["a red dog.", ""], "foil": ["a blue dog.", "a dog."]}), "row 2: caption is empty"),
])
def test_a_bad_users_file_is_named(tmp_path, tokenize, frame, message):
    path = _write(tmp_path / "mine.csv", frame, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_pairs_file(path, tokenize)
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        read_pairs_file(_write(tmp_path / "mine.tsv", frame, tmp_path), tokenize)
