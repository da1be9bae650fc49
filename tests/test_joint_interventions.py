"""Joint interventions (docs/methods.md#joint-interventions-and-their-interaction): a tuple of layers,
positions or units is one intervention made at all of them together. Each cell of `patch` equals a
hook-function loop that makes the same replacements in one full forward pass, on both towers of the
tiny CLIP, for every hook kind and intervention; bad groups are refused by name."""


import numpy as np
import pytest
import torch
from circuit_towers import AND_POSITIONS, AND_SOURCE, AND_TARGET, and_tower, linear_metric
from conftest import random_pixels

import clip_lens
from clip_lens.sae import TopKSAE

TEXTS = ["a red circle above a blue square", "there is no green triangle here"]
SOURCES = ["a blue square above a red circle", "there is a green triangle here"]
TOL = 1e-6  # the towers run in float64 here: the engine and the loop differ by float32 rounding of the results
UNITS = {"z": ("heads", [1, (0, 3)]), "mlp_post": ("neurons", [5, (7, 100, 200)])}


def replacement(act_s: torch.Tensor, intervention: str, mean):
    """The activation that replaces the target's, whole ([pos, ...]), before units are picked."""
    if intervention == "zero":
        return torch.zeros_like(act_s)
    if intervention == "mean":
        return mean.expand_as(act_s)
    return act_s


def edit_at(kind: str, pos, unit, rep: torch.Tensor, sae):
    """A hook that writes `rep` (the replacement's [pos, ...]) into the run at `pos` (None: every
    position), for `unit` (an int, a tuple or None); with `sae`, sets latent(s) `unit` to rep's codes."""
    rows = slice(None) if pos is None else (list(pos) if isinstance(pos, tuple) else [pos])
    units = list(unit) if isinstance(unit, tuple) else ([unit] if unit is not None else None)

    def edit(act, hook):
        act = act.clone()
        live = act[0, : rep.shape[0]][rows]
        new = rep[rows]
        if sae is not None:
            delta = (sae.encode(new) - sae.encode(live))[..., units]
            act[0, rows] = live + delta @ sae.W_dec[units]
        elif units is None:
            act[0, rows] = new
        else:  # heads of z [pos, head, d_head] or neurons of mlp_post [pos, neuron]
            live[:, units] = new[:, units]
            act[0, rows] = live
        return act

    return edit


def hook_loop(tower, target, kind, layers, pos, unit, reps: dict, sae=None) -> torch.Tensor:
    """The embedding of one full forward pass of `target` [1, ...] with the replacements at `layers`."""
    hooks = [(clip_lens.hook_name(kind, layer, tower.cfg.n_layers), edit_at(kind, pos, unit, reps[layer], sae))
             for layer in (layers if isinstance(layers, tuple) else (layers,))]
    with torch.no_grad():
        return tower.run_with_hooks(target, fwd_hooks=hooks)[0]


def check_every_cell(model, tower, targets, sources, result, kind, intervention, mean, sae=None) -> int:
    """Compare each measured cell of `result` (metric="embedding") with `hook_loop`; returns the count."""
    n_layers = tower.cfg.n_layers
    names = {layer: clip_lens.hook_name(kind, layer, n_layers) for layer in range(n_layers + 1) if kind == "resid" or layer < n_layers}
    perm = result.extra.get("resample_pairs")
    with torch.no_grad():
        _, cache_s = tower.run_with_cache(sources if intervention != "resample" else targets)
    unit_axis = result.dims[-2] if result.dims[-2] in ("head", "neuron", "latent") else None
    units = getattr(result, f"{unit_axis}s") if unit_axis else [None]
    positions = result.positions if result.positions is not None else [None]
    checked = 0
    for i in range(targets.shape[0]):
        length = int(result.lengths[i])
        source_row = int(perm[i]) if perm is not None else i
        reps = {layer: replacement(cache_s[name][source_row, :length], intervention, mean) for layer, name in names.items()}
        for li, layers in enumerate(result.layers):
            for pi, pos in enumerate(positions):
                if pos is not None and max(pos if isinstance(pos, tuple) else (pos,)) >= length:
                    continue
                for ui, unit in enumerate(units):
                    expected = hook_loop(tower, targets[i : i + 1, :length] if targets.ndim == 2 else targets[i : i + 1],
                                         kind, layers, pos, unit, reps, sae)
                    cell = (i, li) + ((pi,) if result.positions is not None else ()) + ((ui,) if unit_axis else ())
                    torch.testing.assert_close(result.effects[cell], expected.float(), atol=TOL, rtol=0,
                                               msg=lambda m: f"{kind} {intervention} pair {i} layers {layers} "
                                                             f"positions {pos} unit {unit}: {m}")
                    checked += 1
    return checked


