"""TransformerLens's activation-patching functions on the vision tower: patch tokens (an input layout
whose last axis is the positions) give the pixels' run bit for bit and TransformerLens's grids equal
`clip_lens.patch` over every position; pixels are refused with an error naming both ways out."""

import functools

import pandas as pd
import pytest
import torch
from conftest import random_pixels
from transformer_lens import patching

import clip_lens
from clip_lens.scores import score

TOL = 1e-5


@pytest.fixture(scope="module", params=["tiny", "vit_b32"])
def any_model(request):
    if request.param == "tiny":
        return request.getfixturevalue("tiny_model")
    return request.getfixturevalue("vit_b32")[1]


def pixels_for(model, n=1, seed=0):
    return random_pixels(n, size=model.vision.cfg.image_size[0], seed=seed)


def text_embedding(model):
    with torch.no_grad():
        return model.encode_text(model.to_tokens(["a photo of a giraffe"]))


def s_metric(model, text_emb):
    """TransformerLens's metric: S of the (one) patched image with a fixed text embedding."""
    return lambda image_emb: score(model, text_emb, image_emb).sum()


# the layout ------------------------------------------------------------------------------------
def test_patch_tokens_layout_is_the_documented_one(tiny_model):
    vision = tiny_model.vision
    (ph, pw), (gh, gw) = vision.cfg.patch_size, vision.cfg.grid_size
    pixels = pixels_for(tiny_model, n=2)
    tokens = vision.to_patch_tokens(pixels)
    assert tokens.shape == (2, 3 * ph * pw, 1 + gh * gw) == (2, vision.d_patch, vision.cfg.n_ctx)
    assert torch.all(tokens[:, :, 0] == 0)
    for b, c, gy, gx, i, j in [(0, 0, 0, 0, 0, 0), (1, 2, gh - 1, gw - 1, ph - 1, pw - 1), (0, 1, 3, 5, 2, 6)]:
        column, row = 1 + gy * gw + gx, c * ph * pw + i * pw + j
        assert tokens[b, row, column] == pixels[b, c, gy * ph + i, gx * pw + j]
    assert torch.equal(vision.from_patch_tokens(tokens), pixels)


def test_patch_tokens_give_the_pixels_run_bit_for_bit(any_model):
    vision = any_model.vision
    pixels = pixels_for(any_model, n=2, seed=3)
    with torch.no_grad():
        out_pixels, cache_pixels = vision.run_with_cache(pixels)
        out_tokens, cache_tokens = vision.run_with_cache(vision.to_patch_tokens(pixels))
    assert torch.equal(out_tokens, out_pixels)
    assert set(cache_tokens.keys()) == set(cache_pixels.keys())
    for name in cache_pixels.keys():
        assert torch.equal(cache_tokens[name], cache_pixels[name]), name


def test_patch_tokens_through_run_with_hooks(tiny_model):
    vision = tiny_model.vision
    pixels = pixels_for(tiny_model, seed=4)

    def zero_patch_3(resid, hook):
        resid = resid.clone()
        resid[:, 3] = 0
        return resid

    hooks = [("blocks.1.hook_resid_pre", zero_patch_3)]
    with torch.no_grad():
        by_pixels = vision.run_with_hooks(pixels, fwd_hooks=hooks)
        by_tokens = vision.run_with_hooks(vision.to_patch_tokens(pixels), fwd_hooks=hooks)
        assert not torch.equal(by_pixels, vision(pixels))
    assert torch.equal(by_tokens, by_pixels)


def test_bad_patch_tokens_are_refused(tiny_model):
    vision = tiny_model.vision
    tokens = vision.to_patch_tokens(pixels_for(tiny_model))
    with pytest.raises(ValueError, match=r"patch tokens must be a tensor of shape \[batch, 192, 65\].*to_patch_tokens"):
        vision(tokens[:, :, :-1])
    with pytest.raises(ValueError, match="column 0 is the class token's slot"):
        vision(torch.cat([torch.ones_like(tokens[:, :, :1]), tokens[:, :, 1:]], dim=2))
    with pytest.raises(ValueError, match="NaN"):
        vision(tokens.index_put((torch.tensor([0]), torch.tensor([5]), torch.tensor([7])), torch.tensor(float("nan"))))


