"""The source run of a patch computed from its first token that differs from its target's
(resume.run_cached_after_shared_prefix): the same cache and embeddings as a full run, the shared
prefix copied from the target's cached run, and only the positions after it computed."""


import pytest
import torch

import clip_lens
from clip_lens.hooks import act_name
from clip_lens.patching import exact, resume
from clip_lens.patching.resume import run_cached, run_cached_after_shared_prefix

# targets and sources that share 1 (SOT only), 3 and all of their tokens
TARGETS = ["a dog", "there is no green triangle above the red circle", "a red circle above a blue square"]
SOURCES = ["the cat", "there is a green triangle above the blue circle", "a red circle above a blue square"]


def residual_names(tower) -> set[str]:
    n = tower.cfg.n_layers
    return {clip_lens.hook_name("resid", layer, n) for layer in range(n + 1)}


def target_run(tower, targets):
    names = residual_names(tower) | {act_name(kv, b) for b in range(tower.cfg.n_layers) for kv in "kv"}
    return run_cached(tower, targets, names, embedding_only=True)[1]


def test_equals_a_full_source_run_and_copies_the_shared_prefix(tiny64):
    tower = tiny64.text
    targets, sources = tiny64.to_tokens(TARGETS), tiny64.to_tokens(SOURCES)
    cache_t = target_run(tower, targets)
    names = residual_names(tower)
    emb_full, full = run_cached(tower, sources, names, embedding_only=True)
    emb, cache = run_cached_after_shared_prefix(tower, sources, names, cache_t, targets)
    torch.testing.assert_close(emb, emb_full, atol=1e-10, rtol=0)
    assert cache.keys() == full.keys()
    eot = int(tower.pooled_positions(sources)[2])
    shared = [1, 3, eot]  # the third pair is one text: all but its pooled (EOT) row are the target's
    for name in names:
        torch.testing.assert_close(cache[name], full[name], atol=1e-10, rtol=0)
        for i, n in enumerate(shared):
            assert torch.equal(cache[name][i, :n], cache_t[name][i, :n]), (name, i)


def test_the_blocks_compute_only_the_positions_after_the_shared_prefix(tiny_model, monkeypatch):
    """Without the shared prefix every block would see all 10 positions of every source."""
    tower = tiny_model.text
    targets, sources = tiny_model.to_tokens(TARGETS[1:2]), tiny_model.to_tokens(SOURCES[1:2])
    cache_t = target_run(tower, targets)
    widths = []
    block = tower.blocks[0]
    real = type(block).forward
    monkeypatch.setattr(type(block), "forward", lambda self, x, *a, **k: widths.append(x.shape[1]) or real(self, x, *a, **k))
    run_cached_after_shared_prefix(tower, sources, residual_names(tower), cache_t, targets)
    assert sources.shape[1] >= 10 and set(widths) == {int(tower.sequence_lengths(sources)[0]) - 3}


@pytest.mark.parametrize("case", ["hook attached", "not the residual stream", "keys and values missing"])
def test_falls_back_to_a_full_run_where_the_shortcut_does_not_hold(tiny_model, monkeypatch, case):
    tower = tiny_model.text
    targets, sources = tiny_model.to_tokens(TARGETS), tiny_model.to_tokens(SOURCES)
    cache_t = target_run(tower, targets)
    names = {"blocks.1.hook_mlp_out"} if case == "not the residual stream" else residual_names(tower)
    if case == "keys and values missing":
        cache_t = {n: a for n, a in cache_t.items() if n != act_name("k", 0)}
    calls = []
    monkeypatch.setattr(resume, "run_cached", lambda *a, **k: calls.append(1) or run_cached(*a, **k))
    hooks = [("blocks.0.hook_resid_mid", lambda act, hook: act)] if case == "hook attached" else []
    with tower.hooks(fwd_hooks=hooks):
        emb, cache = run_cached_after_shared_prefix(tower, sources, names, cache_t, targets)
    assert calls == [1] and cache.keys() == names


def test_patch_uses_it_and_its_effects_equal_full_passes(tiny64, monkeypatch):
    """clip_lens.patch's source runs take the shortcut; the effects equal those computed with a
    full source run to float64 rounding."""
    args = dict(target=TARGETS, source=SOURCES, metric="embedding", progress=False)
    calls = []
    real = exact.run_cached_after_shared_prefix
    monkeypatch.setattr(exact, "run_cached_after_shared_prefix", lambda *a, **k: calls.append(1) or real(*a, **k))
    shortcut = clip_lens.patch(tiny64, **args)
    assert calls
    monkeypatch.setattr(exact, "run_cached_after_shared_prefix",
                        lambda tower, inputs, names, *rest: run_cached(tower, inputs, names, embedding_only=True))
    full = clip_lens.patch(tiny64, **args)
    torch.testing.assert_close(shortcut.effects, full.effects, atol=1e-10, rtol=0, equal_nan=True)
    torch.testing.assert_close(shortcut.source_baseline, full.source_baseline, atol=1e-10, rtol=0)
