"""Severed causal tracing (docs/methods.md#severed-causal-tracing): unsevered equals ordinary causal
tracing through `clip_lens.patch`; on a tower that carries negation through attention only, severing
the MLPs changes nothing and severing attention removes the effect before the read-out."""

import numpy as np
import pytest
from circuit_towers import NEGATED, NON_NEGATED, attention_only_tower, linear_metric

import clip_lens
from clip_lens.data import shapes
from clip_lens.severed_tracing import severed_trace


@pytest.fixture(scope="module")
def tiny_pairs(tiny_model):
    """Two scenes: one with the negation in the foil, one in the caption; the negated sentence is the source."""
    examples = list(shapes.examples(2, seed=40_000))
    assert {e.negation_in for e in examples} == {"foil", "caption"}
    negated = [e.foil if e.negation_in == "foil" else e.caption for e in examples]
    plain = [e.caption if e.negation_in == "foil" else e.foil for e in examples]
    images = tiny_model.to_pixels([shapes.image_of(e) for e in examples])
    return negated, plain, images


def test_unsevered_equals_ordinary_causal_tracing(tiny_model, tiny_pairs):
    negated, plain, images = tiny_pairs
    frame = severed_trace(tiny_model, target=plain, source=negated, image=images)
    result = clip_lens.patch(tiny_model, target=plain, source=tiny_model.to_tokens(negated), image=images,
                             hook="resid", positions="all", progress=False)
    s_p, s_n = result.baseline.numpy()[:, None, None], result.source_baseline.numpy()[:, None, None]
    cte = (s_p - result.effects.numpy()) / (s_p - s_n)            # docs/methods.md#causal-tracing-effect-cte
    none = frame[frame["severed"] == "none"]
    lengths = result.lengths.numpy()
    assert len(none) == int(lengths.sum()) * (tiny_model.text.cfg.n_layers + 1)
    np.testing.assert_allclose(none["effect"], cte[none["pair"], none["layer"], none["position"]], atol=1e-5)
    assert set(frame["severed"]) == {"none", "mlp", "attn"} and len(frame) == 3 * len(none)


def test_invariants_of_every_severing(tiny_model, tiny_pairs):
    negated, plain, images = tiny_pairs
    n_layers = tiny_model.text.cfg.n_layers
    frame = severed_trace(tiny_model, target=plain, source=negated, image=images, layers=[0, n_layers])
    eot = tiny_model.text.pooled_positions(tiny_model.to_tokens(plain)).numpy()
    for kind, part in frame.groupby("severed"):
        before = part[part["position"] < 3]                     # before the negator: the target run itself
        assert (before["effect"] == 0).all(), kind
        last = part[(part["layer"] == n_layers) & (part["position"] == eot[part["pair"]])]
        np.testing.assert_allclose(last["effect"], 1, atol=1e-5)  # nothing later to sever: all of d
    layer0 = frame[(frame["layer"] == 0) & (frame["position"] == 3)].set_index(["severed", "pair"])["effect"]
    np.testing.assert_allclose(layer0["none"], 1, atol=1e-5)
    assert not np.allclose(layer0["mlp"], layer0["none"]) and not np.allclose(layer0["attn"], layer0["none"])


def test_attention_only_tower_loses_its_effect_when_attention_is_severed():
    tower = attention_only_tower()
    frame = severed_trace(tower, target=NON_NEGATED, source=NEGATED, metric=linear_metric)
    eot = tower.pooled_positions(tower.to_tokens(NON_NEGATED)).numpy()
    table = frame.pivot_table(index=["pair", "layer", "position"], columns="severed", values="effect")
    # nothing flows through the MLPs: severing them leaves every effect as it was
    np.testing.assert_allclose(table["mlp"], table["none"], atol=1e-6)
    # the negator ("no": the one token that differs) restored at layer 0 carries all of d, and only through attention
    negator = (tower.to_tokens(NEGATED) != tower.to_tokens(NON_NEGATED)).int().argmax(1).numpy()
    at_negator = table.loc[[(pair, 0, int(q)) for pair, q in enumerate(negator)]]
    np.testing.assert_allclose(at_negator["none"], 1, atol=1e-5)
    np.testing.assert_allclose(at_negator["attn"], 0, atol=1e-6)
    read_out = table.index.get_level_values("position") == eot[table.index.get_level_values("pair")]
    assert np.abs(table.loc[~read_out, "none"]).max() > 0.5
    np.testing.assert_allclose(table.loc[~read_out, "attn"], 0, atol=1e-6)
    # at the read-out (EOT) the restored residual reaches the output directly
    assert np.abs(table.loc[read_out, "attn"]).max() > 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"severed": "mlps"}, "severed='mlps': use any of"),
    ({"severed": []}, "severed is empty"),
    ({"layers": 9}, r"layer 9 is out of range \(0..3\)"),
    ({"layers": [(0, 1)]}, r"layer \(0, 1\): give single layers"),
    ({"positions": [99]}, "position 99 is out of range"),
    ({"target": NON_NEGATED[:2]}, "2 corrupted runs for 6 clean runs"),
    ({"metric": "score"}, "needs metric= a callable"),
])
def test_bad_arguments_are_named(kwargs, message):
    arguments = {"target": NON_NEGATED, "source": NEGATED, "metric": linear_metric, **kwargs}
    with pytest.raises(ValueError, match=message):
        severed_trace(attention_only_tower(), **arguments)