# TransformerLens's grid equals clip_lens.patch ------------------------------------------------
def tl_and_clip_lens(model, layers, positions="all", index_df=None):
    """(TransformerLens's get_act_patch_resid_pre of the corrupted image's patch tokens with the
    clean cache, clip_lens.patch of the same pair) with S against one text embedding."""
    vision, text = model.vision, text_embedding(model)
    clean, corrupted = pixels_for(model, seed=1), pixels_for(model, seed=2)
    with torch.no_grad():
        _, clean_cache = vision.run_with_cache(clean)
        args = (vision, vision.to_patch_tokens(corrupted), clean_cache, s_metric(model, text))
        if index_df is None:
            tl = patching.get_act_patch_resid_pre(*args)
        else:  # get_act_patch_resid_pre with explicit cells
            tl = patching.generic_activation_patch(*args, patch_setter=patching.layer_pos_patch_setter,
                                                   activation_name="resid_pre", index_df=index_df)
    ours = clip_lens.patch(model, target=corrupted, source=clean, text=text, hook="resid", layers=layers,
                           positions=positions, progress=False)
    return tl, ours


def test_tl_resid_pre_grid_equals_clip_lens_patch_on_tiny(tiny_model):
    n_layers, n_ctx = tiny_model.vision.cfg.n_layers, tiny_model.vision.cfg.n_ctx
    tl, ours = tl_and_clip_lens(tiny_model, layers=list(range(n_layers)))
    assert tl.shape == (n_layers, n_ctx) == (3, 65)
    assert ours.dims == ("pair", "layer", "position") and ours.positions == list(range(n_ctx))
    torch.testing.assert_close(tl.cpu(), ours.effects[0].float(), atol=TOL, rtol=0)
    assert (tl[:, -1] - ours.baseline[0]).abs().max() > 1e-3  # the last patch is patched, and matters


def test_tl_resid_pre_cells_equal_clip_lens_patch_on_vit_b32(vit_b32):
    """A few cells of the 12 x 50 grid (TransformerLens's index_df), the last position included."""
    model = vit_b32[1]
    cells = [(0, 0), (5, 17), (11, 49)]
    tl, ours = tl_and_clip_lens(model, layers=[layer for layer, _ in cells], positions=[pos for _, pos in cells],
                                index_df=pd.DataFrame(cells, columns=["layer", "pos"]))
    assert ours.effects.shape == (1, 3, 3) and tl.shape == (3,)
    expected = torch.stack([ours.effects[0, i, i] for i in range(len(cells))])
    torch.testing.assert_close(tl.cpu(), expected.float(), atol=TOL, rtol=0)


@pytest.mark.slow
def test_tl_resid_pre_full_grid_equals_clip_lens_patch_on_vit_b32(vit_b32):
    model = vit_b32[1]
    tl, ours = tl_and_clip_lens(model, layers=list(range(12)))
    assert tl.shape == (12, 50)
    torch.testing.assert_close(tl.cpu(), ours.effects[0].float(), atol=TOL, rtol=0)


# other TransformerLens sweeps on patch tokens ---------------------------------------------------
def hand_patched(model, corrupted_tokens, clean_cache, name, index, text):
    """S of one run with clean_cache[name] patched in at `index` (positions, heads) by a plain hook."""
    def patch(act, hook):
        act = act.clone()
        act[(slice(None), *index)] = clean_cache[name][(slice(None), *index)]
        return act

    with torch.no_grad():
        return float(score(model, text, model.vision.run_with_hooks(corrupted_tokens, fwd_hooks=[(name, patch)])).sum())


