"""The exact engine caches pairs shortest target first (`exact.chunk_order`): a chunk of texts,
trimmed to its own longest, carries little padding. Results land at each pair's own index."""

import torch

import clip_lens
from clip_lens.patching import exact

SHORT = ["A circle.", "No square.", "A red one."]
LONG = ["There is no blue square to the left of a green triangle.", "There is a red circle above a small blue square.",
        "There are some triangles to the right of the green circle."]


def test_chunks_are_cached_shortest_first_and_effects_stay_at_their_pairs(tiny_model, monkeypatch):
    targets = [LONG[0], SHORT[0], LONG[1], SHORT[1], LONG[2], SHORT[2]]
    sources = [t.replace("no ", "a ").replace("A ", "No ") for t in targets]
    widths = []

    def recording(run):
        def record(tower, inputs, *args, **kwargs):
            widths.append(tower.n_positions(tower.check_input(inputs)))
            return run(tower, inputs, *args, **kwargs)
        return record

    monkeypatch.setattr(exact, "run_cached", recording(exact.run_cached))  # the target runs
    monkeypatch.setattr(exact, "run_cached_after_shared_prefix", recording(exact.run_cached_after_shared_prefix))
    kwargs = dict(metric="embedding", pair_chunk=3, batch_size=16, progress=False)
    result = clip_lens.patch(tiny_model, target=targets, source=sources, **kwargs)
    lengths = tiny_model.text.sequence_lengths(tiny_model.to_tokens(targets))
    short_width = int(lengths[[1, 3, 5]].max())
    assert widths[:2] == [short_width, short_width]  # the short texts' chunk first (target, then source run)
    assert short_width < int(lengths.max())

    # the same pairs given in another order: every pair's cells and baselines at its own index
    order = [5, 2, 0, 3, 1, 4]
    again = clip_lens.patch(tiny_model, target=[targets[i] for i in order], source=[sources[i] for i in order], **kwargs)
    torch.testing.assert_close(again.baseline, result.baseline[order], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again.effects, result.effects[order], rtol=1e-5, atol=1e-6, equal_nan=True)
    own = torch.stack([tiny_model.encode_text(tiny_model.to_tokens([t]))[0] for t in targets]).detach()
    torch.testing.assert_close(result.baseline, own, rtol=1e-5, atol=1e-6)


def test_chunk_order_is_stable_and_shortest_first():
    assert exact.chunk_order(torch.tensor([5, 3, 5, 2, 3])) == [3, 1, 4, 0, 2]
    assert exact.chunk_order(torch.tensor([50, 50, 50])) == [0, 1, 2]  # images keep their order
