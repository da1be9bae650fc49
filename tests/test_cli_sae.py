"""`clip-lens train-sae` and `clip-lens evaluate-sae` on the tiny CLIP: an activation store of
rendered shapes (cache-activations), an SAE trained from it (resumed after a kill, either layout),
its evaluation table on a class-folder image set, and bad arguments refused by name."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch

import clip_lens.sae
from clip_lens.cli import main
from clip_lens.data import shapes
from clip_lens.sae.evaluation import COLUMNS

MODEL = ["--model", "clip_lens/tiny-shapes"]
HOOK = "vision.blocks.2.hook_resid_post"
COLOURS = ("red", "green", "blue")
SMALL = ["--latents", "32", "--batch-size", "128", "--quiet"]


def render_one(colour: str, rng: random.Random):
    r = rng.randint(8, 14)
    shape = shapes.Shape(rng.choice(shapes.SHAPES), colour, rng.randint(r + 1, shapes.SIZE - r - 2),
                         rng.randint(r + 1, shapes.SIZE - r - 2), r)
    return shapes.render(shapes.Scene((shape,)), rng)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of every position of HOOK over 12 rendered one-shape images (cache-activations)."""
    root = tmp_path_factory.mktemp("store")
    rng = random.Random(0)
    (root / "images").mkdir()
    for i in range(12):
        render_one(rng.choice(list(shapes.COLOURS)), rng).save(root / "images" / f"{i:02d}.png")
    assert main(["cache-activations", "--images", str(root / "images"), "--hook", HOOK, "--positions", "all",
                 "--out", str(root / "acts"), "--quiet", *MODEL]) == 0
    return root / "acts"


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    """FOLDER/CLASS/IMAGE: two rendered shapes of each colour."""
    root = tmp_path_factory.mktemp("classes") / "colours"
    rng = random.Random(1)
    for colour in COLOURS:
        (root / colour).mkdir(parents=True)
        for i in range(2):
            render_one(colour, rng).save(root / colour / f"{i}.png")
    return root


def train(store, out, *extra):
    return main(["train-sae", "--store", str(store), "--out", str(out), *SMALL, *extra])


def test_cache_train_evaluate_end_to_end(store, classes, tmp_path, capsys):
    assert train(store, tmp_path / "sae", "--k", "4", "--steps", "10") == 0
    printed = capsys.readouterr().out
    assert "explained variance" in printed and "dead latents" in printed and f"on {HOOK}" in printed
    sae = clip_lens.sae.load(tmp_path / "sae")
    assert (sae.architecture, sae.n_latents, sae.k, sae.hook) == ("topk", 32, 4, HOOK)  # the store's hook
    assert main(["evaluate-sae", "--sae", str(tmp_path / "sae"), "--images", str(classes), "--out",
                 str(tmp_path / "table.csv"), "--template", "a {} shape.", *MODEL]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table.columns) == COLUMNS and len(table) == 1 and table.hook[0] == HOOK
    assert table.vectors[0] == 6 * 65                       # 6 images, every position of the tiny ViT
    assert 0 <= table.accuracy_clean[0] <= 1 and "accuracy_recovered" in printed and "6 images of 3 classes" in printed
    assert not list(tmp_path.glob(".table.csv*"))          # written atomically: no temporary left


