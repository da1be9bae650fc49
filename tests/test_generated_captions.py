"""The shipped prefix captioner of the tiny CLIP, and generated captions in attention cancellation:
accuracy on held-out scenes, a known answer under cancellation, the CLIP cosines recomputed by
hand, the report, and the command line with a random ViT-B-16."""


import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_captioning import vision_encoder_decoder

from clip_lens import hook_name, value_only_attention, zoo
from clip_lens.captioning import HuggingFaceCaptioner, PrefixCaptioner, load_captioner, train
from clip_lens.cli import main
from clip_lens.data import shapes
from clip_lens.data.image_sets import ImageSet, open_image_set
from clip_lens.studies import Target, run_study
from clip_lens.studies import attention_cancellation as vision_study
from clip_lens.studies.analyses import attention_cancellation
from clip_lens.studies.options import OptionError


@pytest.fixture(scope="module")
def captioner():
    return load_captioner(zoo.CAPTIONER_NAME)


@pytest.fixture(scope="module")
def one_shape_set(tmp_path_factory):
    """24 one-shape scenes (every colour x shape, twice) with their captions."""
    images, captions = shapes.single_shape_set(tmp_path_factory.mktemp("single") / "images")
    return open_image_set(images, captions, None, None)


@pytest.fixture(scope="module")
def cancelled(tiny_model, captioner, one_shape_set):
    return attention_cancellation.run(tiny_model, one_shape_set, captioner=captioner, progress=False)


def test_shipped_captioner_is_small_and_loads_by_name(captioner):
    assert zoo.CAPTIONER_WEIGHTS.stat().st_size < 4e6
    assert isinstance(captioner, PrefixCaptioner) and captioner.name == zoo.CAPTIONER_NAME
    assert captioner.cfg.d_embed == 64 and captioner.cfg.clip == zoo.NAME


def test_shipped_captioner_names_shape_and_colour_of_held_out_scenes(captioner, tiny_model):
    result = train.evaluate(captioner, tiny_model, n=500)
    # measured when it shipped: 89.6% (docs/captioning.md); the issue asks for at least 80%
    assert result["accuracy"] >= 0.8
    assert result["accuracy"] == pytest.approx(0.896, abs=0.01)
    assert result["colour"] >= 0.98


