"""The exact engine decides a chunk's no-ops with one comparison per layer (`exact.changed_cells`) and
builds a packed batch's residuals with one gather (`sites.resumed_residuals`): both equal their
per-cell forms (`torch.equal` per cell, `HookKind.resumed_residual` per run) bit for bit, and
`patch` runs the same interventions and writes the same cells as when every cell is compared alone."""

import copy

import pytest
import torch

import clip_lens
from clip_lens.patching import exact
from clip_lens.patching.request import Plan
from clip_lens.patching.sites import KINDS, resumed_residuals

TEXTS = ["a red circle above a blue square", "there is no green triangle here", "a dog"]
SOURCES = ["a red circle above a red square", "there is a green triangle here", "a cat"]
SAME_LENGTH = ["a red dog", "a blue cat", "a red cat"]


def tensor_cells(kind: str, generator: torch.Generator) -> torch.Tensor:
    """A random chunk activation of hook kind `kind`: [pair 3, pos 4, (head 2,) d 3]."""
    site = (2, 3) if KINDS[kind].unit_axis == "head" else (3,)
    return torch.randn(3, 4, *site, generator=generator)


@pytest.mark.parametrize("kind,intervention", [("resid", "patch"), ("z", "mean"), ("mlp_out", "zero")])
def test_changed_cells_equal_torch_equal_cell_by_cell(tiny_model, kind, intervention):
    """A cell equal to its replacement but for the sign of a zero is unchanged (0.0 == -0.0); one
    equal but for a NaN (in both, for "patch") is changed (NaN != NaN), as for torch.equal."""
    layer, generator = 1, torch.Generator().manual_seed(0)
    plan = Plan(KINDS[kind], [layer], None, None, intervention)
    act_t = tensor_cells(kind, generator)
    mean = torch.randn(act_t.shape[2:], generator=generator)
    mean.view(-1)[0] = 0.0
    act_s = act_t.clone()
    act_s[0, 1] += 1.0
    act_s[1, 2].view(-1)[0] = 0.0
    rep = exact.replacement(plan, act_t, act_s, mean)  # [pair, pos, ...]; for "patch", act_s itself
    act_t[1, 2] = rep[1, 2]
    act_t[1, 2].view(-1)[0] = -0.0
    act_t[0, 3] = rep[0, 3]
    act_t[0, 3].view(-1)[0] = float("nan")
    act_s[0, 3].view(-1)[0] = float("nan")
    name = KINDS[kind].hook_name(layer, tiny_model.text.cfg.n_layers)
    cache_s = {name: act_s} if intervention == "patch" else None
    changed = exact.changed_cells(plan, tiny_model.text, {name: act_t}, cache_s, None, {layer: mean})
    expected = [[next(exact.unit_replacements(plan, act_t[p, pos], act_s[p, pos] if cache_s else None, mean))[1]
                 is not None for pos in range(4)] for p in range(3)]
    assert changed == {layer: expected}
    assert expected[0][3] and not expected[1][2]


@pytest.mark.parametrize("hook,positions,intervention", [
    (["attn_out", "mlp_out"], "all", "patch"), ("mlp_out", "sequence", "patch"), ("resid", [(1, 2), 3], "zero"),
    ("attn_out", "all", "resample"), ("resid", "all", "mean")])
def test_patch_runs_the_same_interventions_as_cell_by_cell(tiny_model, monkeypatch, hook, positions, intervention):
    """Sources that share a prefix with their targets (a causal tower: no-ops there), several hook
    kinds, whole sequences and joint positions: the same runs and the same effects, bit for bit,
    as when each cell is compared alone."""
    runs = {"chunk": [], "cell": []}
    original = exact.run_items

    def recording(into: list):
        def run_items(request, items, cache_t, chunk, *args):  # an item's pair is its row of the chunk
            into.extend((chunk[it.pair], it.key, it.start, it.suffix, it.rows) for it in items)
            return original(request, items, cache_t, chunk, *args)
        return run_items

    targets = SAME_LENGTH if intervention == "resample" else TEXTS  # resampled sources need the targets' lengths
    kwargs = dict(target=targets, source=SOURCES if intervention == "patch" else None, hook=hook, positions=positions,
                  intervention=intervention, metric="embedding", batch_size=16, progress=False)
    monkeypatch.setattr(exact, "run_items", recording(runs["chunk"]))
    by_chunk = clip_lens.patch(tiny_model, **kwargs)
    monkeypatch.setattr(exact, "changed_cells", lambda *args: {})
    monkeypatch.setattr(exact, "run_items", recording(runs["cell"]))
    by_cell = clip_lens.patch(tiny_model, **kwargs)
    assert runs["chunk"] == runs["cell"]
    assert torch.equal(by_chunk.effects.isnan(), by_cell.effects.isnan())
    assert torch.equal(by_chunk.effects.nan_to_num(), by_cell.effects.nan_to_num())
    if intervention == "patch" and positions == "all":
        cells = {cell for cell in zip(*(~by_chunk.effects[..., 0].isnan()).nonzero().T.tolist())}
        noops = cells - {(pair, *key) for pair, key, *_ in runs["chunk"]}
        assert 0 < len(noops) < len(cells)  # some cells are no-ops, some run
        for cell in noops:  # a no-op holds its pair's baseline
            assert torch.equal(by_chunk.effects[cell], by_chunk.baseline[cell[0]])


def test_a_nan_in_both_runs_is_a_change_not_a_noop(tiny_model, monkeypatch):
    """A token embedding with a NaN: target and source hold the same NaN at position 1 of the
    pair, so torch.equal calls the cell changed, and the engine runs it."""
    model = copy.deepcopy(tiny_model)
    tokens_t, tokens_s = model.to_tokens(TEXTS[:1]), model.to_tokens(SOURCES[:1])
    with torch.no_grad():
        model.text.W_E[tokens_t[0, 1], 0] = float("nan")
    keys = []
    original = exact.run_items
    monkeypatch.setattr(exact, "run_items",
                        lambda request, items, *args: keys.extend(it.key for it in items) or original(request, items, *args))
    clip_lens.patch(model, target=tokens_t, source=tokens_s, layers=[0], metric="embedding", progress=False)
    assert (0, 1) in keys                          # the NaN cell runs
    assert (0, 0) not in keys and (0, 2) not in keys  # the equal positions around it do not


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
