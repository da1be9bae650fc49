"""`clip-lens valse-existence image-ablation` and `clip-lens attention-cancellation` end to end on a
random-weight ViT-B-32, with generated images and with scikit-image's sample photos."""

import pandas as pd
import pytest
from conftest import SHARED_DATA, write_noise_images

from clip_lens.cli import main
from clip_lens.studies import attention_cancellation
from clip_lens.studies.analyses.existence import load_valse
from clip_lens.studies.options import OptionError

VALSE = SHARED_DATA / "valse" / "existence.json"


def test_image_ablation_from_the_command_line(tmp_path, capsys):
    images = write_noise_images(load_valse(VALSE)["image_file"], tmp_path / "v7w")
    out = tmp_path / "out"
    assert main(["valse-existence", "image-ablation", "--valse", str(VALSE), "--images", str(images), "--sample", "8",
                 "--out", str(out), "--quiet"]) == 0
    table = pd.read_csv(out / "image_ablation.csv")
    assert len(table) == 8 * 2 * 12 and set(table["component"]) == {"MHA", "MLP"}
    assert set(table["change"]) <= {"worse", "better", "unchanged"}
    versus = pd.read_csv(out / "image_ablation_mha_vs_mlp.csv")
    assert versus["layer"].iloc[-1] == "average"
    report = (out / "report.html").read_text()
    assert "Image ablation" in report and report.count('class="plotly-graph-div"') == 4  # + score distribution


def test_attention_cancellation_demo_on_sample_photos(tmp_path, capsys):
    out = tmp_path / "cancel"
    assert main(["attention-cancellation", "--out", str(out), "--settings", "1 1-3 12", "--map-images", "2", "--quiet"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["setting"].tolist() == ["baseline", "1", "1-3", "12"] and summary["accuracy"].notna().all()
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 4 * 12 and "cat" in set(predictions["label"])
    assert len(pd.read_csv(out / "logits.csv")) == 4 * 12 * 12
    assert len(pd.read_csv(out / "attention_distance.csv")) == 12 * 12
    report = (out / "report.html").read_text()
    assert report.count('class="plotly-graph-div"') == 2 + 1 + 2


def test_attention_cancellation_on_a_folder_needs_captions(tmp_path, capsys):
    write_noise_images(["a.png"], tmp_path / "imgs" / "cat")
    assert main(["attention-cancellation", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")]) == 2
    assert "--captions" in capsys.readouterr().err
    (tmp_path / "caps.txt").write_text("cat\ta photo of a cat\ndog\ta photo of a dog\n")
    assert main(["attention-cancellation", "--images", str(tmp_path / "imgs"), "--captions", str(tmp_path / "caps.txt"),
                 "--settings", "2", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert pd.read_csv(tmp_path / "o" / "predictions.csv")["label"].tolist() == ["cat", "cat"]


@pytest.mark.parametrize("bad, named", [(dict(map_images=-1), "map_images=-1"), (dict(pair_chunk=0), "pair_chunk=0"),
                                        (dict(settings="1 x-3"), "settings='1 x-3'"), (dict(beams=0), "beams=0"),
                                        (dict(seed=True), "seed=True")])
def test_attention_cancellation_options_refuse_bad_values_by_name(bad, named):
    with pytest.raises(OptionError, match=named):
        attention_cancellation.Options(**bad)
    assert attention_cancellation.Options(settings="1 2-3", captioner="random", beams=2).beams == 2
