"""Linear probes per layer and position (clip_lens.probes, docs/methods.md#linear-probes)."""

import numpy as np
import pytest
import torch
from circuit_towers import XOR_LAYER, XOR_POSITION, xor_probe_tower, xor_texts

from clip_lens import probes
from clip_lens.data import shapes


@pytest.fixture(scope="module")
def xor_case():
    return xor_probe_tower(), *xor_texts()


@pytest.mark.parametrize("hook, planted", [("resid_pre", (XOR_LAYER + 1, XOR_POSITION)), ("mlp_out", (XOR_LAYER, XOR_POSITION))])
def test_planted_feature_is_decoded_at_its_cell_only(xor_case, hook, planted):
    """a XOR b is linearly readable only where the planted block wrote it; every other cell holds
    one word (or a word and the a-word), independent of the label by construction."""
    tower, texts, labels = xor_case
    table = probes.probe_grid(tower, texts, labels, hook=hook)
    assert len(table) == 3 * 5 and set(table["position"]) == set(range(5))
    at = (table["layer"] == planted[0]) & (table["position"] == planted[1])
    assert table.loc[at, "test_accuracy"].item() >= 0.97 and table.loc[at, "train_accuracy"].item() >= 0.97
    elsewhere = table.loc[~at, "test_accuracy"]
    assert elsewhere.between(0.3, 0.7).all() and abs(elsewhere.mean() - 0.5) < 0.1
    assert table["control_accuracy"].between(0.3, 0.7).all()
    assert (table["chance"] == 0.5).all() and (table["n_test"] == 76).all()


def test_residual_layers_run_to_the_last_block_output(xor_case):
    """hook="resid" numbers the residual 0..L as causal tracing does; nothing after the planted
    block erases the feature, so it stays readable at layer L."""
    tower, texts, labels = xor_case
    table = probes.probe_grid(tower, texts, labels, hook="resid", layers=[1, 3], positions=[XOR_POSITION], control=False)
    assert list(table["layer"]) == [1, 3] and list(table["hook"]) == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_post"]
    assert table["test_accuracy"].tolist()[1] >= 0.97 and table["test_accuracy"].tolist()[0] <= 0.7
    assert table["control_accuracy"].isna().all()


def _signal(n=120, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = np.arange(n) % 2
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, 0] += torch.as_tensor(labels * 2.0 - 1.0) * 1.5
    return x, labels


def test_nothing_fitted_sees_the_test_split(monkeypatch):
    """Scrambling the test rows changes the test accuracy and nothing else: the cross-validated
    choice of l2, the standardisation and every fit get the very same inputs."""
    x, labels = _signal()
    calls = []
    original = probes.fit_logistic
    monkeypatch.setattr(probes, "fit_logistic", lambda *args, **kw: calls.append([a.clone() for a in args]) or original(*args, **kw))
    clean = probes.probe_features(x, labels, seed=3)
    _, test = probes.split_indices(labels, 0.3, seed=3)
    scrambled = x.clone()
    scrambled[test] = -1000.0 * scrambled[test] + 50.0
    changed = probes.probe_features(scrambled, labels, seed=3)
    assert len(calls) == 4
    for first, second in zip(calls[:2], calls[2:]):
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert changed["l2"] == clean["l2"] and changed["train_accuracy"] == clean["train_accuracy"]
    assert clean["test_accuracy"] > 0.8 and changed["test_accuracy"] < 0.2


def test_l2_is_chosen_from_training_rows_only(monkeypatch):
    x, labels = _signal()
    seen = []
    original = probes.choose_l2
    monkeypatch.setattr(probes, "choose_l2", lambda x_train, y_train, **kw: seen.append(x_train) or original(x_train, y_train, **kw))
    probes.probe_features(x, labels, seed=1)
    train, test = probes.split_indices(labels, 0.3, seed=1)
    assert torch.equal(seen[0], x[train]) and not set(train) & set(test) and len(train) + len(test) == len(x)


