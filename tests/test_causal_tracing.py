"""Causal tracing (docs/methods.md#causal-tracing): shapes, invariants, a hand-written hook loop, and the weighting of
the further-subject slot."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA

from clip_lens.data import ALIGNED_SLOTS, align_positions, weighted_slot_mean
from clip_lens.studies import pair_tasks
from clip_lens.studies.analyses import causal_tracing, existence
from clip_lens.studies.analyses.causal_tracing import CausalTracing


@pytest.fixture(scope="module")
def traced(vit_b32):
    _, model = vit_b32
    image_emb = torch.randn(490, model.vision.cfg.d_embed, generator=torch.Generator().manual_seed(3))
    inst = existence.prepare(model, SHARED_DATA / "valse" / "existence.json", images=image_emb, progress=False)
    # instances of both placements and of different lengths
    lengths = inst.frame["negated"].str.split().str.len()
    pick = pd.concat([inst.frame[inst.frame["negation_in"] == w].assign(n=lengths).drop_duplicates("n").head(3)
                      for w in ("caption", "foil")]).index
    mask = inst.frame.index.isin(pick)
    sub = inst.subset(mask)
    return model, sub, causal_tracing.run(model, sub, progress=False)


def test_shape_and_invariants(traced):
    model, inst, ct = traced
    n = len(inst)
    assert set(inst.frame["negation_in"]) == {"caption", "foil"} and inst.frame["negated"].str.len().nunique() > 1
    assert ct.cte.shape == (n, 13, 8)
    eot = model.text.pooled_positions(model.to_tokens(list(inst.frame["negated"]))).numpy()
    assert np.all(ct.cte_positions[:, :, :3] == 0)                       # before the negator
    np.testing.assert_allclose(ct.cte[:, 0, 3], 1, atol=1e-4)           # negator, layer 0
    np.testing.assert_allclose(ct.cte[:, 12, 7], 1, atol=1e-4)          # EOT, final layer
    for i, e in enumerate(eot):
        assert np.isnan(ct.cte_positions[i, :, e + 1:]).all() and not np.isnan(ct.cte_positions[i, :, : e + 1]).any()


def test_cte_equals_a_hand_written_hook_loop(traced):
    model, inst, ct = traced
    row = inst.frame.iloc[-1]
    assert row["negation_in"] == "foil"
    neg, non = model.to_tokens([row["negated"]]), model.to_tokens([row["non_negated"]])
    image = inst.image_emb[-1:]
    score = lambda emb: (model.logit_scale.exp() * F.cosine_similarity(emb, image)).item()  # noqa: E731
    with torch.no_grad():
        _, cache = model.text.run_with_cache(neg)
        s_c, s_f = score(model.text(non)), score(model.text(neg))
        for layer, q in [(0, 4), (5, 3), (7, 5), (12, int(neg.argmax()) - 1)]:
            name = f"blocks.{layer}.hook_resid_pre" if layer < 12 else "blocks.11.hook_resid_post"

            def put(x, hook, q=q, name=name):
                x[:, q] = cache[name][:, q]
                return x

            s_star = score(model.text.run_with_hooks(non, fwd_hooks=[(name, put)]))
            expected = (s_c - s_star) / (s_c - s_f)       # negation in the foil: d*/d
            assert ct.cte_positions[-1, layer, q] == pytest.approx(expected, abs=1e-4 * max(1, abs(expected)))


def test_segment_means_weight_the_further_subject_slot_by_token_count():
    # two instances: EOT at 8 (further tokens at 5, 6) and at 10 (further tokens at 5..8)
    values = np.zeros((2, 1, 11))
    values[0, 0, 5:7] = [1.0, 3.0]
    values[1, 0, 5:9] = [10.0, 10.0, 10.0, 10.0]
    values[1, 0, 10] = 4.0
    aligned, counts = align_positions(values, np.array([8, 10]))
    assert counts.tolist() == [2, 4]
    assert aligned[0, 0, 5] == 2.0 and aligned[1, 0, 5] == 10.0 and aligned[1, 0, 7] == 4.0
    # weighted: (1 + 3 + 4 * 10) / 6, not the unweighted (2 + 10) / 2
    assert weighted_slot_mean(aligned, counts)[0, 5] == pytest.approx(44 / 6)
    # an instance with a one-token subject (EOT at 6) contributes nothing to that slot
    values3 = np.concatenate([values, np.full((1, 1, 11), 7.0)])
    aligned3, counts3 = align_positions(values3, np.array([8, 10, 6]))
    assert counts3[2] == 0 and aligned3[2, 0, 5] == 0
    assert weighted_slot_mean(aligned3, counts3)[0, 5] == pytest.approx(44 / 6)

    instances = pd.DataFrame({"id": ["a", "b", "c"], "negation_in": "foil", "segment": "correct"})
    ct = CausalTracing(instances, aligned3, counts3, values3)
    means = ct.segment_means()
    assert means.set_index("position").loc["further subject", "cte"] == pytest.approx(44 / 6)
    assert means.set_index("position").loc["EOT", "cte"] == pytest.approx((0 + 4 + 7) / 3)
    loc = ct.localisation()
    tail = means.set_index("position").loc[list(ALIGNED_SLOTS[3:]), "cte"].to_numpy()
    assert loc["localisation"].iloc[0] == pytest.approx(tail.std())


def test_localisation_known_answers():
    # one layer per case, one instance, CTE at the 8 aligned slots (the negator is slot 3)
    cases = {"all of d at the negator (layer 0 by construction)": ([0, 0, 0, 1, 0, 0, 0, 0], 0.4),
             "all of d at EOT (layer L by construction)": ([0, 0, 0, 0, 0, 0, 0, 1], 0.4),
             "all of d at the subject": ([0, 0, 0, 0, 1, 0, 0, 0], 0.4),
             "even over the five slots": ([0, 0, 0, 0.2, 0.2, 0.2, 0.2, 0.2], 0.0),
             "no effect": ([0] * 8, 0.0),
             "before the negator only (not counted)": ([1, 1, 1, 0, 0, 0, 0, 0], 0.0),
             "half at the negator, half at EOT": ([0, 0, 0, 0.5, 0, 0, 0, 0.5], 0.06 ** 0.5),  # sqrt(0.1 - 0.2^2)
             "twice d at EOT": ([0, 0, 0, 0, 0, 0, 0, 2], 0.8)}
    grid = np.array([values for values, _ in cases.values()], dtype=float)[None]  # [1, layer, 8]
    instances = pd.DataFrame({"id": ["a"], "negation_in": "foil", "segment": "correct"})
    loc = CausalTracing(instances, grid, np.ones(1, dtype=int), grid).localisation()
    expected = [answer for _, answer in cases.values()]
    assert loc["layer"].tolist() == list(range(len(cases)))
    np.testing.assert_allclose(loc["localisation"], expected, atol=1e-12, err_msg=str(list(cases)))
    # the minimal-pair tasks' localisation: the same measure over span, +1..+3, EOT
    tail = ["span", "+1", "+2", "+3", "EOT"]
    traced = pd.DataFrame([(layer, position, values[3 + k]) for layer, (values, _) in enumerate(cases.values())
                           for k, position in enumerate(tail)], columns=["layer", "position", "cte"])
    traced = pd.concat([traced, traced.assign(position="-1", cte=1.0)])  # before the span: not counted
    np.testing.assert_allclose(pair_tasks.localisation(traced)["localisation"], expected, atol=1e-12)


def test_a_sample_keeps_each_instance_with_its_own_image(vit_b32):
    _, model = vit_b32
    emb = torch.randn(490, model.vision.cfg.d_embed, generator=torch.Generator().manual_seed(5))
    full = existence.prepare(model, SHARED_DATA / "valse" / "existence.json", images=emb, progress=False)
    sample = existence.prepare(model, SHARED_DATA / "valse" / "existence.json", images=emb, sample=12, seed=1, progress=False)
    assert len(sample) == 12 and set(sample.frame["negation_in"]) == {"caption", "foil"}
    expected = full.frame.set_index("id").loc[sample.frame["id"], "d"].to_numpy()
    np.testing.assert_allclose(sample.frame["d"], expected, atol=1e-5)


def test_pairs_run_shortest_first_and_return_in_the_given_order(tiny_model, monkeypatch):
    """A chunk's cached runs are trimmed to its longest text: `trace` runs the pairs sorted by
    length (so chunks are padded little) and gives every output back in the caller's order."""
    from clip_lens.studies.analyses import causal_tracing as module

    long, short = "a red circle above a blue square and a green triangle", "a dog"
    sources = ["a blue square above a red circle and a green triangle", "a cat", "a big cat", "the dog"]
    targets = [long, short, "a big dog", "a dog"]
    image_emb = torch.randn(4, tiny_model.vision.cfg.d_embed, generator=torch.Generator().manual_seed(0))
    seen = []
    real_patch = module.patch
    monkeypatch.setattr(module, "patch", lambda model, **kw: seen.append(list(kw["target"])) or real_patch(model, **kw))
    cte, eot = causal_tracing.trace(tiny_model, sources, targets, image_emb, ids=[0, 1, 2, 3], progress=False,
                                    pair_chunk=2)
    assert seen == [[short, "a dog"], ["a big dog", long]]  # shortest first, in chunks of 2
    for i in range(4):  # each row is its own pair's, as one pair traced alone
        alone, alone_eot = causal_tracing.trace(tiny_model, sources[i : i + 1], targets[i : i + 1], image_emb[i : i + 1],
                                                ids=[i], progress=False)
        assert eot[i] == alone_eot[0]
        np.testing.assert_allclose(cte[i, :, : eot[i] + 1], alone[0, :, : eot[i] + 1], atol=1e-4)
