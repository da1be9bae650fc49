"""The negation studies' text tools on any minimal-pair set (clip_lens.studies.analyses.minimal_pairs):
on VALSE existence they give the existence study's own arrays, and they run on pieces whose
pairs differ in several tokens."""

import numpy as np
import torch
from conftest import SHARED_DATA

from clip_lens.data import valse_existence_pairs, valse_pairs
from clip_lens.studies.analyses import causal_tracing, existence, minimal_pairs, negator_attention

VALSE = SHARED_DATA / "valse"
N = 10


def test_on_existence_the_general_tools_give_the_existence_studys_arrays(vit_b32):
    _, model = vit_b32
    tokenize = lambda texts: model.to_tokens(texts, trim=False)  # noqa: E731
    image_emb = torch.randn(490, model.text.cfg.d_embed, generator=torch.Generator().manual_seed(0))
    instances = existence.prepare(model, VALSE / "existence.json", images=image_emb, limit=N, progress=False)
    pairs = valse_existence_pairs(VALSE / "existence.json", tokenize)
    pairs.pairs = pairs.pairs.head(N)
    assert pairs.pairs["id"].tolist() == instances.frame["id"].tolist()
    marked = minimal_pairs.existence_marked(pairs)
    assert (np.where(marked, "caption", "foil") == instances.frame["negation_in"].to_numpy()).all()

    study = causal_tracing.run(model, instances, progress=False)
    general = minimal_pairs.trace(model, pairs, instances.image_emb, marked, every_position=True, progress=False)
    np.testing.assert_allclose(general.cte_positions, study.cte_positions, atol=1e-6, equal_nan=True)
    assert np.isfinite(general.relative[:, :, 2]).all()  # the negator's position
    # by default only the 7 reported positions are traced, with the same values
    reported = minimal_pairs.trace(model, pairs, instances.image_emb, marked, progress=False)
    assert reported.cte_positions is None
    np.testing.assert_allclose(reported.relative, general.relative, atol=1e-5, equal_nan=True)

    heads = negator_attention.run(model, list(instances.frame["negated"]), list(instances.frame["non_negated"]),
                                  progress=False)
    selective = minimal_pairs.selective_heads(model, pairs, marked, layout="existence", progress=False)
    np.testing.assert_allclose(selective.scores, heads.scores, atol=1e-6)
    np.testing.assert_allclose(selective.by_query, heads.by_query, atol=1e-6, equal_nan=True)


def test_pairs_that_differ_in_several_tokens(vit_b32):
    _, model = vit_b32
    pairs = valse_pairs(VALSE / "counting-small-quant.json", lambda texts: model.to_tokens(texts, trim=False))
    wide = pairs.pairs[(pairs.pairs["span_end"] - pairs.pairs["span_start"]) > 1].head(3)
    pairs.pairs = wide.reset_index(drop=True)
    assert len(pairs) == 3
    selective = minimal_pairs.selective_heads(model, pairs, progress=False)
    assert selective.scores.shape == (3, 12, 8) and np.isfinite(selective.scores).all()
    image_emb = torch.randn(3, model.text.cfg.d_embed, generator=torch.Generator().manual_seed(1))
    traced = minimal_pairs.trace(model, pairs, image_emb, every_position=True, progress=False)
    eot = traced.pairs["length"].to_numpy() - 1
    np.testing.assert_array_equal(traced.relative[:, :, -1], traced.cte_positions[np.arange(3), :, eot])
    reported = minimal_pairs.trace(model, pairs, image_emb, progress=False)  # the 7 positions alone
    np.testing.assert_allclose(reported.relative, traced.relative, atol=1e-5, equal_nan=True)
    table = traced.frame()
    assert set(table["position"]) == set(minimal_pairs.RELATIVE) and len(table) == 13 * 7
