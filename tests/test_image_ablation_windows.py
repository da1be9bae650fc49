"""Image ablation over windows of consecutive layers (docs/methods.md#image-ablation-over-layer-windows):
k = 1 is the single-layer IAE, a window equals a hand-written hook loop, exact invariants for the
whole tower and for the image as its own baseline, and bad window sizes refused."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import existence_scenes

from clip_lens.images import mean_colour_pixels
from clip_lens.scores import difference_metric
from clip_lens.studies.analyses import image_ablation
from clip_lens.studies.analyses.image_ablation import Source

N_SCENES = 6


@pytest.fixture(scope="module")
def scenes(tiny_model, tmp_path_factory):
    """Existence instances of N_SCENES synthetic scenes and their pixels (row-aligned)."""
    instances = existence_scenes(tiny_model, tmp_path_factory.mktemp("window_scenes"), N_SCENES, seed=3)
    return instances, tiny_model.to_pixels(list(instances.frame["image_path"]))


def _d(model, instances, image_emb):
    """d of image embeddings against the instances' captions and foils."""
    caption, foil = instances.text_embeddings(model)
    difference = F.normalize(caption.float(), dim=-1) - F.normalize(foil.float(), dim=-1)
    return difference_metric(model)(image_emb, difference).detach().numpy()


def test_windows_of_one_layer_are_the_single_layer_iae(tiny_model, scenes):
    instances, pixels = scenes
    single = image_ablation.run(tiny_model, instances, pixels=pixels, progress=False, pair_chunk=4)
    windows = image_ablation.run_windows(tiny_model, instances, k=1, pixels=pixels, progress=False, pair_chunk=4)
    assert windows.layers == single.layers == [0, 1, 2]
    np.testing.assert_array_equal(windows.d_star, single.d_star)  # the same path: the same numbers
    got, want = windows.table(), single.table()
    assert (got["last_layer"] == got["layer"]).all() and (got["k"] == 1).all()
    pd.testing.assert_frame_equal(got[want.columns], want, atol=1e-6, check_exact=False)
    # The hook-function path that longer windows take agrees on one-block windows up to float noise.
    source = mean_colour_pixels(pixels, tiny_model.preprocess_cfg["mean"], tiny_model.preprocess_cfg["std"])
    caption, foil = instances.text_embeddings(tiny_model)
    difference = F.normalize(caption.float(), dim=-1) - F.normalize(foil.float(), dim=-1)
    hooked, _, _ = image_ablation._hooked_windows(tiny_model, [(0,), (1,), (2,)])(pixels, source, difference, 64,
                                                                                 len(pixels))
    np.testing.assert_allclose(hooked, single.d_star, atol=1e-5)


@pytest.mark.parametrize("component, hook", [(0, "attn_out"), (1, "mlp_out")])
def test_a_window_equals_a_hand_written_hook_loop(tiny_model, scenes, component, hook):
    instances, pixels = scenes
    result = image_ablation.run_windows(tiny_model, instances, k=2, pixels=pixels, progress=False)
    source = mean_colour_pixels(pixels, tiny_model.preprocess_cfg["mean"], tiny_model.preprocess_cfg["std"])
    assert result.layers == [0, 1]
    for wi, start in enumerate(result.layers):
        names = [f"blocks.{layer}.hook_{hook}" for layer in (start, start + 1)]
        with torch.no_grad():
            _, cache = tiny_model.vision.run_with_cache(source, names_filter=names)
            hooks = [(name, lambda x, hook: cache[hook.name]) for name in names]
            emb = tiny_model.vision.run_with_hooks(pixels, fwd_hooks=hooks)
        np.testing.assert_allclose(result.d_star[:, component, wi], _d(tiny_model, instances, emb), atol=1e-5)
    np.testing.assert_allclose(result.iae, instances.frame["d"].to_numpy()[:, None, None] - result.d_star)
    assert not tiny_model.vision.hook_dict[f"blocks.0.hook_{hook}"].fwd_hooks  # hooks removed


def test_all_layers_mha_makes_the_embedding_the_baselines(tiny_model, scenes):
    """Class-token pooling: the class token enters every image alike, attention is its only way to
    read the image, and the MLP is per position; with every block's MHA output taken from the
    baseline run, the class token's stream is the baseline's, so d*_MHA = d of the baseline image."""
    instances, pixels = scenes
    assert tiny_model.vision.cfg.pooling == "tok"
    baseline = pixels.flip(0)  # another scene's image as each instance's baseline
    result = image_ablation.run_windows_with_baseline(tiny_model, instances, baseline, k=3, pixels=pixels, progress=False)
    with torch.no_grad():
        expected = _d(tiny_model, instances, tiny_model.encode_image(baseline))
    np.testing.assert_allclose(result.d_star[:, 0, 0], expected, atol=1e-5)
    assert np.abs(result.d_star[:, 1, 0] - expected).max() > 1e-2  # not so for the MLP


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_image_as_its_own_baseline_has_no_effect(tiny_model, scenes, k):
    instances, pixels = scenes
    exact = image_ablation.run_windows_with_baseline(tiny_model, instances, pixels.clone(), k=k, progress=False)
    assert (exact.iae == 0).all() and (exact.table()["change"] == "unchanged").all()
    # Without the identical-image rule, the replacement runs agree with d up to float noise.
    plain = Source("windows_test", lambda lo, hi, target: target.clone())
    noisy = image_ablation._ablate_windows(tiny_model, instances, plain, k, pixels, None, False, {})
    np.testing.assert_allclose(noisy.iae, 0, atol=1e-5)


@pytest.mark.parametrize("k, error, match", [(0, ValueError, "k=0"), (4, ValueError, "k=4.*3 blocks"),
                                             (1.5, TypeError, "k=1.5"), (2.0, TypeError, "k=2.0"),
                                             ("2", TypeError, "k='2'"), (True, TypeError, "k=True")])
def test_a_bad_window_size_is_refused(tiny_model, scenes, k, error, match):
    instances, pixels = scenes
    with pytest.raises(error, match=match):
        image_ablation.run_windows(tiny_model, instances, k=k, pixels=pixels, progress=False)


def test_window_starts():
    assert image_ablation.layer_windows(2, 4) == [(0, 1), (1, 2), (2, 3)]
    assert image_ablation.layer_windows(4, 4) == [(0, 1, 2, 3)]
