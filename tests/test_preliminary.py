"""Preliminary analyses: the subject phrase, correlations and accuracy by subject size on known
data, and subject size through a CLIPSeg checkpoint the test writes itself."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA, write_noise_images

from clip_lens.studies.analyses import existence, preliminary


@pytest.mark.parametrize("negated,subject", [
    ("There are no people in the picture.", "people"),
    ("There are no birds pictured.", "birds"),
    ("There is no red car parked here.", "red car parked"),
    ("There are no animals.", "animals"),
])
def test_subject_phrase(negated, subject):
    assert preliminary.subject_of(negated) == subject


def test_correlations_and_accuracy_by_threshold_on_known_data():
    frame = pd.DataFrame({"d": [-2.0, -1.0, 0.5, 1.0, 3.0, 4.0], "n_tokens": [1, 2, 3, 4, 5, 6],
                          "caption_foil_cosine": [6, 5, 4, 3, 2, 1.0], "subject_size": [0.0, 0.1, 0.2, 0.3, 0.4, np.nan],
                          "negation_in": ["foil"] * 6})
    table = preliminary.correlations(frame).set_index(["negation_in", "measure"])
    assert table.loc[("all", "n_tokens"), "spearman"] == pytest.approx(1.0)
    assert table.loc[("all", "caption_foil_cosine"), "spearman"] == pytest.approx(-1.0)
    assert table.loc[("all", "n_tokens"), "pearson"] == pytest.approx(np.corrcoef(frame["n_tokens"], frame["d"])[0, 1])
    assert table.loc[("all", "subject_size"), "instances"] == 5
    acc = preliminary.accuracy_by_threshold(frame, thresholds=[0.0, 0.15, 0.35]).set_index("threshold")
    assert acc.loc[0.0].tolist() == [pytest.approx(3 / 5), 5]
    assert acc.loc[0.15].tolist() == [pytest.approx(1.0), 3]
    assert acc.loc[0.35].tolist() == [pytest.approx(1.0), 1]


def _instances(model, folder, n=30):
    """Instances of both negation placements; images are written for those only (the rest skipped)."""
    frame = existence.load_valse(SHARED_DATA / "valse" / "existence.json")
    in_caption = frame["caption"].str.contains(r"\bno\b")
    chosen = pd.concat([frame[in_caption].head(n // 2), frame[~in_caption].head(n // 2)])
    write_noise_images(chosen["image_file"], folder)
    return existence.prepare(model, SHARED_DATA / "valse" / "existence.json", folder, missing="skip", progress=False)


def test_measures_with_a_subject_size_callable(vit_b32, tmp_path):
    _, model = vit_b32
    inst = _instances(model, tmp_path)
    seen = []

    def size(paths, subjects):
        seen.extend(subjects)
        return np.linspace(0.1, 0.9, len(paths))

    result = preliminary.run(model, inst, subject_size=size, progress=False)
    frame = result.frame
    in_foil = frame["negation_in"] == "foil"
    assert frame.loc[in_foil, "subject_size"].notna().all() and frame.loc[~in_foil, "subject_size"].isna().all()
    assert seen == list(frame.loc[in_foil, "subject"])
    tokens = model.to_tokens(list(frame["caption"]))
    assert frame["n_tokens"].tolist() == (tokens.argmax(dim=-1) - 1).tolist()
    emb_c, emb_f = model.encode_text(model.to_tokens(list(frame["caption"]))), model.encode_text(model.to_tokens(list(frame["foil"])))
    np.testing.assert_allclose(frame["caption_foil_cosine"], torch.cosine_similarity(emb_c, emb_f).detach().numpy(), atol=1e-5)
    assert set(result.correlations["measure"]) == {"n_tokens", "caption_foil_cosine", "subject_size"}
    assert len(result.accuracy_by_subject_size) == 11
    assert {"score_distribution", "subject_size", "accuracy_by_subject_size"} <= set(result.figures())


def write_tiny_clipseg(path):
    """A small random CLIPSeg with a tokenizer made from open_clip's BPE vocabulary."""
    import open_clip.tokenizer as oct
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer, ViTImageProcessor

    path.mkdir(parents=True, exist_ok=True)
    encoder = dict(oct.SimpleTokenizer().encoder)
    encoder["<|startoftext|>"], encoder["<|endoftext|>"] = encoder.pop("<start_of_text>"), encoder.pop("<end_of_text>")
    (path / "vocab.json").write_text(json.dumps(encoder))
    merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPSegConfig(text_config=dict(small, vocab_size=49408), vision_config=dict(small, image_size=64, patch_size=16),
                        projection_dim=16, reduce_dim=16, extract_layers=[1], decoder_num_attention_heads=2,
                        decoder_intermediate_size=32)
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(cfg).eval().save_pretrained(path)
    CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer).save_pretrained(path)
    return path


def test_subject_size_with_a_clipseg_checkpoint(tmp_path):
    from PIL import Image
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    ckpt = write_tiny_clipseg(tmp_path / "clipseg")
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for i, p in enumerate(images):
        Image.fromarray(np.full((40, 60, 3), 60 * i, dtype=np.uint8)).save(p)
    sizes = preliminary.ClipSegSubjectSize(ckpt)([str(p) for p in images], ["people", "red car"], progress=False)
    processor, model = CLIPSegProcessor.from_pretrained(ckpt), CLIPSegForImageSegmentation.from_pretrained(ckpt).eval()
    inputs = processor(text=["red car"], images=[Image.open(images[1]).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        expected = torch.sigmoid(model(**inputs).logits).mean().item()
    assert sizes.shape == (2,) and ((sizes > 0) & (sizes < 1)).all()
    assert sizes[1] == pytest.approx(expected, abs=1e-5)


def test_subject_masks_from_a_clipseg_checkpoint_feed_the_subject_removed_fill(tmp_path):
    """Each mask is the CLIPSeg probability resized to the image's own size, above the threshold;
    `fill_mask` then paints those pixels from the image around them."""
    import torch.nn.functional as F
    from PIL import Image
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    from clip_lens import baselines

    ckpt = write_tiny_clipseg(tmp_path / "clipseg")
    path = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    processor, model = CLIPSegProcessor.from_pretrained(ckpt), CLIPSegForImageSegmentation.from_pretrained(ckpt).eval()
    with torch.no_grad():
        logits = model(**processor(text=["red car"], images=[Image.open(path).convert("RGB")], return_tensors="pt")).logits
    probability = F.interpolate(torch.sigmoid(logits).reshape(1, 1, *logits.shape[-2:]), size=(40, 60), mode="bilinear")[0, 0]
    threshold = float(probability.median())
    (mask,) = preliminary.ClipSegSubjectSize(ckpt).masks([str(path)], ["red car"], threshold=threshold, progress=False)
    assert mask.shape == (40, 60) and mask.dtype == bool
    np.testing.assert_array_equal(mask, (probability > threshold).numpy())
    filled = np.asarray(baselines.fill_mask(Image.open(path), mask))
    assert (filled[~mask] == pixels[~mask]).all() and (filled[mask] != pixels[mask]).any()
    with pytest.raises(ValueError, match="threshold=1.5"):
        preliminary.ClipSegSubjectSize(ckpt).masks([str(path)], ["red car"], threshold=1.5)
    with pytest.raises(ValueError, match="1 images for 2 subjects"):
        preliminary.ClipSegSubjectSize(ckpt).masks([str(path)], ["red car", "dog"])
