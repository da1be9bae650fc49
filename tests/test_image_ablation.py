"""Image ablation (docs/methods.md#image-ablation): the mean-colour image, equality with a hand-written hook loop on
random ViT-B-32 weights, and IAE / outcome counts on a hand-built case."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import random_pixels

from clip_lens.images import mean_colour_pixels
from clip_lens.studies.analyses import image_ablation
from clip_lens.studies.analyses.existence import ExistenceInstances
from clip_lens.studies.analyses.image_ablation import ImageAblation

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_mean_colour_image_is_the_per_channel_or_grey_mean():
    raw = torch.rand(2, 3, 8, 8)
    pixels = (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = mean_colour_pixels(pixels, MEAN, STD)
    back = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(back, raw.mean(dim=(2, 3), keepdim=True).expand_as(raw))
    grey = mean_colour_pixels(pixels, MEAN, STD, grey=True) * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(grey, raw.mean(dim=(1, 2, 3), keepdim=True).expand_as(raw))


def _instances(model, n):
    pixels = random_pixels(n, seed=21)
    captions = ["There are no dogs.", "There is a cat.", "There are some people."][:n]
    foils = ["There are some dogs.", "There is no cat.", "There are no people."][:n]
    with torch.no_grad():
        img = model.encode_image(pixels)
        s = lambda texts: model.logit_scale.exp() * F.cosine_similarity(model.encode_text(model.to_tokens(texts)), img)  # noqa: E731
        d = (s(captions) - s(foils)).numpy()
    frame = pd.DataFrame({"id": [f"i{k}" for k in range(n)], "negation_in": ["caption", "foil", "foil"][:n],
                          "caption": captions, "foil": foils, "d": d, "segment": "ambiguous",
                          "S_caption": 0.0, "S_foil": 0.0, "image_file": ""})
    return ExistenceInstances(frame, img, pd.DataFrame()), pixels


@pytest.mark.parametrize("grey", [False, True])
def test_equals_a_hand_written_hook_loop(vit_b32, grey):
    _, model = vit_b32
    inst, pixels = _instances(model, 3)
    layers = [0, 6, 11]
    result = image_ablation.run(model, inst, pixels=pixels, grey=grey, layers=layers, progress=False)
    source = mean_colour_pixels(pixels, model.preprocess_cfg["mean"], model.preprocess_cfg["std"], grey=grey)
    with torch.no_grad():
        text_c = model.encode_text(model.to_tokens(list(inst.frame["caption"])))
        text_f = model.encode_text(model.to_tokens(list(inst.frame["foil"])))
        for c, hook in enumerate(("attn_out", "mlp_out")):
            for li, layer in enumerate(layers):
                name = f"blocks.{layer}.hook_{hook}"
                _, cache = model.vision.run_with_cache(source, names_filter=[name])
                img = model.vision.run_with_hooks(pixels, fwd_hooks=[(name, lambda x, hook: cache[name])])
                score = lambda t: model.logit_scale.exp() * F.cosine_similarity(t, img)  # noqa: E731
                d_star = (score(text_c) - score(text_f)).numpy()
                np.testing.assert_allclose(result.d_star[:, c, li], d_star, atol=1e-4)
    np.testing.assert_allclose(result.iae, inst.frame["d"].to_numpy()[:, None, None] - result.d_star)


def test_iae_and_outcome_counts_on_a_hand_built_case():
    instances = pd.DataFrame({"id": ["a", "b", "c"], "negation_in": "foil", "segment": ["correct", "incorrect", "correct"],
                              "d": [2.0, -1.5, 3.0]})
    # d* for [MHA, MLP] x 2 layers
    d_star = np.array([[[1.0, 2.5], [-0.5, 2.0]],     # a: MHA worse->correct, better->correct; MLP worse->incorrect, unchanged
                       [[-2.0, 0.5], [-1.5, -1.0]],   # b: MHA worse->incorrect, better->correct; MLP unchanged, better->incorrect
                       [[0.0, 4.0], [3.5, 1.0]]])     # c: MHA worse->incorrect (d* = 0), better->correct; MLP better, worse
    result = ImageAblation(instances, d_star, [0, 1])
    np.testing.assert_allclose(result.iae[:, 0, 0], [1.0, 0.5, 3.0])
    table = result.table()
    row = table[(table["id"] == "c") & (table["component"] == "MHA") & (table["layer"] == 0)].iloc[0]
    assert (row["change"], row["ends"]) == ("worse", "incorrect")
    counts = result.outcome_counts().set_index(["component", "layer", "change", "ends"])["instances"]
    assert counts[("MHA", 0, "worse", "correct")] == 1 and counts[("MHA", 0, "worse", "incorrect")] == 2
    assert counts[("MHA", 1, "better", "correct")] == 3
    assert counts[("MLP", 0, "unchanged", "incorrect")] == 1 and counts[("MLP", 0, "worse", "incorrect")] == 1
    assert counts[("MLP", 0, "better", "correct")] == 1
    assert counts.groupby(["component", "layer"]).sum().eq(3).all()
    versus = result.mha_vs_mlp().set_index("layer")
    assert versus.loc["0", "MHA"] == pytest.approx((1.0 + 0.5 + 3.0) / 3)
    assert versus.loc["average", "MLP"] == pytest.approx(result.iae[:, 1].mean())
    means = result.segment_means().set_index(["segment", "component", "layer"])["iae"]
    assert means[("correct", "MHA", 0)] == pytest.approx((1.0 + 3.0) / 2)


def test_prepared_instances_keep_their_text_embeddings(vit_b32):
    """existence.prepare keeps caption and foil embeddings (row-aligned, also after subset), so
    image ablation and the preliminary study do not encode the texts again; without them they are
    encoded on demand, with the same result."""
    from conftest import SHARED_DATA

    from clip_lens.scores import encode_texts
    from clip_lens.studies.analyses import existence

    _, model = vit_b32
    with torch.no_grad():
        inst = existence.prepare(model, SHARED_DATA / "valse" / "existence.json", images=torch.randn(490, 512),
                                 limit=6, progress=False)
    torch.testing.assert_close(inst.caption_emb, encode_texts(model, inst.frame["caption"]))
    torch.testing.assert_close(inst.foil_emb, encode_texts(model, inst.frame["foil"]))
    sub = inst.subset([False, True, False, True, True, False])
    torch.testing.assert_close(sub.caption_emb, inst.caption_emb[[1, 3, 4]])
    bare = ExistenceInstances(sub.frame, sub.image_emb, sub.excluded)
    for kept, encoded in zip(sub.text_embeddings(model), bare.text_embeddings(model)):
        torch.testing.assert_close(kept, encoded)


def _images_through_the_vision_tower(model):
    """A counter of the images the vision tower embeds (rows through its patch embedding), and the
    handle that removes it."""
    seen = {"images": 0}

    def count(module, inputs):
        seen["images"] += inputs[0].shape[0]

    return seen, model.vision.patch_embed.register_forward_pre_hook(count)


def test_valse_existence_encodes_each_image_once(tiny_model, tmp_path):
    """With image ablation, the study scores the instances against the image embeddings of the
    ablation's own target runs: the vision tower sees each image once and each mean-colour image
    once (before: 3 passes per instance, the images encoded a second time for the scores). The
    instances and their ablation equal those of existence.prepare and image_ablation.run."""
    from clip_lens.data import shapes
    from clip_lens.studies import valse_existence
    from clip_lens.studies.analyses import existence

    model = tiny_model
    path = shapes.export_valse(tmp_path, 6, seed=3)
    data = valse_existence.ValseExistence(path, tmp_path / "images")
    options = valse_existence.Options(studies=("image-ablation",))
    seen, handle = _images_through_the_vision_tower(model)
    try:
        tables = valse_existence.compute(model, data, options, progress=False)
    finally:
        handle.remove()
    n = len(tables["instances"])
    assert n >= 4 and seen["images"] == 2 * n

    with torch.no_grad():
        inst = existence.prepare(model, path, images=tmp_path / "images", progress=False)
    expected = image_ablation.run(model, inst, progress=False).table()
    np.testing.assert_allclose(tables["instances"]["d"], inst.frame["d"], atol=1e-5)
    assert list(tables["instances"]["segment"]) == list(inst.frame["segment"])
    np.testing.assert_allclose(tables["image_ablation"]["iae"], expected["iae"], atol=1e-5)
    np.testing.assert_allclose(tables["image_ablation"]["d_star"], expected["d_star"], atol=1e-5)


def test_run_and_score_refuses_pairs_given_as_image_embeddings(tiny_model):
    from clip_lens.studies.analyses import existence

    d_embed = tiny_model.vision.cfg.d_embed
    frame = pd.DataFrame({"id": ["a", "b"], "caption": ["no cat.", "a dog."], "foil": ["a cat.", "no dog."]})
    pairs = existence.ExistencePairs(frame, pd.DataFrame(), torch.randn(2, d_embed), torch.randn(2, d_embed),
                                     images=torch.randn(2, d_embed))
    with pytest.raises(ValueError, match=r"needs the images: pairs were given image embeddings \(2, "):
        image_ablation.run_and_score(tiny_model, pairs, progress=False)


def test_a_checkpoint_saved_without_image_embeddings_still_scores(tiny_model, tmp_path):
    """Chunks saved before checkpoints kept the image embeddings: a resumed run encodes those
    chunks' images and scores them as a fresh run does."""
    from clip_lens.checkpoints import Checkpoints
    from clip_lens.data import shapes
    from clip_lens.studies.analyses import existence

    path = shapes.export_valse(tmp_path, 5, seed=4)
    pairs = existence.select(tiny_model, path, tmp_path / "images")
    fresh, fresh_ablation = image_ablation.run_and_score(tiny_model, pairs, checkpoints=Checkpoints(tmp_path / "ck"),
                                                         progress=False, pair_chunk=2)
    for file in (tmp_path / "ck" / "image_ablation").glob("*.npz"):
        with np.load(file) as saved:
            kept = {name: saved[name] for name in ("d_star", "layers")}
        np.savez(file, **kept)
    counted = Checkpoints(tmp_path / "ck")
    resumed, resumed_ablation = image_ablation.run_and_score(tiny_model, pairs, checkpoints=counted, progress=False,
                                                             pair_chunk=2)
    assert counted.loaded["image_ablation"] == len(pairs) and counted.computed["image_ablation"] == 0
    np.testing.assert_allclose(resumed.frame["d"], fresh.frame["d"], atol=1e-5)
    np.testing.assert_array_equal(resumed_ablation.d_star, fresh_ablation.d_star)
