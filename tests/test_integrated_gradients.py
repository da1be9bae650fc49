"""Node-level integrated gradients in `patch` (docs/methods.md#integrated-gradients): a layer's
estimates add up to the exact effect of replacing the whole layer (completeness), far closer than
attribution patching's, and converge as m grows."""

import pytest
import torch

import clip_lens
from clip_lens.data import shapes


@pytest.fixture(scope="module")
def negation(tiny_model):
    examples = list(shapes.examples(10, seed=30_003))
    negated = [e.foil if e.negation_in == "foil" else e.caption for e in examples]
    plain = [e.caption if e.negation_in == "foil" else e.foil for e in examples]
    lengths_equal = [len(tiny_model.to_str_tokens(a)) == len(tiny_model.to_str_tokens(b)) for a, b in zip(negated, plain)]
    assert all(lengths_equal)
    images = tiny_model.to_pixels([shapes.image_of(e) for e in examples])
    return plain, negated, images


@pytest.mark.parametrize("intervention", ["patch", "zero", "mean"])
def test_a_layers_estimates_add_up_to_replacing_the_whole_layer(tiny_model, negation, intervention):
    target, source, images = negation
    kwargs = dict(target=target, image=images, progress=False, intervention=intervention)
    if intervention == "patch":
        kwargs["source"] = source
    layers = [1, 2]  # (zeroing layer 0's attention is so far off the data that m must reach the hundreds)
    exact = clip_lens.patch(tiny_model, hook="attn_out", positions="sequence", layers=layers, **kwargs)
    whole = exact.effects - exact.baseline[:, None]                                   # [pair, layer]
    # per head for "patch" and "mean"; zeroing every head's z would keep the output bias, so
    # "zero" is split by position only
    hook, units = ("attn_out", (2,)) if intervention == "zero" else ("z", (2, 3))
    ig = clip_lens.patch(tiny_model, hook=hook, positions="all", layers=layers, method="integrated_gradients",
                         steps=32, **kwargs)
    first_order = clip_lens.patch(tiny_model, hook=hook, positions="all", layers=layers, method="attribution", **kwargs)
    total_ig = ig.contributions.nansum(dim=units)                                      # [pair, layer]
    total_first = first_order.contributions.nansum(dim=units)
    error_ig, error_first = (total_ig - whole).abs().max(), (total_first - whole).abs().max()
    assert whole.abs().max() > 0.05
    assert error_ig < 2e-3 * whole.abs().max() and error_ig < 0.01 * error_first, (error_ig, error_first)
    shape = (-1,) + (1,) * (ig.effects.ndim - 1)
    torch.testing.assert_close(ig.effects, ig.baseline.view(shape) + ig.contributions, equal_nan=True)


def test_bad_steps_and_sae_are_refused(tiny_model, negation):
    target, source, images = negation
    with pytest.raises(ValueError, match="steps=0: integrated gradients need m >= 1"):
        clip_lens.patch(tiny_model, target=target, source=source, image=images, method="integrated_gradients",
                        steps=0, progress=False)
    with pytest.raises(ValueError, match="Unknown method 'ig'"):
        clip_lens.patch(tiny_model, target=target, source=source, image=images, method="ig", progress=False)