def test_strong_signal_is_read_and_noise_is_not():
    x, labels = _signal()
    assert probes.probe_features(x, labels)["test_accuracy"] > 0.8
    noise = torch.randn(120, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = probes.probe_features(noise, labels)
    assert 0.3 <= result["test_accuracy"] <= 0.7 and 0.3 <= result["control_accuracy"] <= 0.7
    assert result["l2"] in probes.L2_GRID


@pytest.mark.parametrize("labels, message", [
    ([0, 1, 2] + [0] * 17, r"labels\[2\] is 2: labels must be binary"),
    ([1] * 20, "labels are all 1: both classes"),
    ([0, 1] * 5, r"labels has shape \(10,\); give one label per text \(20 texts\)"),
    (["yes", "no"] * 10, r"labels\[0\] is 'yes'"),
])
def test_labels_must_be_binary_with_both_classes(labels, message):
    with pytest.raises(ValueError, match=message):
        probes.probe_features(torch.zeros(20, 3), labels)


def test_both_classes_in_both_splits():
    labels = [1, 1] + [0] * 18
    with pytest.raises(ValueError, match="labels: class 1 has 2 texts, and test_fraction=0.1 leaves none of them in the test split"):
        probes.probe_features(torch.zeros(20, 3), labels, test_fraction=0.1)
    with pytest.raises(ValueError, match="labels: class 1 has 1 texts in the training split, fewer than folds=5"):
        probes.probe_features(torch.zeros(20, 3), labels, test_fraction=0.3)
    with pytest.raises(ValueError, match="test_fraction=1.5"):
        probes.probe_features(torch.zeros(20, 3), [0, 1] * 10, test_fraction=1.5)


def test_grid_arguments_are_checked(xor_case):
    tower, texts, labels = xor_case
    with pytest.raises(ValueError, match=r"positions: slot 0 of texts\[0\] is position 5, outside the text \(0..4"):
        probes.probe_grid(tower, texts, labels, positions=[5])
    with pytest.raises(ValueError, match="hook='pattern': probes read hook points with a position axis"):
        probes.probe_grid(tower, texts, labels, hook="pattern")
    with pytest.raises(ValueError, match=r"layers: 3 is not a layer of hook 'resid_pre' \(0..2\)"):
        probes.probe_grid(tower, texts, labels, hook="resid_pre", layers=[3])
    with pytest.raises(ValueError, match=r"labels has shape \(3,\)"):
        probes.probe_grid(tower, texts, [0, 1, 0])
    with pytest.raises(TypeError, match="model_or_tower: expected a HookedCLIP or a HookedTextTower"):
        probes.probe_grid("ViT-B-32", texts, labels)


def test_per_text_positions():
    eot = np.array([6, 7])
    names, array = probes.resolve_positions({"negator": 3, "eot": eot}, eot)
    assert names == ["negator", "eot"] and array.tolist() == [[3, 6], [3, 7]]
    names, array = probes.resolve_positions("aligned", eot)
    assert names == ["SOT", "There", "is/are", "negator", "subject", ".", "EOT"] and array[1].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert probes.resolve_positions("all", eot)[0] == list(range(7))
    assert probes.resolve_positions(np.array([[1, 2], [3, 4]]), eot)[1].tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match=r"positions has shape \(3, 1\)"):
        probes.resolve_positions(np.array([[1], [2], [3]]), eot)


def test_existence_pairs_on_the_tiny_clip(tiny_model):
    """A smoke run on the shipped tiny CLIP: negated or not, at the aligned slots of every residual
    layer. The SOT and "There" slots are the same tokens in every text (chance exactly), and the
    negator itself is a different token at layer 0 (read perfectly)."""
    pairs = list(shapes.examples(24, seed=0))
    texts = [t for e in pairs for t in (e.caption, e.foil)]
    labels = [int(" no " in t) for t in texts]
    table = probes.probe_grid(tiny_model, texts, labels, positions="aligned")
    layers = tiny_model.text.cfg.n_layers + 1
    assert len(table) == layers * 7 and sorted(set(table["layer"])) == list(range(layers))
    for column in ("train_accuracy", "test_accuracy", "control_accuracy"):
        assert table[column].between(0, 1).all()
    same_tokens = table[table["position"].isin(["SOT", "There"])]
    assert (same_tokens["test_accuracy"] == same_tokens["chance"]).all()
    negator = table[(table["position"] == "negator") & (table["layer"] == 0)]
    assert negator["test_accuracy"].item() == 1.0
