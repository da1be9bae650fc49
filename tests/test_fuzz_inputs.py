"""Property-based checks of `patch` and the input boundary on the shipped tiny CLIP: whatever the
texts, tokens, pixels and grid arguments, the outcome is either a correct-shaped result with a
number in every measured cell, or a ValueError / TypeError whose message names the argument or
item. Never an empty grid, a silent NaN, or an exception from inside torch."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clip_lens
from clip_lens import tiny

pytestmark = pytest.mark.filterwarnings("ignore:text .* fills all")
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)
MODEL = clip_lens.HookedCLIP.from_pretrained(tiny.NAME)
with torch.no_grad():
    IMAGE_EMB = MODEL.encode_image(torch.zeros(1, 3, 64, 64))
TEXT_EMB = MODEL.encode_text(MODEL.to_tokens(["a red circle"])).detach()
NAMES = ("target", "source", "text", "image", "layer", "position", "head", "neuron", "token", "pixel", "texts",
         "images", "metric", "hook", "intervention")


def _outcome(run):
    """The result of `run()`, or the ValueError / TypeError it raised (anything else fails)."""
    try:
        return run()
    except (ValueError, TypeError) as err:
        message = str(err)
        assert any(name in message for name in NAMES), f"the error names no argument or item: {message}"
        return err


def _assert_complete(result, n_pairs):
    """Every measured cell holds a number; only positions past a pair's length may be NaN."""
    assert isinstance(result, clip_lens.PatchResult)
    assert result.effects.shape[0] == n_pairs and result.effects.numel() > 0
    assert torch.isfinite(result.baseline).all()
    if "position" not in result.dims:
        assert torch.isfinite(result.effects).all()
    else:
        axis = result.dims.index("position")
        measured = ~torch.isnan(result.effects).all(dim=axis)
        assert measured.all(), "a whole row of positions is NaN"


texts = st.lists(st.text(min_size=0, max_size=60), min_size=0, max_size=3)
layer_args = st.one_of(st.just("all"), st.just(""), st.text(max_size=3), st.integers(-2, 5),
                       st.lists(st.integers(-2, 5), max_size=4), st.integers(0, 3).map(np.int64),
                       st.floats(allow_nan=True), st.none())
position_args = st.one_of(st.just("all"), st.just("sequence"), st.integers(-2, 20), st.lists(st.integers(-1, 20), max_size=3))
head_args = st.one_of(st.just("all"), st.integers(-1, 5), st.lists(st.integers(-1, 5), max_size=3))


@FUZZ
@given(target=texts, layers=layer_args, positions=position_args)
def test_text_patching_grids(target, layers, positions):
    out = _outcome(lambda: clip_lens.patch(MODEL, target=target, image=IMAGE_EMB, intervention="zero", layers=layers,
                                           positions=positions, progress=False))
    if not isinstance(out, Exception):
        _assert_complete(out, len(target))


@FUZZ
@given(heads=head_args, layers=layer_args, method=st.sampled_from(["exact", "attribution"]))
def test_head_grids(heads, layers, method):
    out = _outcome(lambda: clip_lens.patch(MODEL, target=["a red circle", "two blue squares"], image=IMAGE_EMB,
                                           hook="z", heads=heads, layers=layers, positions="sequence",
                                           intervention="zero", method=method, progress=False))
    if not isinstance(out, Exception):
        _assert_complete(out, 2)
        assert out.effects.shape[-1] == len(out.heads) > 0


@FUZZ
@given(rows=st.integers(0, 3), width=st.integers(0, 20),
       ids=st.lists(st.integers(-3, 49420), min_size=60, max_size=60))
def test_token_tensors(rows, width, ids):
    tokens = torch.tensor((ids * 2)[: rows * width], dtype=torch.long).reshape(rows, width)
    out = _outcome(lambda: clip_lens.patch(MODEL, target=tokens, image=IMAGE_EMB, intervention="zero", layers=[1],
                                           progress=False))
    if not isinstance(out, Exception):
        _assert_complete(out, rows)


pixel_values = st.one_of(st.floats(-3, 3, width=32), st.floats(allow_nan=True, allow_infinity=True, width=32),
                         st.floats(0, 255, width=32))


@FUZZ
@given(n=st.integers(0, 2), value=pixel_values, dtype=st.sampled_from([torch.float32, torch.float64, torch.uint8]),
       layers=layer_args)
def test_pixel_tensors(n, value, dtype, layers):
    pixels = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    if n:
        pixels[-1, 0, 0, 0] = value
    out = _outcome(lambda: clip_lens.patch(MODEL, target=pixels.to(dtype) if dtype != torch.uint8 else pixels.clamp(0, 255).to(dtype),
                                           text=TEXT_EMB, intervention="zero", layers=layers, positions=[0, 3],
                                           progress=False))
    if not isinstance(out, Exception):
        _assert_complete(out, n)


@FUZZ
@given(texts=st.lists(st.one_of(st.text(max_size=30), st.integers(), st.none(), st.binary(max_size=4)), max_size=4))
def test_to_tokens(texts):
    out = _outcome(lambda: MODEL.to_tokens(texts))
    if not isinstance(out, Exception):
        assert out.shape[0] == len(texts) and out.shape[1] <= MODEL.text.cfg.n_ctx