def test_a_killed_run_resumes_where_its_checkpoint_left_off(store, tmp_path, capsys):
    args = ["--k", "4", "--checkpoint-every", "2"]
    assert train(store, tmp_path / "sae", *args, "--steps", "4") == 0
    for path in tmp_path.glob("sae.*"):                    # killed before the SAE was written: the checkpoint only
        if path.is_file():
            path.unlink()
    capsys.readouterr()
    assert main(["train-sae", "--store", str(store), "--out", str(tmp_path / "sae"), *SMALL[:-1], *args,
                 "--steps", "8"]) == 0                     # no --quiet: the progress bar
    captured = capsys.readouterr()
    assert f"resuming from the checkpoint in {tmp_path / 'sae.checkpoint'} at step 4 of 8" in captured.out
    assert "training topk SAE" in captured.err
    state = torch.load(tmp_path / "sae.checkpoint" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 8 and state["history"]["steps"] == [0, 3, 7]   # logged by both runs
    assert train(store, tmp_path / "whole", *args, "--steps", "8") == 0   # the same 8 steps uninterrupted
    resumed, whole = clip_lens.sae.load(tmp_path / "sae"), clip_lens.sae.load(tmp_path / "whole")
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


def test_saelens_layout_loads_and_needs_a_tower_without_one(store, classes, tmp_path, capsys):
    args = ["--architecture", "batchtopk", "--k", "4", "--steps", "6"]
    assert train(store, tmp_path / "ours", *args) == 0
    assert train(store, tmp_path / "theirs", *args, "--layout", "saelens") == 0
    assert (tmp_path / "theirs" / "cfg.json").is_file() and (tmp_path / "theirs" / "sae_weights.safetensors").is_file()
    ours, theirs = clip_lens.sae.load(tmp_path / "ours"), clip_lens.sae.load(tmp_path / "theirs")
    assert theirs.hook == HOOK
    x = clip_lens.sae.ActivationStore(store).vectors(range(50))
    torch.testing.assert_close(theirs.encode(x), ours.encode(x))
    cfg = json.loads((tmp_path / "theirs" / "cfg.json").read_text())
    cfg["metadata"].pop("clip_lens_tower")                 # as an SAE trained elsewhere: "blocks.2.hook_resid_post"
    cfg["metadata"].pop("clip_lens_hook")
    (tmp_path / "theirs" / "cfg.json").write_text(json.dumps(cfg))
    evaluate = ["evaluate-sae", "--sae", str(tmp_path / "theirs"), "--images", str(classes), *MODEL]
    capsys.readouterr()
    assert main([*evaluate, "--out", str(tmp_path / "a.csv")]) == 2
    assert "--tower vision or --tower text" in capsys.readouterr().err and not (tmp_path / "a.csv").exists()
    assert main([*evaluate, "--tower", "vision", "--out", str(tmp_path / "b.csv")]) == 0
    assert pd.read_csv(tmp_path / "b.csv").hook[0] == HOOK


TRAIN_ERRORS = [
    (["--architecture", "jumprelu", "--k", "4"], "--k is for --architecture topk or batchtopk, not jumprelu"),
    (["--architecture", "topk"], "--architecture topk needs --k"),
    (["--k", "4", "--l0-coefficient", "0.1"], "--l0-coefficient is not for --architecture topk"),
    (["--architecture", "standard", "--aux-k", "3", "--bandwidth", "1"], "--aux-k, --bandwidth are not for"),
    (["--k", "4", "--store", "MISSING"], "--store MISSING: no such folder"),
    (["--k", "4", "--store", "EMPTY"], "no activation store in"),
    (["--k", "4", "--out", "TAKEN"], "taken.json exists: pass --overwrite"),
    (["--k", "4", "--layout", "saelens", "--out", "FILE"], "is a file; the saelens layout writes a folder"),
]


@pytest.mark.parametrize("extra, message", TRAIN_ERRORS)
def test_train_sae_names_a_bad_argument(store, tmp_path, capsys, extra, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "taken.json").write_text("{}")
    (tmp_path / "FILE").write_text("")
    names = {"MISSING": tmp_path / "missing", "EMPTY": tmp_path / "EMPTY", "TAKEN": tmp_path / "taken",
             "FILE": tmp_path / "FILE"}
    argv = ["train-sae", "--store", str(store), "--out", str(tmp_path / "sae"), *SMALL, "--steps", "2", *extra]
    argv = [str(names[a]) if a in names else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("clip-lens train-sae: error:") and message.replace("MISSING", str(names["MISSING"])) in err
    assert not (tmp_path / "sae.json").exists()


@pytest.mark.parametrize("flag", ["--steps", "--latents", "--batch-size", "--checkpoint-every"])
def test_train_sae_refuses_a_count_that_is_not_positive(store, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        train(store, tmp_path / "sae", "--k", "4", flag, "0")
    assert exit_.value.code == 2 and f"argument {flag}: 0 is not a positive integer" in capsys.readouterr().err


def test_a_checkpoint_of_other_settings_is_refused_with_the_flag_that_starts_afresh(store, tmp_path, capsys):
    assert train(store, tmp_path / "sae", "--k", "4", "--steps", "2") == 0
    assert train(store, tmp_path / "sae", "--k", "8", "--steps", "4", "--overwrite") == 2
    assert "k=4, not 8" in (err := capsys.readouterr().err) and "--restart" in err
    assert train(store, tmp_path / "sae", "--k", "4", "--steps", "1", "--overwrite") == 2
    assert "at step 2, beyond --steps 1" in capsys.readouterr().err
    assert train(store, tmp_path / "sae", "--k", "8", "--steps", "2", "--overwrite", "--restart") == 0
    assert clip_lens.sae.load(tmp_path / "sae").k == 8


def test_evaluate_sae_names_a_bad_image_folder_or_argument(store, classes, tmp_path, capsys):
    assert train(store, tmp_path / "sae", "--k", "4", "--steps", "2") == 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    render_one("red", random.Random(0)).save(tmp_path / "flat" / "a.png")
    (tmp_path / "hollow" / "red").mkdir(parents=True)
    (tmp_path / "taken.csv").write_text("")
    cases = [(["--images", "empty"], "empty is empty; give an image folder laid out"),
             (["--images", "flat"], "flat has no class sub-folders"),
             (["--images", "hollow"], "class sub-folder 'red' holds no images"),
             (["--images", "missing"], "missing: no such folder"),
             (["--sae", "nothing"], "no SAE at"),
             (["--template", "a photo."], "--template 'a photo.' must hold exactly one {}"),
             (["--out", "taken.csv"], "taken.csv exists: pass --overwrite")]
    for extra, message in cases:
        argv = ["evaluate-sae", "--sae", str(tmp_path / "sae"), "--images", str(classes), "--out",
                str(tmp_path / "t.csv"), *MODEL, *extra]
        if extra[0] != "--template":
            argv[-1] = str(tmp_path / argv[-1])
        assert main(argv) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "t.csv").exists()