@pytest.mark.parametrize("kind", ["resid", "attn_out", "mlp_out", "z", "mlp_post"])
@pytest.mark.parametrize("intervention", ["patch", "zero", "mean", "resample"])
def test_text_joint_interventions_equal_a_hook_loop(tiny64, kind, intervention):
    tiny_model = tiny64
    tower = tiny_model.text
    targets, sources = tiny_model.to_tokens(TEXTS), tiny_model.to_tokens(SOURCES)
    layers = [1, (0, 2)] + ([(1, 2, 3)] if kind == "resid" else [(0, 1, 2)])
    site = (tower.cfg.n_heads, tower.cfg.d_head) if kind == "z" else (tower.cfg.d_mlp if kind == "mlp_post" else tower.cfg.d_model,)
    mean = torch.randn(site, generator=torch.Generator().manual_seed(3), dtype=torch.float64) if intervention == "mean" else None
    unit_kwargs = dict([UNITS[kind]]) if kind in UNITS else {}
    result = clip_lens.patch(tiny_model, target=targets, source=sources if intervention == "patch" else None,
                             hook=kind, layers=layers, positions=[2, (1, 3), (6, 2, 4)], intervention=intervention,
                             mean=mean, metric="embedding", batch_size=5, progress=False, **unit_kwargs)
    assert result.layers == [1, (0, 2), layers[2]] and result.positions == [2, (1, 3), (6, 2, 4)]
    checked = check_every_cell(tiny_model, tower, targets, sources, result, kind, intervention, mean)
    assert checked == 2 * 3 * 3 * (2 if kind in UNITS else 1)


@pytest.mark.parametrize("kind", ["resid", "attn_out", "z"])
def test_vision_joint_interventions_equal_a_hook_loop(tiny64, kind):
    tiny_model = tiny64
    """The last block of a class-token tower keeps its class token only: a group's other positions
    there change nothing, and an edit of its input still reaches the class token through the keys."""
    tower = tiny_model.vision
    images, sources = (random_pixels(2, size=64, seed=seed).double() for seed in (1, 2))
    layers = [2, (0, 2)] + ([(1, 3), (0, 1, 2, 3)] if kind == "resid" else [(0, 1, 2)])
    unit_kwargs = dict([UNITS[kind]]) if kind in UNITS else {}
    result = clip_lens.patch(tiny_model, target=images, source=sources, hook=kind, layers=layers,
                             positions=[0, (0, 5), (3, 9, 40)], metric="embedding", batch_size=4, progress=False,
                             **unit_kwargs)
    checked = check_every_cell(tiny_model, tower, images, sources, result, kind, "patch", None)
    assert checked == 2 * len(layers) * 3 * (2 if kind in UNITS else 1)
    whole = clip_lens.patch(tiny_model, target=images, source=sources, hook=kind, layers=layers,
                            positions="sequence", metric="embedding", progress=False, **unit_kwargs)
    assert check_every_cell(tiny_model, tower, images, sources, whole, kind, "patch", None) == 2 * len(layers) * (2 if kind in UNITS else 1)


@pytest.mark.parametrize("hook, intervention", [("resid", "zero"), ("attn_out", "patch")])
def test_joint_sae_latents_equal_a_hook_loop(tiny64, hook, intervention):
    tiny_model = tiny64
    tower = tiny_model.text
    sae = TopKSAE(d_in=tower.cfg.d_model, n_latents=32, k=16, seed=0).to(torch.float64).eval()
    targets, sources = tiny_model.to_tokens(TEXTS), tiny_model.to_tokens(SOURCES)
    result = clip_lens.patch(tiny_model, target=targets, source=sources if intervention == "patch" else None, hook=hook,
                             layers=[(0, 2), 1], positions=[(1, 3), 4], sae=sae, latents=[3, (1, 4, 9)],
                             intervention=intervention, metric="embedding", progress=False)
    assert result.latents == [3, (1, 4, 9)]
    assert check_every_cell(tiny_model, tower, targets, sources, result, hook, intervention, None, sae=sae) == 2 * 2 * 2 * 2


def test_a_group_of_one_equals_the_single_intervention_and_the_frame_keeps_groups(tiny_model):
    targets, sources = tiny_model.to_tokens(TEXTS), tiny_model.to_tokens(SOURCES)
    image = tiny_model.encode_image(random_pixels(1, size=64, seed=0)).detach()
    kwargs = dict(target=targets, source=sources, image=image, hook="resid", progress=False)
    single = clip_lens.patch(tiny_model, layers=[1, 2], positions=[3, 4], **kwargs)
    grouped = clip_lens.patch(tiny_model, layers=[(1,), (2,)], positions=[(3,), 4], **kwargs)
    torch.testing.assert_close(grouped.effects, single.effects, atol=0, rtol=0)
    frame = grouped.to_frame()
    assert set(frame["layer"]) == {(1,), (2,)} and set(frame["position"]) == {(3,), 4}
    assert len(frame) == 2 * 2 * 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=[(1, 1)]), r"layer group \(1, 1\) names layer 1 twice"),
    (dict(layers=[(1, 9)]), r"layer 9 is out of range \(0..3\)"),
    (dict(positions=[(2, (3, 4))]), "holds a group"),
    (dict(positions=[()]), "positions is empty"),
    (dict(positions=[(2, 3)], method="attribution"), "method='attribution' estimates single sites"),
    (dict(layers=[(0, 1)], method="integrated_gradients"), "method='integrated_gradients' estimates single sites"),
    (dict(layers=[(0, 1), 2], intervention="mean", mean=torch.zeros(2, 64)), "one row per layer, but layers has groups"),
    (dict(hook="z", heads=[(0, 0)]), r"head group \(0, 0\) names head 0 twice"),
])
def test_bad_groups_are_refused_by_name(tiny_model, kwargs, message):
    targets, sources = tiny_model.to_tokens(TEXTS), tiny_model.to_tokens(SOURCES)
    args = dict(target=targets, source=sources, image=torch.zeros(1, 64), hook="resid", progress=False)
    if kwargs.get("intervention") == "mean":
        args.pop("source")
    with pytest.raises(ValueError, match=message):
        clip_lens.patch(tiny_model, **{**args, **kwargs})


