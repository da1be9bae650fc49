"""The sentence-SAE study: a text-tower SAE trained from an activation store on sentences, and the
latents that separate negated from plain ones; on the tiny CLIP's own kind of sentence some latent
separates them perfectly; the command line runs it on VALSE existence."""

from pathlib import Path

import pandas as pd
import pytest

from clip_lens.cli import main
from clip_lens.data import shapes
from clip_lens.data.sentences import is_negated
from clip_lens.studies import OptionError, sentence_sae

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tables(tiny_model):
    sentences = sorted({s for e in shapes.examples(100, seed=3) for s in (e.caption, e.foil)})
    data = pd.DataFrame({"sentence": sentences, "source": "shapes"}).assign(negated=lambda f: f["sentence"].map(is_negated))
    options = sentence_sae.Options(layer=0, steps=150, latents=64, k=8, batch_size=256, top=5, examples=2)
    return sentence_sae.compute(tiny_model, data, options, progress=False)


def test_some_latent_separates_the_tiny_clip_s_negated_sentences(tables):
    separation = tables["separation"]
    assert separation["auc"].between(0, 1).all() and len(separation) == 64
    assert abs(separation["auc"].iloc[0] - 0.5) == pytest.approx(0.5)              # a perfect separator exists
    only_negated = separation[(separation["fires_in_group"] == 1) & (separation["fires_outside"] == 0)]
    assert len(only_negated)                                                       # one that fires on "no" alone
    examples = tables["examples"]
    assert len(examples) == 5 * 2 and examples.groupby("latent")["score"].is_monotonic_decreasing.all()


def test_the_evaluation_table_is_written_for_the_sae(tables, tiny_model):
    row = tables["evaluation"].iloc[0]
    assert row["hook"] == "text.blocks.0.hook_resid_post" and row["n_latents"] == 64
    assert 0.5 < row["explained_variance"] <= 1 and row["l0"] == pytest.approx(8)
    lengths = tiny_model.text.sequence_lengths(tiny_model.to_tokens(list(tables["sentences"]["sentence"])))
    assert row["vectors"] == int(lengths.sum())


def test_the_command_runs_on_valse_existence(tmp_path, capsys):
    code = main(["sentence-sae", "--model", "clip_lens/tiny-shapes", "--valse", str(SHARED / "valse" / "existence.json"),
                 "--limit", "60", "--steps", "20", "--latents", "32", "--k", "4", "--out", str(tmp_path / "out"),
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert {"evaluation.csv", "separation.csv", "examples.csv", "report.html"} <= {p.name for p in out.iterdir()}
    assert "latents separating negated from plain sentences" in capsys.readouterr().out


def test_options_and_data_are_checked_by_name(tiny_model):
    with pytest.raises(OptionError, match="architecture='gated'"):
        sentence_sae.Options(architecture="gated")
    with pytest.raises(OptionError, match="k=4: a jumprelu SAE has no k"):   # accepted only where it is applied
        sentence_sae.Options(architecture="jumprelu", k=4)
    assert sentence_sae.Options(architecture="jumprelu").architecture == "jumprelu"
    with pytest.raises(ValueError, match="layer=7: the text tower has blocks 0..2"):
        sentence_sae.compute(tiny_model, pd.DataFrame({"sentence": ["no", "a"], "negated": [True, False]}),
                             sentence_sae.Options(layer=7), progress=False)
    with pytest.raises(TypeError, match="takes a frame of sentences with a negated column"):
        sentence_sae.compute(tiny_model, ["no"], sentence_sae.Options(), progress=False)
