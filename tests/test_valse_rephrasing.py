"""The existence rephrasing rule (METHODS.md) on hand-written cases and on all of VALSE existence."""

import pandas as pd
import pytest

from clip_lens.data import load_valse, prepare_existence, rephrase_non_negated
from conftest import SHARED_DATA


@pytest.mark.parametrize("sentence,expected", [
    ("There are tennis players.", "There are some tennis players."),
    ("There is a giraffe shown.", "There is a giraffe shown."),
    ("There is an apple.", "There is an apple."),
    ("There are some dogs.", "There are some dogs."),
    ("There is water in the glass.", "There is some water in the glass."),
])
def test_rephrase_rule(sentence, expected):
    assert rephrase_non_negated(sentence) == expected


def test_exclusions_are_reported(vit_b32):
    _, model = vit_b32
    frame = pd.DataFrame([
        dict(id="a", caption="There are no animals.", foil="There are animals.", image_file="x.jpg", caption_votes=3),
        dict(id="b", caption="You see horses.", foil="You see no horses.", image_file="y.jpg", caption_votes=3),
    ])
    prepared = prepare_existence(frame, model.to_tokens)
    assert list(prepared.pairs["foil"]) == ["There are some animals."]
    assert prepared.pairs["negation_in"][0] == "caption"
    assert list(prepared.excluded["id"]) == ["b"] and "There is/are no" in prepared.excluded["reason"][0]


def test_all_valse_existence_pairs_check_with_the_tokenizer(vit_b32):
    _, model = vit_b32
    frame = load_valse(SHARED_DATA / "valse" / "existence.json")
    prepared = prepare_existence(frame, model.to_tokens)  # raises on any pair that fails the check
    assert len(frame) == 505 and len(prepared.pairs) == 490 and len(prepared.excluded) == 15
    assert set(prepared.pairs["negation_in"]) == {"caption", "foil"}


def test_wrong_file_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json is not a VALSE foil file"):
        load_valse(bad)