def and_model():
    """`circuit_towers.and_tower` as the text tower of a HookedCLIP (its vision tower unused: the
    metric reads the text embedding alone)."""
    from clip_lens.config import VisionConfig
    from clip_lens.towers import HookedVisionTower

    vision = HookedVisionTower(VisionConfig(n_layers=1, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=5, d_embed=32,
                                            image_size=(16, 16), patch_size=(8, 8)))
    return clip_lens.HookedCLIP(text=and_tower(), vision=vision).eval()


def test_the_interaction_table_finds_an_and_of_two_positions():
    """Each "no" alone moves the output by about 0 and the pair by the whole difference, at layer 0;
    from layer 1 on, EOT already holds the count and the two positions carry nothing."""
    model = and_model()
    table = clip_lens.interaction_table(model, target=AND_TARGET, source=AND_SOURCE, image=torch.zeros(1, 32),
                                        metric=linear_metric, groups=[AND_POSITIONS], layers="all", progress=False)
    assert list(table.columns) == ["pair", "layer", "group", "joint", "alone", "interaction", "baseline", "source_baseline"]
    assert len(table) == len(AND_TARGET) * 4 and set(table["group"]) == {AND_POSITIONS}
    with torch.no_grad():
        full = linear_metric(model.encode_text(model.to_tokens(AND_SOURCE)), None) \
            - linear_metric(model.encode_text(model.to_tokens(AND_TARGET)), None)
    assert float(full.min()) > 4
    layer0 = table[table["layer"] == 0].set_index("pair")
    np.testing.assert_allclose(layer0["alone"], 0, atol=1e-6)
    np.testing.assert_allclose(layer0["joint"], full.numpy(), rtol=1e-6)
    np.testing.assert_allclose(layer0["interaction"], full.numpy(), rtol=1e-6)
    later = table[table["layer"] > 0]
    np.testing.assert_allclose(later[["joint", "alone", "interaction"]].to_numpy(), 0, atol=1e-6)


def test_interaction_table_along_layers_equals_separate_patches(tiny_model):
    targets, sources = tiny_model.to_tokens(TEXTS), tiny_model.to_tokens(SOURCES)
    image = tiny_model.encode_image(random_pixels(1, size=64, seed=0)).detach()
    kwargs = dict(target=targets, source=sources, image=image, hook="mlp_out", positions=[2, 3], progress=False)
    table = clip_lens.interaction_table(tiny_model, groups=[(0, 2), (0, 1, 2)], along="layer", **kwargs)
    singles = clip_lens.patch(tiny_model, layers=[0, 1, 2], **kwargs)
    joint = clip_lens.patch(tiny_model, layers=[(0, 2), (0, 1, 2)], **kwargs)
    change = singles.changes()                                    # [pair, layer, position]
    for gi, group in enumerate([(0, 2), (0, 1, 2)]):
        for pi, pos in enumerate([2, 3]):
            rows = table[(table["group"] == group) & (table["position"] == pos)].set_index("pair")
            alone = sum(change[:, layer, pi] for layer in group)
            # float32 runs batched differently (singles beside groups here): equal to float32 rounding
            np.testing.assert_allclose(rows["alone"], alone.numpy(), atol=1e-5)
            np.testing.assert_allclose(rows["joint"], joint.changes()[:, gi, pi].numpy(), atol=1e-5)
    assert not np.allclose(table["interaction"], 0, atol=1e-4)  # mlp outputs at several layers do interact


@pytest.mark.parametrize("kwargs, message", [
    (dict(groups=[3]), r"group 3: a joint intervention is a tuple of at least two positions"),
    (dict(groups=[(3,)]), r"group \(3,\): a joint intervention is a tuple"),
    (dict(groups=[(1, 2)], positions=[1]), "positions= is given by groups="),
    (dict(groups=[(1, 2)], along="head"), "along='head': use 'position'"),
    (dict(groups=[(1, 2)], metric="embedding"), "needs a scalar metric and method='exact'"),
])
def test_interaction_table_refuses_bad_requests(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        clip_lens.interaction_table(tiny_model, target=TEXTS, source=SOURCES, image=torch.zeros(1, 64), progress=False,
                                    **kwargs)
