"""The existence rephrasing rule (docs/methods.md#valse-existence-pairs) on hand-written cases and on all of VALSE existence."""

import pandas as pd
import pytest
from conftest import SHARED_DATA, write_noise_images

from clip_lens.data import load_valse, prepare_existence, rephrase_non_negated, resolve_images


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


def test_sentences_without_a_final_period_are_excluded_with_a_reason(vit_b32):
    _, model = vit_b32
    frame = pd.DataFrame([dict(id="a", caption="There are no animals", foil="There are animals",
                               image_file="x.jpg", caption_votes=3)])
    prepared = prepare_existence(frame, model.to_tokens)
    assert len(prepared.pairs) == 0 and "'.'" in prepared.excluded["reason"][0]


def _pairs():
    return pd.DataFrame({"id": ["a", "b", "c"], "image_file": ["v7w_1.jpg", "v7w_2.jpg", "v7w_3.jpg"]})


def test_missing_images_are_named(tmp_path):
    write_noise_images(["v7w_1.jpg"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"2 image\(s\) missing from .*: v7w_2.jpg, v7w_3.jpg"):
        resolve_images(_pairs(), tmp_path)
    with pytest.raises(FileNotFoundError, match="Image folder not found"):
        resolve_images(_pairs(), tmp_path / "nope")


def test_missing_images_can_be_skipped_with_a_report(tmp_path):
    write_noise_images(["v7w_1.jpg", "v7w_3.jpg"], tmp_path)
    resolved = resolve_images(_pairs(), tmp_path, missing="skip")
    assert list(resolved.pairs["id"]) == ["a", "c"] and resolved.pairs["image_path"][1].endswith("v7w_3.jpg")
    assert resolved.missing.to_dict("records") == [{"id": "b", "image_file": "v7w_2.jpg"}]


def test_prepared_instances_list_skipped_images_among_the_exclusions(tmp_path, vit_b32):
    from clip_lens.studies.analyses import existence

    _, model = vit_b32
    frame = load_valse(SHARED_DATA / "valse" / "existence.json")
    write_noise_images(frame["image_file"].head(3), tmp_path)  # only some of the first 5 kept pairs have theirs
    inst = existence.prepare(model, SHARED_DATA / "valse" / "existence.json", tmp_path, missing="skip", limit=5,
                             progress=False)
    kept_files = set(inst.frame["image_file"])
    assert kept_files <= set(frame["image_file"].head(3))
    skipped = inst.excluded[inst.excluded["reason"].str.startswith("image missing")]
    assert len(inst) + len(skipped) == 5 and len(skipped) >= 2
    assert inst.image_emb.shape == (len(inst), model.vision.cfg.d_embed)
    assert ((inst.frame["d"] > 1) == (inst.frame["segment"] == "correct")).all()
