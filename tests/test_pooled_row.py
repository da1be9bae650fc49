"""`HookedTower.pooled_embedding`: the last block computed at the pooled row only (a text's EOT, an
image's class token) when no hook is attached, the embeddings `forward` gives to float rounding;
with a hook attached, `forward` itself. `forward` keeps every position, so an identity hook leaves
its output bitwise unchanged (tests/test_hooks.py)."""

from __future__ import annotations

import pytest
import torch

from clip_lens.data.shapes import examples, image_of
from clip_lens.scores import encode_images, encode_texts

TEXTS = ["There is a red circle.", "There is no blue square to the left of a green triangle.", "A circle."]


def inputs(model) -> dict:
    return {"text": model.to_tokens(TEXTS), "vision": model.to_pixels([image_of(s) for s in examples(2, seed=3)])}


def last_mlp_inputs(tower, monkeypatch) -> list:
    """Shapes of what the last block's MLP reads, recorded without a hook."""
    seen, mlp = [], tower.blocks[-1].mlp
    forward = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda x: seen.append(tuple(x.shape)) or forward(x))
    return seen


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_pooled_embedding_equals_forward_and_computes_one_row(tiny_model, modality, monkeypatch):
    tower, x = getattr(tiny_model, modality), inputs(tiny_model)[modality]
    seen = last_mlp_inputs(tower, monkeypatch)
    with torch.no_grad():
        fast = tower.pooled_embedding(x)
        assert seen == [(x.shape[0], tower.cfg.d_model)]  # one row per input through the last MLP
        full = tower(x)
        assert len(seen[1]) == 3  # forward: every position
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_with_a_hook_attached_it_is_forward_and_the_hook_sees_every_position(tiny_model, modality):
    tower, x = getattr(tiny_model, modality), inputs(tiny_model)[modality]
    last, shapes = tower.cfg.n_layers - 1, []
    with torch.no_grad(), tower.hooks(fwd_hooks=[(f"blocks.{last}.hook_mlp_out",
                                                  lambda act, hook: shapes.append(tuple(act.shape)))]):
        hooked = tower.pooled_embedding(x)
    assert shapes == [(x.shape[0], tower.n_positions(tower.check_input(x)), tower.cfg.d_model)]
    with torch.no_grad():
        assert torch.equal(hooked, tower(x))


def test_study_encoders_read_the_pooled_embedding(tiny_model):
    scenes = list(examples(3, seed=5))
    pixels = tiny_model.to_pixels([image_of(s) for s in scenes])
    with torch.no_grad():
        torch.testing.assert_close(encode_images(tiny_model, pixels, progress=False), tiny_model.encode_image(pixels),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(encode_texts(tiny_model, TEXTS), tiny_model.encode_text(tiny_model.to_tokens(TEXTS)),
                                   rtol=1e-5, atol=1e-6)


def test_gradients_through_the_pooled_embedding_match_forward(tiny_model):
    pixels = inputs(tiny_model)["vision"].clone().requires_grad_(True)
    tiny_model.vision.pooled_embedding(pixels).square().sum().backward()
    fast = pixels.grad.clone()
    pixels.grad = None
    tiny_model.vision(pixels).square().sum().backward()
    torch.testing.assert_close(fast, pixels.grad, rtol=1e-4, atol=2e-6)  # float rounding of two orders of sums


def zero_head(z, hook):
    """Hook function: head 0's value zeroed (z [batch, pos, head, d_head])."""
    z = z.clone()
    z[:, :, 0] = 0.0
    return z


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_pooled_embedding_with_early_hooks_equals_run_with_hooks_at_one_row(tiny_model, modality, monkeypatch):
    """Hooks in blocks before the last: they fire over every position, the last block runs at the
    pooled row only, and the embedding is run_with_hooks' to float rounding, from the input or
    resumed from a cached residual."""
    tower, x = getattr(tiny_model, modality), inputs(tiny_model)[modality]
    last = tower.cfg.n_layers - 1
    assert last >= 2
    fired = []
    hooks = [("blocks.1.attn.hook_z", lambda z, hook: fired.append(tuple(z.shape)) or zero_head(z, hook))]
    with torch.no_grad():
        _, cache = tower.run_with_cache(x, names_filter=["blocks.1.hook_resid_pre"])
        seen = last_mlp_inputs(tower, monkeypatch)
        fast = tower.pooled_embedding_with_hooks(x, hooks)
        resumed = tower.pooled_embedding_with_hooks(x, hooks, residual=cache["blocks.1.hook_resid_pre"], start_at_layer=1)
        assert seen == [(x.shape[0], tower.cfg.d_model)] * 2  # one row per input through the last MLP
        full = tower.run_with_hooks(x, fwd_hooks=hooks)
    n_positions = tower.n_positions(tower.check_input(x))
    assert [shape[:2] for shape in fired] == [(x.shape[0], n_positions)] * 3
    assert not torch.allclose(full, tower(x))  # the hook changes the embedding
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed, full, rtol=1e-5, atol=1e-6)


def test_pooled_embedding_with_a_hook_in_the_last_block_is_run_with_hooks(tiny_model):
    tower, x = tiny_model.text, inputs(tiny_model)["text"]
    hooks = [(f"blocks.{tower.cfg.n_layers - 1}.attn.hook_z", zero_head)]
    with torch.no_grad():
        assert torch.equal(tower.pooled_embedding_with_hooks(x, hooks), tower.run_with_hooks(x, fwd_hooks=hooks))


def test_a_hook_that_raises_is_removed(tiny_model):
    """The fast path attaches its hooks in a context: an exception inside a hook leaves none behind."""
    tower, x = tiny_model.text, inputs(tiny_model)["text"]

    def fail(z, hook):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        tower.pooled_embedding_with_hooks(x, [("blocks.0.attn.hook_z", fail)])
    assert not any(point._forward_hooks for point in tower._hook_points())
