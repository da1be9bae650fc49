"""A causal tower's interventions packed into one token matrix (clip_lens/patching/packed.py): the
layout is the one its docstring states, every packed run equals a full forward pass with a hook,
and the engine takes the packed path whenever it can (and the grouped one when a hook is attached)."""


import torch

import clip_lens
from clip_lens.patching import exact, packed
from clip_lens.patching.packed import Packing

TEXTS = ["a dog", "there is no green triangle above the red circle", "a red circle above a blue square"]
SOURCES = ["a cat", "there is a green triangle above the blue circle", "a blue square above a red circle"]


def test_the_packing_layout_of_three_runs():
    # runs: pair 4 from position 2 (3 rows), pair 0 from 0 (5 rows), pair 4 from 4 (1 row)
    packing = Packing.of([4, 0, 4], [2, 0, 4], [3, 5, 1], 2, "cpu")  # two heads
    assert packing.row_ends == [0, 3, 8, 9] and packing.pooled_rows == [2, 7, 8]
    assert (packing.depth, packing.width) == (5, 5)
    # row by row, heads 0 and 1: (run * heads + head) * depth + j
    assert packing.query_index.view(-1, 2).tolist() == [[0, 5], [1, 6], [2, 7], [10, 15], [11, 16], [12, 17],
                                                        [13, 18], [14, 19], [20, 25]]
    # (run * heads + head) * width + suffix + j
    assert packing.key_index.view(-1, 2).tolist() == [[2, 7], [3, 8], [4, 9], [10, 15], [11, 16], [12, 17],
                                                      [13, 18], [14, 19], [24, 29]]
    assert packing.pairs.tolist() == [4, 0, 4] and packing.lengths.tolist() == [5, 5, 5]
    # the first run's query row 0 sits at position 2: it sees keys 0..2, not 3 or 4
    assert packing.hidden[0, 0].tolist() == [False, False, False, True, True]
    assert packing.hidden[1, 0].tolist() == [False, True, True, True, True]


def full_pass(tower, tokens, layer, pos, source_resid):
    """The embedding of one forward pass of `tokens` [1, length] with the residual entering block
    `layer` (or the final norm) replaced at `pos` by the source's."""
    name = clip_lens.hook_name("resid", layer, tower.cfg.n_layers)

    def patch(act, hook):
        act = act.clone()
        act[0, pos] = source_resid
        return act

    with torch.no_grad():
        return tower.run_with_hooks(tokens, fwd_hooks=[(name, patch)])[0]


def test_packed_runs_of_every_suffix_length_equal_full_passes(tiny64, monkeypatch):
    """Every layer x every position of texts of different lengths in one packed batch."""
    tower = tiny64.text
    calls = []
    monkeypatch.setattr(exact, "resume_packed", lambda *a, **k: calls.append(a[3]) or packed.resume_packed(*a, **k))
    targets, sources = tiny64.to_tokens(TEXTS), tiny64.to_tokens(SOURCES)
    result = clip_lens.patch(tiny64, target=targets, source=sources, metric="embedding", batch_size=10_000,
                             progress=False)
    assert len(calls) == 1 and len(set(calls[0].lengths.tolist())) == 3  # one batch, three lengths
    with torch.no_grad():
        _, cache_s = tower.run_with_cache(sources)
        _, cache_t = tower.run_with_cache(targets)
    checked = 0
    for i, length in enumerate(result.lengths.tolist()):
        for layer in range(tower.cfg.n_layers + 1):
            name = clip_lens.hook_name("resid", layer, tower.cfg.n_layers)
            source, target = cache_s[name][i], cache_t[name][i]
            for pos in range(length):
                if torch.equal(source[pos], target[pos]):
                    continue  # a no-op: the engine writes the baseline without a run
                expected = full_pass(tower, targets[i : i + 1, :length], layer, pos, source[pos])
                torch.testing.assert_close(result.effects[i, layer, pos], expected.float(), atol=1e-6, rtol=0)
                checked += 1
    assert checked > 50


def test_a_hook_on_the_tower_takes_the_grouped_path_with_the_same_results(tiny_model, monkeypatch):
    """A user's hook must see runs shaped as the tower's own ([batch, pos, ...]): with one
    attached, the engine runs unpacked, and the results agree."""
    calls = []
    monkeypatch.setattr(exact, "resume_packed", lambda *a, **k: calls.append(1) or packed.resume_packed(*a, **k))
    args = dict(target=TEXTS, source=SOURCES, metric="embedding", progress=False)
    plain = clip_lens.patch(tiny_model, **args)
    assert calls
    calls.clear()
    seen = []
    with tiny_model.text.hooks(fwd_hooks=[("blocks.1.attn.hook_q", lambda act, hook: seen.append(act.ndim))]):
        hooked = clip_lens.patch(tiny_model, **args)
    assert not calls and set(seen) == {4}
    torch.testing.assert_close(plain.effects, hooked.effects, atol=2e-5, rtol=0, equal_nan=True)


def test_the_target_run_caches_only_what_the_asked_layers_read(tiny_model, monkeypatch):
    """A run resumed at layer l reads the residual it resumes from and the keys and values of the
    blocks from l on: the cached target run keeps those and nothing earlier."""
    recorded = []
    real = exact.run_cached
    monkeypatch.setattr(exact, "run_cached", lambda tower, inputs, names, **kw: recorded.append(set(names))
                        or real(tower, inputs, names, **kw))
    n = tiny_model.text.cfg.n_layers
    args = dict(target=TEXTS, source=SOURCES, metric="embedding", progress=False)
    late = clip_lens.patch(tiny_model, layers=[n - 1], **args)
    assert recorded[0] == {f"blocks.{n - 1}.hook_resid_pre", f"blocks.{n - 1}.attn.hook_k", f"blocks.{n - 1}.attn.hook_v"}
    recorded.clear()
    clip_lens.patch(tiny_model, layers=[1], hook="mlp_out", **args)  # resumes after block 1: reads its resid_mid too
    assert recorded[0] == {"blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post",
                           *(f"blocks.{b}.attn.hook_{kv}" for b in range(2, n) for kv in "kv")}
    every = clip_lens.patch(tiny_model, **args)
    torch.testing.assert_close(late.effects[:, 0], every.effects[:, n - 1], atol=1e-5, rtol=0, equal_nan=True)
