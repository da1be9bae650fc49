"""The covariate grid (clip_lens.studies.analyses.covariates): its shape, a planted effect recovered
exactly, and the tiny CLIP's table."""

import numpy as np
import pytest

from clip_lens.studies.analyses import covariates


def test_the_grid_has_every_cell_and_recovers_a_planted_effect():
    def planted(captions, foils, images):  # d grows with the subject's pixel area, not with the words
        area = np.array([(np.asarray(image).min(axis=-1) < 200).sum() for image in images], dtype=float)
        return 0.01 * area - 1.0

    pairs, table, effects = covariates.covariate_grid(planted, n_per_cell=6)
    assert len(table) == 9 and set(table["size"]) == set(covariates.SIZES) and set(table["length"]) == {0, 3, 4}
    assert (table["pairs"] == 6).all() and len(pairs) == 54
    effect = effects.set_index("term")["effect"]
    assert effect["size"] > 0.1 and abs(effect["length"]) < 1e-9        # the words change nothing here
    by_size = table.groupby("size")["accuracy"].mean()
    assert by_size.is_monotonic_increasing
    # the same scenes at every length: d repeats exactly across the lengths of a scene
    assert (pairs.groupby("scene")["d"].nunique() == 1).all()


def test_a_planted_length_effect_is_recovered():
    def wordy(captions, foils, images):
        return np.array([0.5 * len(c.split()) for c in captions])

    _, _, effects = covariates.covariate_grid(wordy, n_per_cell=3)
    assert effects.set_index("term").loc["length", "effect"] == pytest.approx(0.5)
    assert effects.set_index("term").loc["size", "effect"] == pytest.approx(0.0, abs=1e-9)


def test_the_tiny_clip_grid(tiny_model):
    pairs, table, effects = covariates.covariate_grid(covariates.clip_scorer(tiny_model), n_per_cell=20)
    assert len(table) == 9 and (table["pairs"] == 20).all()
    assert np.isfinite(effects["effect"]).all()
    assert table["accuracy"].between(0, 1).all()


def test_the_covariates_command(tmp_path, capsys):
    import pandas as pd

    from clip_lens.cli import main

    out = tmp_path / "cov"
    assert main(["covariates", "--model", "clip_lens/tiny-shapes", "--scenes", "5", "--out", str(out), "--quiet"]) == 0
    assert "intercept" in capsys.readouterr().out
    assert len(pd.read_csv(out / "grid.csv")) == 9 and len(pd.read_csv(out / "pairs.csv")) == 45
    assert (out / "report.html").read_text().count('class="plotly-graph-div"') == 2


def test_the_subject_sizes_are_an_option(tmp_path):
    """One field in the study's Options gives the flag, the check and a different run identity."""
    import pandas as pd

    from clip_lens import studies
    from clip_lens.cli import main

    out = tmp_path / "cov"
    assert main(["covariates", "--model", "clip_lens/tiny-shapes", "--scenes", "2", "--sizes", "5", "11",
                 "--out", str(out), "--quiet"]) == 0
    assert sorted(set(pd.read_csv(out / "grid.csv")["size"])) == [5, 11]
    options = studies.get("covariates").Options
    for bad in ((), (0,), (31,), (True,)):
        with pytest.raises(studies.OptionError, match="sizes="):
            options(sizes=bad)
