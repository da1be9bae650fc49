"""Positions given per pair (`patch(positions=[n_pairs, k] integers)`): each pair's own positions,
slot by slot, -1 where it has none. Each cell equals the same intervention in the grid over every
position; cells without a position stay NaN and out of the frame; bad tables are refused by item."""

import numpy as np
import pytest
import torch

import clip_lens

TARGETS = ["a dog on the grass", "there is no green triangle above the red circle", "a red circle"]
SOURCES = ["a cat on the grass", "there is a green triangle above the blue circle", "a blue circle"]
OWN = [[2, 3, -1], [4, 9, 10], [3, 4, 8]]  # the last pair has 5 tokens: position 8 lies past its EOT


@pytest.fixture(scope="module")
def runs(tiny_model):
    args = dict(target=TARGETS, source=SOURCES, image=torch.ones(1, tiny_model.vision.cfg.d_embed), progress=False)
    return (clip_lens.patch(tiny_model, positions=torch.tensor(OWN), **args),
            clip_lens.patch(tiny_model, positions="all", **args))


def test_each_cell_is_the_grid_cell_of_its_own_position(runs):
    own, grid = runs
    assert own.dims == ("pair", "layer", "position") and own.positions == [0, 1, 2]
    for pair, row in enumerate(OWN):
        for slot, position in enumerate(row):
            cell = own.effects[pair, :, slot]
            if position < 0 or position >= int(own.lengths[pair]):
                assert torch.isnan(cell).all()
            else:
                torch.testing.assert_close(cell, grid.effects[pair, :, position], atol=1e-5, rtol=0)


def test_the_frame_keeps_measured_cells_and_names_their_positions(runs):
    own, _ = runs
    frame = own.to_frame()
    measured = [(p, s) for p, row in enumerate(OWN) for s, q in enumerate(row) if 0 <= q < int(own.lengths[p])]
    assert sorted(set(zip(frame["pair"], frame["position"]))) == measured
    expected = np.array(OWN)[frame["pair"].to_numpy(), frame["position"].to_numpy()]
    assert (frame["token_position"].to_numpy() == expected).all() and not frame["metric"].isna().any()


@pytest.mark.parametrize("positions, message", [
    (torch.tensor([[1, 2], [1, 2]]), "2 rows of 2 slots; give one row per pair \\(3\\)"),
    (torch.tensor([[1], [2], [99]]), r"positions\[2, 0\] = 99 is out of range"),
    (torch.tensor([[1], [-2], [1]]), r"positions\[1, 0\] = -2 is out of range"),
    (np.array([[1.0], [2.0], [3.0]]), "must be integers"),
    ([[1, 2], [3], [4, 5]], "row 1 has 1 slots and row 0 has 2"),
])
def test_bad_tables_are_refused_by_item(tiny_model, positions, message):
    with pytest.raises(ValueError, match=message):
        clip_lens.patch(tiny_model, target=TARGETS, source=SOURCES, metric="embedding", positions=positions,
                        progress=False)


def test_gradient_methods_refuse_positions_per_pair(tiny_model):
    with pytest.raises(ValueError, match="one row per pair are for method='exact'"):
        clip_lens.patch(tiny_model, target=TARGETS, source=SOURCES, image=torch.ones(1, tiny_model.vision.cfg.d_embed),
                        positions=torch.tensor(OWN), method="attribution", progress=False)
