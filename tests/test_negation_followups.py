"""The negation-followups study (issue 31): its tables on the tiny CLIP keep their invariants, and
the command line runs it."""

import numpy as np
import pandas as pd
import pytest

from clip_lens.cli import main
from clip_lens.studies import OptionError, negation_followups


@pytest.fixture(scope="module")
def tables(tiny_model):
    options = negation_followups.Options(scenes=24, covariate_scenes=40, seed=2, severed_pairs=6)
    return negation_followups.compute(tiny_model, None, options, progress=False)


def test_probe_grid_covers_every_layer_and_slot(tables, tiny_model):
    probes = tables["probes"]
    assert sorted(probes["layer"].unique()) == list(range(tiny_model.text.cfg.n_layers + 1))
    assert probes.groupby("layer").size().nunique() == 1
    for column in ("test_accuracy", "control_accuracy", "chance"):
        assert probes[column].between(0, 1).all()
    # the negator slot's embedding differs between "no" and "a" at layer 0 already: decodable there
    assert float(probes.query("layer == 0 and position == 'negator'")["test_accuracy"].iloc[0]) == 1.0


def test_probes_sit_beside_the_causal_tracing_of_the_same_cells(tables, tiny_model):
    cells, correlation = tables["probes_and_tracing"], tables["probe_tracing_correlation"]
    assert len(cells) == len(tables["probes"]) and cells["cte"].notna().all()
    expected = cells["test_accuracy"].rank().corr(cells["cte"].rank())  # Spearman: Pearson of the ranks
    assert abs(float(correlation["value"].iloc[0]) - expected) < 1e-12 and int(correlation["cells"].iloc[0]) == len(cells)
    # SOT cannot be changed by the negation under the causal mask: restoring it has no effect
    assert (cells.loc[cells["position"] == "SOT", "cte"].abs() < 1e-5).all()


def test_severed_tracing_keeps_its_invariants(tables):
    """Severing leaves layer 0's negator effect where 'none' has it, and nothing can be severed after
    the last block: at layer L every severing equals plain tracing."""
    severed = tables["severed"].set_index(["severed", "layer", "slot"])["mean_effect"]
    assert set(severed.index.get_level_values("severed")) == {"none", "mlp", "attn"}
    last = severed.index.get_level_values("layer").max()
    for kind in ("mlp", "attn"):
        np.testing.assert_allclose(severed[kind, last, "EOT"], severed["none", last, "EOT"], atol=1e-6)


def test_windows_cover_every_start(tables, tiny_model):
    windows = tables["windows"]
    starts = [row for row in windows["layer"] if str(row).isdigit()]
    assert [int(x) for x in starts] == list(range(tiny_model.vision.cfg.n_layers - 2 + 1))


def test_a_window_wider_than_the_tower_is_refused_by_name(tiny_model):
    options = negation_followups.Options(scenes=8, covariate_scenes=10, window=9, severed_pairs=1)
    with pytest.raises(ValueError, match="k=9"):
        negation_followups.compute(tiny_model, None, options, progress=False)


def test_the_subject_removed_baseline_changes_nothing_where_the_subject_is_absent(tables):
    """With the negation in the caption the subject is not in the image: removing it leaves the image,
    so ablating against it changes no instance."""
    rates = tables["baselines"]
    assert set(rates["baseline"]) == {"mean colour", "subject removed"}
    absent = rates[(rates["baseline"] == "subject removed") & (rates["negation_in"] == "caption")]
    assert len(absent) == 2 and (absent["unchanged"] == 1).all()
    shares = rates[["better", "worse", "unchanged"]].sum(axis=1)
    np.testing.assert_allclose(shares, 1.0)


def test_the_joint_fit_has_every_covariate(tables):
    coefficients, r2 = tables["coefficients"], tables["r2"]
    assert set(coefficients["term"]) >= {"intercept", "brightness", "contrast", "colourfulness", "size", "length",
                                         "objects"}
    assert ((coefficients["low"] <= coefficients["coefficient"]) & (coefficients["coefficient"] <= coefficients["high"])).all()
    assert r2["r2"].between(0, 1).all() and int(r2["n"].iloc[0]) == 40


def test_options_are_checked_by_name():
    with pytest.raises(OptionError, match="probe_hook='logits'"):
        negation_followups.Options(probe_hook="logits")
    with pytest.raises(OptionError, match="scenes=4"):
        negation_followups.Options(scenes=4)


def test_the_command_runs_and_writes_the_report(tmp_path):
    out = tmp_path / "followups"
    assert main(["negation-followups", "--model", "clip_lens/tiny-shapes", "--scenes", "16", "--covariate-scenes", "30",
                 "--out", str(out), "--quiet"]) == 0
    assert (out / "report.html").exists()
    assert len(pd.read_csv(out / "baselines.csv")) == 8


def test_interactions_cover_every_layer_and_vanish_after_the_last_block(tables, tiny_model):
    """At layer L only EOT reaches the embedding: restoring the negator, subject or next position there
    changes nothing, alone or together. The interaction is joint - alone by definition."""
    table = tables["interactions"]
    n_layers = tiny_model.text.cfg.n_layers
    assert set(table["positions"]) == {"negator+subject", "negator+next", "subject+next"}
    assert sorted(table["layer"].unique()) == list(range(n_layers + 1))
    np.testing.assert_allclose(table["interaction"], table["joint"] - table["alone"], atol=1e-6)
    last = table[table["layer"] == n_layers]
    np.testing.assert_allclose(last[["joint", "alone", "interaction"]].to_numpy(), 0, atol=1e-6)
    assert table[table["layer"] == 0]["joint"].abs().max() > 0.05


def test_image_tracing_restores_everything_at_the_last_class_token(tables, tiny_model):
    shares = tables["image_tracing"].set_index(["layer", "region"])["share"]
    n_layers = tiny_model.vision.cfg.n_layers
    assert abs(shares[(n_layers, "class token")] - 1) < 1e-4
    assert shares[(n_layers, "subject")] == 0 and shares[(n_layers, "background")] == 0
    assert shares[(0, "class token")] == 0 and shares[(0, "background")] == 0