@pytest.fixture(scope="module")
def tiny_pair(tiny_model):
    vision, text = tiny_model.vision, text_embedding(tiny_model)
    with torch.no_grad():
        _, clean_cache = vision.run_with_cache(pixels_for(tiny_model, seed=1))
    return vision.to_patch_tokens(pixels_for(tiny_model, seed=2)), clean_cache, text


def test_attn_head_out_by_pos_on_patch_tokens(tiny_model, tiny_pair):
    corrupted, clean_cache, text = tiny_pair
    with torch.no_grad():
        grid = patching.get_act_patch_attn_head_out_by_pos(tiny_model.vision, corrupted, clean_cache,
                                                           s_metric(tiny_model, text))
    assert grid.shape == (3, 65, 4)
    cfg = tiny_model.vision.cfg  # what TransformerLens's patching reads
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads) == (len(tiny_model.vision.blocks), 4, None)
    assert cfg.device == str(next(tiny_model.vision.parameters()).device)
    for layer, pos, head in [(0, 64, 3), (2, 0, 1)]:
        by_hand = hand_patched(tiny_model, corrupted, clean_cache, f"blocks.{layer}.attn.hook_z", (pos, head), text)
        assert abs(float(grid[layer, pos, head]) - by_hand) < TOL


def test_block_every_on_patch_tokens(tiny_model, tiny_pair):
    corrupted, clean_cache, text = tiny_pair
    with torch.no_grad():
        grid = patching.get_act_patch_block_every(tiny_model.vision, corrupted, clean_cache, s_metric(tiny_model, text))
    assert grid.shape == (3, 3, 65)
    for kind, name, layer, pos in [(0, "hook_resid_pre", 1, 64), (1, "hook_attn_out", 2, 7), (2, "hook_mlp_out", 0, 64)]:
        by_hand = hand_patched(tiny_model, corrupted, clean_cache, f"blocks.{layer}.{name}", (pos,), text)
        assert abs(float(grid[kind, layer, pos]) - by_hand) < TOL


# pixels refused -------------------------------------------------------------------------------
REFUSAL = r"pixel columns.*to_patch_tokens\(pixels\).*clip_lens\.patch\(model, .*hook=\"resid\", positions=\"all\"\)"


@pytest.mark.parametrize("sweep,kwargs", [
    (patching.get_act_patch_resid_pre, {}),
    (patching.get_act_patch_resid_pre, {"baseline": True}),  # its first run has no hooks
    (patching.get_act_patch_block_every, {}),
    (patching.get_act_patch_attn_head_out_by_pos, {}),
])
def test_pixels_are_refused_by_transformer_lens_patching(any_model, sweep, kwargs):
    vision = any_model.vision
    clean, corrupted = pixels_for(any_model, seed=1), pixels_for(any_model, seed=2)
    forwards = []
    handle = vision.blocks[0].register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        with torch.no_grad():
            _, clean_cache = vision.run_with_cache(clean)
            forwards.clear()
            with pytest.raises(ValueError, match=REFUSAL):
                sweep(vision, corrupted, clean_cache, lambda emb: emb.sum(), **kwargs)
    finally:
        handle.remove()
    assert not forwards  # refused before the first run, the unhooked baseline run included


def test_a_transformer_lens_patching_hook_on_pixels_is_refused_and_other_hooks_are_not(tiny_model):
    vision = tiny_model.vision
    pixels = pixels_for(tiny_model)
    with torch.no_grad():
        _, cache = vision.run_with_cache(pixels)
        tl_hook = functools.partial(patching.layer_pos_patch_setter, index=[0, 3],
                                    clean_activation=cache["blocks.0.hook_resid_pre"])
        with pytest.raises(ValueError, match=REFUSAL):
            vision.run_with_hooks(pixels, fwd_hooks=[("blocks.0.hook_resid_pre", tl_hook)])
        own = vision.run_with_hooks(pixels, fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: act)])
    assert torch.equal(own, vision(pixels))
