"""Negator-selective attention (docs/methods.md#negator-selective-attention): a planted head in a hand-built tower is found, and the
scores equal a computation by hand from cached patterns."""

import numpy as np
import pytest
import torch
from circuit_towers import small_random_weights_

from clip_lens.checkpoints import Checkpoints
from clip_lens.config import TextConfig
from clip_lens.studies.analyses import negator_attention
from clip_lens.tokenization import Tokenizer
from clip_lens.towers import HookedTextTower

NEGATED = ["There is no dog.", "There are no people in the picture.", "There is no red car parked here.",
           "There are no animals."]
NON_NEGATED = ["There is a dog.", "There are some people in the picture.", "There is some red car parked here.",
               "There are some animals."]
PLANTED = (1, 2)  # (layer, head)


def planted_tower() -> HookedTextTower:
    """A 3-layer text tower with small random weights in which head 2 of layer 1 attends to the
    token "no" (and nothing else stands out): every token embedding carries a constant query feature
    (+3/-3 on dims 0/1, which LayerNorm keeps), only "no" carries the key feature (dims 2/3), and
    the planted head's W_Q / W_K read exactly those."""
    cfg = TextConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=77, d_embed=16,
                     d_vocab=49408, eot_token_id=49407)
    tokenizer = Tokenizer.default()
    tower = HookedTextTower(cfg, tokenizer)
    gen = small_random_weights_(tower, seed=0)
    with torch.no_grad():
        tower.embed.W_E[:, 4:] = torch.randn(cfg.d_vocab, 28, generator=gen)
        tower.embed.W_E[:, 0], tower.embed.W_E[:, 1] = 3.0, -3.0
        tower.embed.W_E[:, 2:4] = 0.0
        no = int(tokenizer(["no"])[0, 1])
        tower.embed.W_E[no, 2], tower.embed.W_E[no, 3] = 6.0, -6.0
        layer, head = PLANTED
        attn = tower.blocks[layer].attn
        d, dh = cfg.d_model, cfg.d_head
        q_rows = slice(head * dh, (head + 1) * dh)
        k_rows = slice(d + head * dh, d + (head + 1) * dh)
        attn.qkv_weight[q_rows] = 0.0
        attn.qkv_weight[k_rows] = 0.0
        attn.qkv_weight[q_rows.start, 0], attn.qkv_weight[q_rows.start, 1] = 4.0, -4.0
        attn.qkv_weight[k_rows.start, 2], attn.qkv_weight[k_rows.start, 3] = 4.0, -4.0
        attn.qkv_bias[q_rows] = 0.0
        attn.qkv_bias[k_rows] = 0.0
    return tower.eval()


@pytest.mark.parametrize("layout", ["existence", "relative"])
def test_planted_negator_head_is_found(layout):
    tower = planted_tower()
    result = negator_attention.run(tower, NEGATED, NON_NEGATED, layout=layout, progress=False)
    a_n = result.a_n
    assert a_n.shape == (3, 4)
    assert np.unravel_index(a_n.argmax(), a_n.shape) == PLANTED
    others = np.delete(a_n.reshape(-1), PLANTED[0] * 4 + PLANTED[1])
    assert a_n[PLANTED] > 0.5 and others.max() < 0.1
    top = result.head_table().iloc[0]
    assert (top["layer"], top["head"]) == PLANTED
    # the per-query view: the planted head's diff is large at every query from the negator on
    view = result.query_table([PLANTED[0]])
    planted = view[view["head"] == PLANTED[1]].set_index("query")["diff"]
    assert (planted.dropna() > 0.3).all()


def test_control_tower_without_the_planted_head_finds_nothing():
    tower = planted_tower()
    with torch.no_grad():  # remove the key feature of "no": the head no longer singles it out
        tower.embed.W_E[:, 2:4] = 0.0
    result = negator_attention.run(tower, NEGATED, NON_NEGATED, progress=False)
    assert result.a_n.max() < 0.1


