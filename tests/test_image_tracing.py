"""Causal tracing in the vision encoder against the subject-removed image
(docs/methods.md#image-causal-tracing): its invariants on the tiny CLIP, the subject's patches, and a
resumed run reading its checkpoints."""

import numpy as np
import pytest
import torch
from conftest import existence_scenes

from clip_lens import baselines
from clip_lens.checkpoints import Checkpoints
from clip_lens.data import shapes
from clip_lens.studies.analyses import image_tracing

N_SCENES = 10


@pytest.fixture(scope="module")
def traced(tiny_model, tmp_path_factory):
    instances = existence_scenes(tiny_model, tmp_path_factory.mktemp("tracing_scenes"), N_SCENES, seed=5)
    removed = [baselines.subject_removed(example) for example in shapes.examples(N_SCENES, seed=5)]
    cells = image_tracing.run(tiny_model, instances, removed, progress=False, pair_chunk=4)
    return instances, removed, cells


def test_only_images_with_their_subject_are_traced(traced, tiny_model):
    instances, _, cells = traced
    frame = instances.frame
    assert set(cells["id"]) == set(frame.loc[frame["negation_in"] == "foil", "id"])
    n_positions = 1 + tiny_model.vision.cfg.n_patches
    per_instance = cells.groupby("id").size()
    assert (per_instance == (tiny_model.vision.cfg.n_layers + 1) * n_positions).all()


def test_what_is_equal_in_both_runs_restores_nothing_and_the_last_class_token_restores_all(traced, tiny_model):
    """At layer 0 the class token and the background patches are the same in both runs: restoring
    them changes nothing (exactly). After the last block only the class token reaches the
    embedding: restoring it there gives the whole effect, restoring any patch nothing."""
    _, _, cells = traced
    first = cells[cells["layer"] == 0]
    assert (first.loc[first["region"] != "subject", "change"] == 0).all()
    assert first.loc[first["region"] == "subject", "change"].abs().max() > 1e-3
    last = cells[cells["layer"] == tiny_model.vision.cfg.n_layers]
    cls = last[last["region"] == "class token"]
    np.testing.assert_allclose(cls["change"], cls["total"], atol=1e-4)
    assert (last.loc[last["region"] != "class token", "change"] == 0).all()
    shares = image_tracing.region_shares(cells).set_index(["layer", "region"])["share"]
    assert abs(shares[(tiny_model.vision.cfg.n_layers, "class token")] - 1) < 1e-4
    assert list(image_tracing.region_shares(cells)["region"].unique()) == list(image_tracing.REGIONS)


def test_subject_positions_are_the_patches_where_pixels_differ():
    pixels = torch.zeros(2, 3, 32, 32)
    baseline = pixels.clone()
    baseline[0, 1, 10, 20] = 1.0                # patch row 1, column 2 of a 4 x 4 grid of 8-pixel patches
    baseline[1, :, 0:9, 0:8] = 1.0              # patches (0, 0) and (1, 0)
    found = image_tracing.subject_positions(pixels, baseline, (8, 8))
    assert found.shape == (2, 17)
    assert found[0].nonzero().flatten().tolist() == [1 + 1 * 4 + 2]
    assert found[1].nonzero().flatten().tolist() == [1, 5]


def test_a_resumed_run_reads_its_checkpoints(traced, tiny_model, tmp_path):
    instances, removed, cells = traced
    first = Checkpoints(tmp_path)
    image_tracing.run(tiny_model, instances, removed, progress=False, pair_chunk=4, checkpoints=first)
    again = Checkpoints(tmp_path)
    resumed = image_tracing.run(tiny_model, instances, removed, progress=False, pair_chunk=4, checkpoints=again)
    assert again.summary()["image_tracing"] == {"loaded": N_SCENES, "computed": 0}
    np.testing.assert_array_equal(resumed["change"].to_numpy(), cells["change"].to_numpy())


def test_a_baseline_per_instance_is_required(traced, tiny_model):
    instances, removed, _ = traced
    with pytest.raises(ValueError, match=f"baseline has {N_SCENES - 1} images for {N_SCENES} instances"):
        image_tracing.run(tiny_model, instances, removed[:-1], progress=False)
