"""The exact engine builds a packed batch's residuals with one gather (`sites.resumed_residuals`):
they equal each run's `HookKind.resumed_residual` bit for bit."""


import pytest
import torch

from clip_lens.patching.sites import KINDS, resumed_residuals

TEXTS = ["a red circle above a blue square", "there is no green triangle here", "a dog"]


def mixed_recipes(tower, cache: dict, lengths: list[int]) -> list[tuple]:
    """(hook kind, layer, pair, positions replaced, first position, end, replacement) of runs that
    resume from different residuals, at an int, a list and a slice of positions, from several suffixes."""
    generator = torch.Generator().manual_seed(1)
    runs = [("resid", 0, 0, 2, 0, lengths[0]), ("resid", 2, 1, slice(0, lengths[1]), 0, lengths[1]),
            ("attn_out", 1, 2, 3, 3, lengths[2]), ("z", 1, 0, [1, 2], 1, lengths[0]),
            ("mlp_post", 0, 1, 4, 2, lengths[1]), ("resid", 0, 2, 1, 1, lengths[2])]
    out = []
    for kind, layer, pair, sel, first, end in runs:
        act = cache[KINDS[kind].hook_name(layer, tower.cfg.n_layers)][pair][sel]
        out.append((kind, layer, pair, sel, first, end, torch.randn(act.shape, generator=generator)))
    return out


@pytest.mark.parametrize("mixed", [True, False])
def test_a_batched_state_equals_each_runs_resumed_residual(tiny_model, mixed):
    """Runs of several hook kinds and layers (several cached residuals), or of one residual."""
    tower = tiny_model.text
    tokens = tiny_model.to_tokens(TEXTS)
    with torch.no_grad():
        cache = tower.run_with_cache(tokens)[1].cache_dict
    lengths = tower.sequence_lengths(tokens).tolist()
    runs = mixed_recipes(tower, cache, lengths)
    if not mixed:
        runs = [run for run in runs if run[:2] == ("resid", 0)]
    recipes = [KINDS[kind].residual_recipe(tower, layer, lambda rep=rep: rep, cache, pair, sel, first, end)
               for kind, layer, pair, sel, first, end, rep in runs]
    one_by_one = [KINDS[kind].resumed_residual(tower, layer, rep, cache, pair, sel, first, end)
                  for kind, layer, pair, sel, first, end, rep in runs]
    batched = resumed_residuals(cache, recipes)
    assert torch.equal(batched, torch.cat(one_by_one))
    for (kind, layer, pair, sel, first, end, rep), state in zip(runs, one_by_one):
        if kind == "resid":  # the residual itself: the cached rows, with the replaced ones written
            expected = cache[KINDS[kind].resumed_name(layer, tower.cfg.n_layers)][pair, first:end].clone()
            expected[sel - first if isinstance(sel, int) else slice(sel.start - first, sel.stop - first)] = rep
            assert torch.equal(state, expected)