def test_scores_equal_cached_patterns_by_hand(vit_b32):
    _, model = vit_b32
    result = negator_attention.run(model, NEGATED, NON_NEGATED, progress=False)
    for i, (neg, non) in enumerate(zip(NEGATED, NON_NEGATED)):
        tn, tp = model.to_tokens([neg]), model.to_tokens([non])
        with torch.no_grad():
            _, cache_n = model.text.run_with_cache(tn)
            _, cache_p = model.text.run_with_cache(tp)
        k, eot = 3, int(tn.argmax())
        for layer in (0, 6, 11):
            name = f"blocks.{layer}.attn.hook_pattern"
            diff = cache_n[name][0, :, k:eot + 1, k] - cache_p[name][0, :, k:eot + 1, k]  # [head, q]
            np.testing.assert_allclose(result.scores[i, layer], diff.max(dim=-1).values.numpy(), atol=1e-6)


def test_pairs_must_differ_at_one_token(vit_b32):
    _, model = vit_b32
    with pytest.raises(ValueError, match="pair 0 differs at 2 token positions"):
        negator_attention.run(model, ["There is no dog."], ["There is one cat."], progress=False)


# Pairs of two lengths given interleaved (short, long, ...), the negator at several positions.
MIXED = [("There is no dog.", "There is a dog."),
         ("In the picture there are no people walking along the long sandy beach today.",
          "In the picture there are some people walking along the long sandy beach today."),
         ("No cat here.", "A cat here."),
         ("Sadly there is no red car parked in the narrow street near the old station.",
          "Sadly there is a red car parked in the narrow street near the old station."),
         ("There are no birds.", "There are some birds."),
         ("On the table there is no cup of coffee next to the plate of fresh bread.",
          "On the table there is a cup of coffee next to the plate of fresh bread.")]


def _recording_forwards(tower, monkeypatch) -> list:
    """The sequence lengths (tokens up to EOT) of the texts of each forward pass of `tower`."""
    seen, forward = [], tower.forward

    def recorded(tokens, **kwargs):
        seen.append(sorted(tower.sequence_lengths(tokens).tolist()) + [tokens.shape[1]])
        return forward(tokens, **kwargs)

    monkeypatch.setattr(tower, "forward", recorded)
    return seen


def test_batches_hold_texts_of_similar_length_and_outputs_keep_the_given_order(monkeypatch, tmp_path):
    tower = planted_tower()
    negated, non_negated = map(list, zip(*MIXED))
    keys = negator_attention.negator_positions(tower.to_tokens(negated), tower.to_tokens(non_negated)).tolist()
    assert len(set(keys)) > 2
    alone = [negator_attention.run(tower, [neg], [non], layout="relative", progress=False) for neg, non in MIXED]
    seen = _recording_forwards(tower, monkeypatch)
    result = negator_attention.run(tower, negated, non_negated, layout="relative", key_positions=keys,
                                   batch_size=3, checkpoints=Checkpoints(tmp_path), progress=False)
    for lengths in seen:  # each forward: the lengths of its texts, then its width
        *texts, width = lengths
        assert max(texts) - min(texts) <= 3 and width == max(texts), seen
    assert list(result.instances["negated"]) == negated
    for name in ("scores", "by_query", "weights"):
        expected = np.concatenate([getattr(one, name) for one in alone])
        np.testing.assert_allclose(getattr(result, name), expected, atol=1e-6, err_msg=name)
    resumed = negator_attention.run(tower, negated, non_negated, layout="relative", key_positions=keys, batch_size=3,
                                    checkpoints=Checkpoints(tmp_path), progress=False)
    assert len(seen) == 2  # the resumed run read both chunks back
    np.testing.assert_array_equal(resumed.by_query, result.by_query)


def test_a_bad_pair_is_named_by_its_given_index():
    tower = planted_tower()
    negated, non_negated = map(list, zip(*MIXED))
    non_negated[4] = "There are many cats."
    with pytest.raises(ValueError, match="pair 4 differs at 2 token positions"):
        negator_attention.run(tower, negated, non_negated, layout="relative", batch_size=2, progress=False)
    with pytest.raises(ValueError, match="pair 2's key position 9 is outside its negated text"):
        negator_attention.run(tower, negated, non_negated, layout="relative", key_positions=[3, 5, 9, 4, 3, 5],
                              progress=False)
