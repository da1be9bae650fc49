"""Latents that separate two groups (docs/methods.md#latents-that-separate-two-groups) and the
negated / plain sentences they are read on (docs/methods.md#negated-sentence)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from clip_lens.data.sentences import is_negated, negation_sentences
from clip_lens.sae import TopKSAE
from clip_lens.sae.separation import auc, input_scores, separating_latents

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_auc_is_the_share_of_pairs_ranked_right():
    rng = np.random.default_rng(0)
    labels = rng.random(40) < 0.4
    scores = np.stack([labels * 1.0, -(labels * 1.0), np.zeros(40), rng.integers(0, 3, 40).astype(float)], axis=1)
    found = auc(scores, labels)
    pos, neg = scores[labels, 3][:, None], scores[~labels, 3][None]
    brute = ((pos > neg) + 0.5 * (pos == neg)).mean()          # every (group, rest) pair, ties half
    np.testing.assert_allclose(found, [1.0, 0.0, 0.5, brute])
    table = separating_latents(torch.tensor(scores), labels)
    assert abs(brute - 0.5) > 0.01 and table["latent"].tolist() == [0, 1, 3, 2]   # by |AUC - 0.5|, ties kept in order
    with pytest.raises(ValueError, match="both groups"):
        auc(scores, np.ones(40, dtype=bool))


def test_input_scores_are_each_text_s_largest_latent_over_its_own_positions(tiny_model):
    sae = TopKSAE(64, 16, k=4, hook="text.blocks.1.hook_resid_post", seed=1).eval()
    texts = ["there is no red circle", "a blue square", "no"]
    scores = input_scores(tiny_model, sae, texts, batch_size=2)
    for i, text in enumerate(texts):
        tokens = tiny_model.to_tokens([text])
        length = int(tiny_model.text.sequence_lengths(tokens)[0])
        _, cache = tiny_model.text.run_with_cache(tokens[:, :length], names_filter="blocks.1.hook_resid_post")
        expected = sae.encode(cache["blocks.1.hook_resid_post"][0]).amax(0)
        torch.testing.assert_close(scores[i], expected.detach(), atol=1e-5, rtol=0)


def test_negated_sentences_from_valse_and_cannot():
    assert is_negated("There is no dog.") and is_negated("He doesn't run.") and is_negated("NOT here")
    assert not is_negated("Nobel prize winners.") and not is_negated("A note on the table.")
    frame = negation_sentences(valse=[SHARED / "valse" / "existence.json"], cannot=[SHARED / "cannot-sources"])
    assert list(frame.columns) == ["sentence", "source", "negated"] and frame["sentence"].is_unique
    assert 0.1 < frame["negated"].mean() < 0.9
    existence = frame[frame["source"].str.endswith("existence.json")]
    assert existence["negated"].any() and (~existence["negated"]).any()
    with pytest.raises(ValueError, match="there is no sentence to read"):
        negation_sentences()
