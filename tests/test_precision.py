"""Half precision (issue: GPUs and half precision): the loaders take dtype=, `to(dtype)` works, the
logit scale stays float32, every score comes back in float32 and close to the float32 model's,
and every study command takes --dtype."""

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_hf_config

import clip_lens
from clip_lens import zoo
from clip_lens.cli import build_parser, main
from clip_lens.components import PatchEmbed
from clip_lens.data.shapes import examples, export_valse, image_of
from clip_lens.scores import pair_scores

TEXTS = ["There is a red circle.", "There is no red circle."]


@pytest.fixture(scope="module")
def inputs(tiny_model):
    scenes = list(examples(4, seed=11))
    return tiny_model.to_pixels([image_of(s) for s in scenes]), [s.caption for s in scenes], [s.foil for s in scenes]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_scores_in_float32_close_to_float32(tiny_model, inputs, dtype):
    pixels, captions, foils = inputs
    half = clip_lens.HookedCLIP.from_pretrained(zoo.NAME, dtype=dtype)
    assert half.dtype == dtype and half.vision.blocks[0].mlp.in_weight.dtype == dtype
    assert half.logit_scale.dtype == torch.float32 and torch.equal(half.logit_scale, tiny_model.logit_scale)
    with torch.no_grad():
        image_emb = half.encode_image(pixels)
        assert image_emb.dtype == dtype
        logits = half(text=half.to_tokens(captions), image=pixels)
        reference = tiny_model(text=tiny_model.to_tokens(captions), image=pixels)
    assert logits.dtype == torch.float32
    tolerance = 0.1 if dtype == torch.bfloat16 else 0.02  # S is up to ~6 on this model (docs/performance.md)
    torch.testing.assert_close(logits, reference, atol=tolerance, rtol=0)
    scores = pair_scores(half, captions, foils, image_emb)
    assert scores["d"].dtype == "float32" and scores["S_caption"].dtype == "float32"
    result = clip_lens.patch(half, target=captions[:2], image=image_emb[:2], hook="attn_out", intervention="zero",
                             progress=False)
    exact = clip_lens.patch(tiny_model, target=captions[:2], image=pixels[:2], hook="attn_out", intervention="zero",
                            progress=False)
    assert result.effects.dtype == torch.float32 and result.baseline.dtype == torch.float32
    torch.testing.assert_close(result.effects, exact.effects, atol=tolerance, rtol=0, equal_nan=True)
    assert not torch.equal(result.effects, exact.effects)  # it did run in half precision


def test_joint_space_directions_of_a_half_precision_tower_are_float32(tiny_model):
    from clip_lens.lens import joint_space_directions

    half = clip_lens.HookedCLIP.from_pretrained(zoo.NAME, dtype=torch.bfloat16)
    directions = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))  # float32, as an SAE's decoder
    got = joint_space_directions(half.vision, directions)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, joint_space_directions(tiny_model.vision, directions), atol=0.05, rtol=0.05)


def test_to_dtype_converts_the_towers_and_keeps_the_logit_scale():
    model = clip_lens.HookedCLIP.from_pretrained(zoo.NAME)
    scale = model.logit_scale.detach().clone()
    model.to(torch.float16)
    assert model.dtype == torch.float16 and model.text.dtype == torch.float16
    assert model.logit_scale.dtype == torch.float32 and torch.equal(model.logit_scale.detach(), scale)
    with torch.no_grad():
        assert model(text=model.to_tokens(TEXTS), image=torch.zeros(1, 3, 64, 64)).dtype == torch.float32
    model.to(torch.float32)
    assert model.dtype == torch.float32


def test_from_huggingface_takes_dtype(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.CLIPModel(tiny_hf_config()).eval()
    hf.save_pretrained(tmp_path)
    model = clip_lens.HookedCLIP.from_huggingface(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.logit_scale.dtype == torch.float32
    with torch.no_grad():
        ours = model.encode_image(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        theirs = hf.get_image_features(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
    torch.testing.assert_close(ours.float(), theirs, atol=0.05, rtol=0.05)


def test_the_patch_embedding_is_the_strided_convolution():
    embed = PatchEmbed(16, (4, 4))
    torch.nn.init.normal_(embed.weight)
    pixels = torch.randn(2, 3, 12, 14)  # 14 is not a multiple of 4: the remainder is dropped, as by the convolution
    expected = F.conv2d(pixels, embed.weight, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embed(pixels), expected, atol=1e-5, rtol=1e-5)


def test_every_study_command_takes_dtype_and_device():
    parser = build_parser()
    commands = {"valse-existence": ["all", "--valse", "v.json", "--images", "i", "--out", "o"],
                "cannot": ["negator-attention", "--cannot", "c.tsv", "--out", "o"],
                "attention-cancellation": ["--out", "o"], "attribution": ["--out", "o"], "demo": []}
    for command, rest in commands.items():
        args = parser.parse_args([command, *rest, "--dtype", "bfloat16", "--device", "cpu"])
        assert (args.dtype, args.device) == ("bfloat16", "cpu"), command
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--dtype", "float8"])


def test_a_study_runs_in_bfloat16_from_the_command_line(tmp_path):
    scenes = export_valse(tmp_path / "scenes", 24, seed=9)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        outs[dtype] = out = tmp_path / dtype
        assert main(["valse-existence", "causal-tracing", "--model", zoo.NAME, "--valse", str(scenes), "--images",
                     str(scenes.parent / "images"), "--out", str(out), "--dtype", dtype, "--quiet"]) == 0
    manifest = json.loads((outs["bfloat16"] / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and "bfloat16" in manifest["model"]
    d = {dtype: pd.read_csv(out / "instances.csv")["d"] for dtype, out in outs.items()}
    assert (d["float32"] - d["bfloat16"]).abs().max() < 0.1 and not d["float32"].equals(d["bfloat16"])
