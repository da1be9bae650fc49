"""`clip-lens pairs` end to end on a user's pairs file with the tiny CLIP."""

import pandas as pd
import pytest

from clip_lens.cli import main
from clip_lens.data import shapes


def scenes_file(folder, n: int, seed: int, name: str):
    """A pairs file of n synthetic scenes (caption, foil, image) with its images under folder/images."""
    scenes = list(shapes.examples(n, seed=seed))
    (folder / "images").mkdir()
    for i, scene in enumerate(scenes):
        shapes.image_of(scene).save(folder / "images" / f"{i}.png")
    pd.DataFrame({"caption": [s.caption for s in scenes], "foil": [s.foil for s in scenes],
                  "image": [f"images/{i}.png" for i in range(n)]}).to_csv(folder / name, index=False)
    return folder / name


def test_pairs_all_studies(tmp_path, capsys):
    scenes_file(tmp_path, 8, seed=7, name="scenes.csv")
    out = tmp_path / "out"
    assert main(["pairs", "all", "--model", "clip_lens/tiny-shapes", "--pairs", str(tmp_path / "scenes.csv"),
                 "--top-k", "2", "--out", str(out), "--quiet"]) == 0
    assert "most selective head per file" in capsys.readouterr().out
    assert len(pd.read_csv(out / "heads.csv")) == 3 * 4
    assert set(pd.read_csv(out / "causal_tracing.csv")["layer"]) == set(range(4))
    ablation = pd.read_csv(out / "ablation.csv")
    assert set(ablation["intervention"]) == {"zero", "scale"} and set(ablation["alpha"]) >= {1.0, 0.5, 0.0, -1.0}
    assert (out / "report.html").read_text().count('class="plotly-graph-div"') == 3


def test_pairs_without_images_cannot_be_traced(tmp_path, capsys):
    pd.DataFrame({"caption": ["There is a red circle."], "foil": ["There is no red circle."]}).to_csv(
        tmp_path / "p.csv", index=False)
    assert main(["pairs", "causal-tracing", "--model", "clip_lens/tiny-shapes", "--pairs", str(tmp_path / "p.csv"),
                 "--out", str(tmp_path / "o")]) != 0
    assert "has no image column: causal-tracing" in capsys.readouterr().err
    assert main(["pairs", "heads", "--model", "clip_lens/tiny-shapes", "--pairs", str(tmp_path / "p.csv"),
                 "--out", str(tmp_path / "o2"), "--quiet"]) == 0


def test_pairs_heads_chosen_by_attribution(tmp_path):
    scenes_file(tmp_path, 6, seed=8, name="s.csv")
    out = tmp_path / "out"
    assert main(["pairs", "ablate-heads", "--model", "clip_lens/tiny-shapes", "--pairs", str(tmp_path / "s.csv"),
                 "--choose", "attribution", "--top-k", "2", "--out", str(out), "--quiet"]) == 0
    chosen = pd.read_csv(out / "ablation.csv")
    assert chosen[chosen["condition"] == "chosen"]["heads"].str.split().str.len().eq(2).all()


@pytest.mark.parametrize("bad, message", [
    (dict(top_k=0), "top_k=0: give an integer >= 1"),
    (dict(choose="random"), "choose='random': give one of 'selectivity', 'attribution'"),
    (dict(alphas=()), "alphas=[]: give a list of at least 1 values"),
    (dict(limit=-1), "limit=-1: give an integer >= 1, or None"),
    (dict(studies="trace"), "studies='trace': give one of"),
])
def test_pairs_options_refuse_a_bad_value_by_name(bad, message):
    from clip_lens.studies import OptionError, pairs

    with pytest.raises(OptionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pairs.Options(**bad)


@pytest.mark.parametrize("limit", ["0", "-2"])
def test_pairs_limit_zero_is_refused_on_the_command_line(tmp_path, capsys, limit):
    """`--limit 0` once meant every pair; it names the option and what it takes instead."""
    scenes_file(tmp_path, 4, seed=3, name="s.csv")
    code = main(["pairs", "heads", "--model", "clip_lens/tiny-shapes", "--pairs", str(tmp_path / "s.csv"),
                 "--limit", limit, "--out", str(tmp_path / "out"), "--quiet"])
    assert code != 0
    assert f"limit={limit}: give an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