def test_captioner_training_is_deterministic():
    import clip_lens

    model = clip_lens.HookedCLIP.from_pretrained(zoo.NAME)
    a, _ = train.train(model, steps=3, seed=5, n_scenes=40, batch_size=8, progress=False)
    b, _ = train.train(model, steps=3, seed=5, n_scenes=40, batch_size=8, progress=False)
    c, _ = train.train(model, steps=3, seed=6, n_scenes=40, batch_size=8, progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.slow
def test_retraining_with_the_documented_command_reproduces_the_shipped_captioner(tmp_path, capsys):
    """About 4.5 minutes on 2 cores: `clip-lens train-captioner --seed 0 --steps 2000` as docs/captioning.md says."""
    from safetensors.torch import load_file

    out = tmp_path / "captioner.safetensors"
    assert main(["train-captioner", "--seed", "0", "--steps", "2000", "--out", str(out), "--quiet"]) == 0
    assert "89.6% name the shape with its colour" in capsys.readouterr().out
    retrained, shipped = load_file(str(out)), load_file(str(zoo.CAPTIONER_WEIGHTS))
    assert retrained.keys() == shipped.keys() and all(torch.equal(retrained[k], shipped[k]) for k in shipped)


def test_cancelling_every_block_leaves_one_caption_for_all_images(cancelled, one_shape_set):
    """Known answer: with attention cancelled in every block, the class token never reads a patch,
    so every image has the same embedding and gets the same caption, while the baseline's captions
    name each image's own shape."""
    pred = cancelled.predictions()
    everything = pred[pred["setting"] == "1-3"]
    assert everything["generated"].nunique() == 1 and everything["selected"].nunique() == 1
    np.testing.assert_allclose(everything["generated_cosine"], everything["generated_cosine"].iloc[0], atol=1e-5)
    baseline = pred[pred["setting"] == "baseline"]
    right = [f"There is a {label}." for label in one_shape_set.frame["label"]]
    # 19 of these 24 measured; the 500-scene held-out figure above is the captioner's accuracy
    assert (baseline["generated"].to_numpy() == np.array(right)).mean() >= 0.75
    assert baseline["generated"].nunique() >= 8


def test_one_cancelled_layer_changes_some_generated_captions(cancelled):
    summary = cancelled.summary().set_index("setting")
    assert summary.loc["baseline", "generated_changed"] == 0
    single = summary.loc[["1", "2", "3"], "generated_changed"]
    assert (single > 0).any(), single
    assert summary.loc["1-3", "generated_changed"] > 0.5
    # the generated captions fit the image less once attention is gone everywhere
    assert summary.loc["1-3", "mean_generated_cosine_clean"] < summary.loc["baseline", "mean_generated_cosine_clean"]


def test_generated_cosines_equal_a_hand_computation(cancelled, tiny_model, one_shape_set):
    pixels = tiny_model.to_pixels(list(one_shape_set.frame["image"]))
    setting = cancelled.settings.index("2")
    with torch.no_grad():
        clean = tiny_model.encode_image(pixels)
        with tiny_model.vision.hooks([(hook_name("pattern", 1, 3), value_only_attention)]):
            under = tiny_model.encode_image(pixels)
        text = tiny_model.encode_text(tiny_model.to_tokens(cancelled.generated[setting]))
    np.testing.assert_allclose(cancelled.generated_cosine[setting], F.cosine_similarity(under, text).numpy(), atol=1e-5)
    np.testing.assert_allclose(cancelled.generated_cosine_clean[setting], F.cosine_similarity(clean, text).numpy(), atol=1e-5)
    table = cancelled.caption_table(3)
    assert table["setting"].tolist() == cancelled.settings
    assert table["generated"].tolist() == [per_setting[3] for per_setting in cancelled.generated]
    with pytest.raises(ValueError, match="image 24 is out of range"):
        cancelled.caption_table(24)


@pytest.mark.filterwarnings("ignore:.*fills all.*token slots")
def test_a_hugging_face_captioner_in_attention_cancellation(tiny_model, one_shape_set):
    """A vision-encoder-decoder reads its own (2-block) tower and preprocesses the images itself;
    settings are applied to its tower, and one beyond its depth is refused by name."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(9)]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    captioner = HuggingFaceCaptioner(vision_encoder_decoder(), tokenizer)
    frame = one_shape_set.frame.iloc[:6]
    result = attention_cancellation.run(tiny_model, ImageSet(frame, one_shape_set.captions, None, "six scenes"),
                                        settings={"1": (0,), "1-2": (0, 1)},
                                        captioner=attention_cancellation.Captioning(captioner, max_new_tokens=8),
                                        progress=False)
    assert [len(per_setting) for per_setting in result.generated] == [6, 6, 6]
    assert all(set(c.split()) <= set(words[3:]) for per_setting in result.generated for c in per_setting)
    assert result.generated[0] != result.generated[2]
    with pytest.raises(ValueError, match="setting '3' cancels block 2, but the captioner's vision tower has 2 blocks"):
        attention_cancellation.generate_captions(tiny_model, captioner, {"3": (2,)}, images=list(frame["image"]))


def _run(model, image_set, out, **options):
    """The study through the runner into `out`: (tables, options)."""
    chosen = vision_study.Options(**options)
    return run_study(vision_study.STUDY, model, image_set, chosen, Target(out, progress=False), model_label="tiny"), chosen


def test_attention_cancellation_report_shows_generated_captions(tiny_model, one_shape_set, tmp_path):
    tables, _ = _run(tiny_model, one_shape_set, tmp_path / "out", settings="1 3 1-3", captioner=zoo.CAPTIONER_NAME,
                     caption_image=5, map_images=1)
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert {"mean_cosine", "mean_generated_cosine", "mean_generated_cosine_clean"} <= set(summary.columns)
    by_setting = pd.read_csv(tmp_path / "out" / "captions_by_setting.csv")
    assert by_setting["setting"].tolist() == ["baseline", "1", "3", "1-3"]
    assert by_setting["generated"].tolist() == tables["captions_by_setting"]["generated"].tolist()
    report = (tmp_path / "out" / "report.html").read_text()
    assert "Generated captions" in report and "Selected and generated caption per setting for" in report
    # accuracy, cosine heat map, generated-caption cosines; attention distance; one attention map
    assert report.count('class="plotly-graph-div"') == 3 + 1 + 1
    with pytest.raises(ValueError, match="caption_image 99 is out of range"):
        vision_study.compute(tiny_model, one_shape_set, vision_study.Options(captioner=zoo.CAPTIONER_NAME,
                                                                             caption_image=99), progress=False)


def test_the_random_captioner_is_seeded_by_the_study_seed(tiny_model):
    first, again, other = (vision_study.load_captioner("random", tiny_model, seed) for seed in (1, 1, 2))
    assert first.name == "random prefix captioner (seed 1)"
    for a, b in zip(first.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters()))


def test_cli_runs_a_random_vit_b16_with_a_random_captioner_on_the_sample_photos(tmp_path, capsys):
    out = tmp_path / "b16"
    assert main(["attention-cancellation", "--model", "ViT-B-16", "--captioner", "random", "--settings", "1 1-12",
                 "--map-images", "1", "--out", str(out), "--quiet"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["setting"].tolist() == ["baseline", "1", "1-12"]
    assert summary["mean_generated_cosine"].notna().all()
    predictions = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(predictions) == 3 * 12 and "generated" in predictions
    assert len(pd.read_csv(out / "captions_by_setting.csv")) == 3
    assert "Generated captions" in (out / "report.html").read_text()
    assert "random prefix captioner (seed 0)" in (out / "report.html").read_text()
    assert '"captioner": "random"' in (out / "manifest.json").read_text()


def test_cli_names_a_missing_captioner(tmp_path, capsys):
    assert main(["attention-cancellation", "--model", zoo.NAME, "--captioner", str(tmp_path / "nope.safetensors"),
                 "--settings", "1", "--out", str(tmp_path / "o")]) != 0
    assert "nope.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--beams", "3"], ["--caption-image", "2"]])
def test_caption_options_without_a_captioner_are_refused(tmp_path, capsys, flag):
    assert main(["attention-cancellation", "--model", zoo.NAME, "--settings", "1", "--out", str(tmp_path / "o"),
                 *flag]) == 2
    assert "give a captioner (--captioner) too" in capsys.readouterr().err
    with pytest.raises(OptionError, match="give a captioner"):
        vision_study.Options(**{flag[0][2:].replace("-", "_"): int(flag[1])})
    with pytest.raises(ValueError, match="give a captioner too"):
        attention_cancellation.Captioning(None, beams=2)


def test_a_killed_attention_cancellation_resumes_from_its_finished_chunks(tiny_model, one_shape_set, tmp_path,
                                                                          monkeypatch):
    """Killed in its third chunk of 8 images, the study run again (with a smaller engine chunk: only
    the checkpoint chunk is part of the run) recomputes only the chunks it had not finished, and
    its tables (generated captions included) equal an uninterrupted run's."""
    import json

    from clip_lens.checkpoints import PARTIAL

    options = dict(settings="1 1-3", captioner=zoo.CAPTIONER_NAME, map_images=1, pair_chunk=8, checkpoint_chunk=8)
    calls = []
    real_patch = attention_cancellation.patch

    def dying_patch(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_patch(*args, **kw)

    monkeypatch.setattr(attention_cancellation, "patch", dying_patch)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model, one_shape_set, tmp_path / "out", **options)
    assert len(list((tmp_path / "out" / PARTIAL / "attention_cancellation").glob("*.npz"))) == 2
    monkeypatch.setattr(attention_cancellation, "patch", real_patch)
    resumed, _ = _run(tiny_model, one_shape_set, tmp_path / "out", **{**options, "pair_chunk": 4})
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["checkpoints"] == {"attention_cancellation": {"loaded": 16, "computed": 8}}
    assert not (tmp_path / "out" / PARTIAL).exists()
    plain, _ = _run(tiny_model, one_shape_set, tmp_path / "plain", **options)
    for name in ("summary", "predictions", "captions_by_setting"):
        pd.testing.assert_frame_equal(resumed[name], plain[name])
    with pytest.raises(FileExistsError, match="holds another run|already holds"):
        _run(tiny_model, one_shape_set, tmp_path / "plain", **options)
