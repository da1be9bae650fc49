"""clip_lens.sweep: the spec, task identity, Parquet tables and the manifest, resume after a killed
driver, failures that leave the rest complete, Ray against the local executor, and the report."""

import subprocess
import sys
import textwrap

import pandas as pd
import pytest
from conftest import write_noise_images

from clip_lens import sweep
from clip_lens.cli import main
from clip_lens.sweep import SpecError, read_spec

ARCHITECTURES = ("ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16")


def pairs_file(folder):
    """A user's pairs file: three captions with foils and noise images."""
    images = write_noise_images(["a.png", "b.png", "c.png"], folder / "images")
    rows = pd.DataFrame({"caption": ["There is a dog.", "A red car.", "Two cats sleep."],
                         "foil": ["There is no dog.", "A blue car.", "Two cats run."], "image": ["a.png", "b.png", "c.png"]})
    rows.to_csv(folder / "pairs.csv", index=False)
    return folder / "pairs.csv", images


def spec_text(out, pairs, images, models=("tiny",), studies=("accuracy", "selective-heads"), extra_model="",
              study_options="", scenes=6, cpus=1):
    model_lines = []
    for name in models:
        if name == "tiny":
            model_lines.append('[[models]]\nname = "tiny"\narchitecture = "clip_lens/tiny-shapes"\n')
        else:
            model_lines.append(f'[[models]]\nname = "{name}"\narchitecture = "{name}"\nseed = 0\n')
    study_lines = "".join(f'[[studies]]\nname = "{s}"\n{study_options if s == studies[0] else ""}\n' for s in studies)
    return textwrap.dedent(f'''\
        out = "{out}"
        retries = 2
        [resources]
        cpus = {cpus}
        ''') + "".join(model_lines) + extra_model + textwrap.dedent(f'''\
        [[datasets]]
        name = "shapes"
        kind = "shapes"
        scenes = {scenes}
        seed = 3

        [[datasets]]
        name = "mine"
        kind = "pairs"
        file = "{pairs}"
        images = "{images}"

        ''') + study_lines


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pairs_file(tmp_path_factory.mktemp("pairs"))


def write_spec(path, text):
    path.write_text(text)
    return path


def comparable(tables):
    return {name: t.drop(columns=[c for c in ("seconds",) if c in t]) for name, t in tables.items() if name != "manifest"}


# --- the spec ------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace('kind = "shapes"', 'kind = "photos"'), "dataset 'shapes' has kind 'photos'"),
    (lambda t: t.replace('name = "accuracy"', 'name = "accuracy"\nlimt = 3'), "study 'accuracy' has unknown key 'limt'"),
    (lambda t: t.replace('name = "selective-heads"', 'name = "heads"'), "study 'heads' is not one the sweep runs"),
    (lambda t: t.replace('architecture = "clip_lens/tiny-shapes"', ''), "model 'tiny' needs exactly one of architecture"),
    (lambda t: t.replace('name = "mine"', 'name = "shapes"'), "two datasets are named 'shapes'"),
    (lambda t: t.replace("retries = 2", "retries = -1"), "retries must be"),
    (lambda t: t.replace('architecture = "clip_lens/tiny-shapes"', 'architecture = "clip_lens/tiny-shapes"\ndtype = "fp8"'),
     "model 'tiny': key dtype='fp8': give one of 'float32', 'bfloat16', 'float16'"),
    (lambda t: t + "\n[[oops", "not valid TOML"),
    # values that used to run, or to fail late or far away, now refused when the spec is read
    (lambda t: t.replace("cpus = 1", "cpus = 1000000"), r"\[resources\]: key cpus=1000000: give an integer >= 1 and <= 1024"),
    (lambda t: t.replace("cpus = 1", "cpus = 1.5"), r"key cpus=1.5"),
    (lambda t: t.replace('kind = "pairs"', 'kind = "cannot"\npaths = "/"').replace("file = ", "# file = ")
     .replace("images = ", "# images = "), r"dataset 'mine' \(cannot\): key paths='/': give a list"),
    (lambda t: t.replace('kind = "pairs"', 'kind = "valse"\nvalse = "v"\npiece = "../x"').replace("file = ", "# file = "),
     r"piece='../x'"),
    (lambda t: t.replace("out = ", "out = 5 # "), "out must be a folder path"),
])
def test_spec_errors_name_the_entry(tmp_path, data, change, message):
    text = change(spec_text(tmp_path / "out", *data))
    with pytest.raises(SpecError, match=message):
        read_spec(write_spec(tmp_path / "s.toml", text))


def test_tags_stay_tags_and_relative_paths_are_read_from_the_spec_folder(tmp_path, data):
    text = spec_text("out", *data, extra_model=('[[models]]\nname = "b32"\narchitecture = "ViT-B-32"\npretrained = "openai"\n'
                                                '[[models]]\nname = "mine"\narchitecture = "ViT-B-32"\npretrained = "ckpt/w.pt"\n'))
    spec = read_spec(write_spec(tmp_path / "s.toml", text))
    models = {m.name: m for m in spec.models}
    assert models["b32"].get("pretrained") == "openai"
    assert models["mine"].get("pretrained") == str(tmp_path / "ckpt" / "w.pt") and spec.out == tmp_path / "out"


def test_ray_options_with_the_local_executor_are_refused(tmp_path, data):
    spec = write_spec(tmp_path / "s.toml", spec_text(tmp_path / "out", *data))
    with pytest.raises(ValueError, match="workers is for the ray executor"):
        sweep.run(spec, workers=2, progress=False)
    with pytest.raises(ValueError, match="ray_address is for the ray executor"):
        sweep.run(spec, ray_address="auto", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_the_spec_names_the_studies_the_sweep_runs():
    from clip_lens import studies
    from clip_lens.sweep.spec import SWEEP_STUDIES
    from clip_lens.sweep.studies import STUDIES

    assert set(STUDIES) == set(SWEEP_STUDIES) and set(SWEEP_STUDIES) <= set(studies.NAMES)


def test_task_ids_hash_the_whole_configuration(tmp_path, data):
    spec = read_spec(write_spec(tmp_path / "s.toml", spec_text(tmp_path / "out", *data)))
    tasks = sweep.plan(spec)
    assert len(tasks) == 1 * 2 * 2 and len({t.task_id for t in tasks}) == 4
    again = sweep.plan(read_spec(write_spec(tmp_path / "t.toml", spec_text(tmp_path / "out", *data))))
    assert [t.task_id for t in tasks] == [t.task_id for t in again]
    changed = sweep.plan(read_spec(write_spec(tmp_path / "u.toml", spec_text(tmp_path / "out", *data, scenes=7))))
    moved = {(t.dataset, t.study) for t, u in zip(tasks, changed) if t.task_id != u.task_id}
    assert moved == {("shapes", "accuracy"), ("shapes", "selective-heads")}  # one option touches its tasks only


def test_a_changed_data_file_changes_only_its_tasks(tmp_path):
    csv, images = pairs_file(tmp_path)
    spec = write_spec(tmp_path / "s.toml", spec_text(tmp_path / "out", csv, images))
    before = {(t.dataset, t.study): t.task_id for t in sweep.plan(read_spec(spec))}
    csv.write_text(csv.read_text().replace("A red car.", "A red bus."))
    after = {(t.dataset, t.study): t.task_id for t in sweep.plan(read_spec(spec))}
    assert {key for key in before if before[key] != after[key]} == {("mine", "accuracy"), ("mine", "selective-heads")}


# --- local runs: tables, resume, failures --------------------------------------------------------
@pytest.fixture(scope="module")
def local_run(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("sweep")
    spec = write_spec(folder / "s.toml", spec_text(folder / "out", *data, studies=("accuracy", "selective-heads",
                                                                                   "causal-tracing", "image-ablation")))
    result = sweep.run(spec, progress=False)
    return folder, spec, result


def test_local_sweep_writes_tables_manifest_and_report(local_run):
    folder, _, result = local_run
    assert (result.tasks, result.ran, result.skipped) == (8, 8, 0)
    assert result.failed[["dataset", "study"]].values.tolist() == [["mine", "image-ablation"]]
    tables = sweep.load(folder / "out")
    accuracy = tables["accuracy"].set_index("dataset")
    assert set(accuracy.index) == {"shapes", "mine"} and accuracy.loc["shapes", "pairs"] == 6
    assert {"task_id", "model", "dataset", "study", "layer", "head", "a_N"} <= set(tables["heads"].columns)
    assert set(tables["image_ablation"]["dataset"]) == {"shapes"}  # pairs files have no existence layout
    manifest = tables["manifest"]
    assert (manifest["status"] == "done").sum() == 7 and manifest["peak_rss_mb"].gt(0).all()
    failed = manifest[manifest["status"] == "failed"].iloc[0]
    assert (failed["dataset"], failed["study"]) == ("mine", "image-ablation") and "existence" in failed["error"]
    assert not list((folder / "out").rglob("*.tmp"))
    report = (folder / "out" / "report.html").read_text()
    assert report.count('class="plotly-graph-div"') == 4


def test_head_ablation_against_random_heads(tmp_path, data):
    text = spec_text(tmp_path / "out", *data, studies=("head-ablation",), study_options="top_k = 2\nrandom_seeds = [0, 1]\n")
    result = sweep.run(write_spec(tmp_path / "s.toml", text), progress=False)
    assert result.ok
    table = sweep.load(tmp_path / "out")["head_ablation"]
    assert sorted(table.groupby("dataset")["condition"].apply(list).iloc[0]) == ["chosen", "none", "random", "random"]
    chosen = table[table["condition"] == "chosen"]
    assert chosen["heads"].str.split().str.len().eq(2).all()
    assert "Head ablation" in (tmp_path / "out" / "report.html").read_text()


def test_a_rerun_runs_only_what_is_missing_or_failed(local_run):
    import torch

    folder, spec, first = local_run
    threads = torch.get_num_threads()
    again = sweep.run(spec, progress=False)  # its tasks run with one thread ([resources] cpus = 1)
    assert (again.ran, again.skipped) == (1, 7)  # the failed image ablation on a pairs file, again
    assert torch.get_num_threads() == threads  # and the process's own count comes back


def with_crash(text: str, study: str, marker) -> str:
    """The spec with `study`'s first task killing its own process once."""
    return text.replace(f'[[studies]]\nname = "{study}"\n', f'[[studies]]\nname = "{study}"\ncrash_once_marker = "{marker}"\n')


def test_a_killed_driver_resumes_with_only_the_unfinished_tasks(tmp_path, data):
    """The second of four tasks kills its process (the driver, with the local executor) the first
    time; the rerun runs the three tasks that had not finished, and the tables equal an
    uninterrupted run's."""
    marker = tmp_path / "crashed"
    studies = ("accuracy", "selective-heads")
    crash = write_spec(tmp_path / "crash.toml", with_crash(spec_text(tmp_path / "out", *data, studies=studies),
                                                           "selective-heads", marker))
    killed = subprocess.run([sys.executable, "-m", "clip_lens.cli", "sweep", str(crash), "--quiet"], capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == 3 and marker.is_file(), killed.stderr[-2000:]
    resumed = sweep.run(crash, progress=False)
    assert resumed.ok and (resumed.skipped, resumed.ran) == (1, 3)
    plain = write_spec(tmp_path / "plain.toml", spec_text(tmp_path / "plain", *data, studies=studies))
    sweep.run(plain, progress=False)
    ours, theirs = comparable(sweep.load(tmp_path / "out")), comparable(sweep.load(tmp_path / "plain"))
    assert ours.keys() == theirs.keys() == {"accuracy", "pair_scores", "heads"}
    for name in ours:
        pd.testing.assert_frame_equal(ours[name], theirs[name], check_exact=True)
    attempts = sweep.load(tmp_path / "out")["manifest"].set_index("study")["attempts"]
    assert attempts.max() == 2  # the crashed task, counted across the two runs


def test_bad_model_and_missing_folder_leave_the_rest_complete(tmp_path, data, capsys):
    text = spec_text(tmp_path / "out", *data, studies=("accuracy",), extra_model=(
        f'[[models]]\nname = "broken"\narchitecture = "ViT-B-32"\npretrained = "{tmp_path / "missing.pt"}"\n'))
    text += f'[[datasets]]\nname = "gone"\nkind = "valse"\nvalse = "{tmp_path / "nowhere"}"\npiece = "existence"\nimages = "generated"\n'
    spec = write_spec(tmp_path / "s.toml", text)
    assert main(["sweep", str(spec), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "6 tasks: 0 already done, 6 run, 4 failed" in out
    manifest = sweep.load(tmp_path / "out")["manifest"].set_index(["model", "dataset"])
    assert manifest.loc[("tiny", "shapes"), "status"] == "done" and manifest.loc[("tiny", "mine"), "status"] == "done"
    assert "no checkpoint file at" in manifest.loc[("broken", "shapes"), "error"]
    assert "no VALSE piece 'existence'" in manifest.loc[("tiny", "gone"), "error"]
    assert "failed: broken / shapes / accuracy" in out


def image_folder_spec(tmp_path, studies: str, scenes: int = 0):
    """The tiny CLIP on a folder of one-shape scenes with their captions (and `scenes` synthetic
    existence scenes when > 0), running `studies` (TOML [[studies]] entries)."""
    from clip_lens.data.shapes import single_shape_set

    images, captions = single_shape_set(tmp_path / "scenes" / "images", per_class=1)
    shapes = f'[[datasets]]\nname = "scenes"\nkind = "shapes"\nscenes = {scenes}\n' if scenes else ""
    text = (f'out = "{tmp_path / "out"}"\n[[models]]\nname = "tiny"\narchitecture = "clip_lens/tiny-shapes"\n{shapes}'
            f'[[datasets]]\nname = "one-shape"\nkind = "images"\nimages = "{images}"\ncaptions = "{captions}"\n'
            + textwrap.dedent(studies))
    return write_spec(tmp_path / "s.toml", text)


def test_attention_cancellation_on_an_image_folder(tmp_path):
    spec = image_folder_spec(tmp_path, """\
        [[studies]]
        name = "attention-cancellation"
        settings = "1 1-3"
        captioner = "clip_lens/tiny-shapes-captioner"
        [[studies]]
        name = "selective-heads"
        """)
    result = sweep.run(spec, progress=False)
    assert result.failed["study"].tolist() == ["selective-heads"]
    assert "is an image folder" in result.failed["error"].iloc[0]
    summary = sweep.load(tmp_path / "out")["attention_cancellation"]
    assert summary["setting"].tolist() == ["baseline", "1", "1-3"] and summary["accuracy"].iloc[0] > 0.5
    assert summary["generated_changed"].tolist()[0] == 0 and summary["generated_changed"].iloc[-1] > 0.5
    predictions = sweep.load(tmp_path / "out")["cancellation_predictions"]
    assert predictions[predictions["setting"] == "1-3"]["generated"].nunique() == 1  # every block cancelled: one caption
    assert (tmp_path / "out" / "report.html").read_text().count('class="plotly-graph-div"') == 1


def test_circuit_and_attribution_studies(tmp_path):
    spec = image_folder_spec(tmp_path, """\
        [[studies]]
        name = "circuit"
        check = 5
        n_random = 1
        [[studies]]
        name = "attribution"
        sae_latents = 16
        sae_k = 2
        sae_steps = 40
        """, scenes=8)
    result = sweep.run(spec, progress=False)
    assert sorted(map(tuple, result.failed[["dataset", "study"]].values.tolist())) == [("one-shape", "circuit"),
                                                                                      ("scenes", "attribution")]
    tables = sweep.load(tmp_path / "out")
    summary = tables["circuit_summary"].iloc[0]
    assert summary["dataset"] == "scenes" and summary["circuit_edges"] > 0
    assert set(tables["attribution_deletion_areas"]["method"]) >= {"attribution patching", "random"}


# --- Ray -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_and_local_give_identical_tables_across_architectures(tmp_path, data, ray_instance):
    models = (*ARCHITECTURES, "tiny")
    local = write_spec(tmp_path / "local.toml", spec_text(tmp_path / "local", *data, models=models, scenes=4))
    on_ray = write_spec(tmp_path / "ray.toml", spec_text(tmp_path / "ray", *data, models=models, scenes=4))
    a = sweep.run(local, progress=False)
    b = sweep.run(on_ray, "ray", progress=False)
    assert a.ok and b.ok and a.tasks == b.tasks == 4 * 2 * 2
    ours, theirs = comparable(sweep.load(tmp_path / "local")), comparable(sweep.load(tmp_path / "ray"))
    assert ours.keys() == theirs.keys() == {"accuracy", "pair_scores", "heads"}
    for name in ours:
        pd.testing.assert_frame_equal(ours[name], theirs[name], check_exact=True)
    manifest = sweep.load(tmp_path / "ray")["manifest"]
    assert set(manifest["worker"]) == {"worker 0", "worker 1"}
    # a worker keeps its model for the next task of that model: 4 models, 16 tasks, 2 workers
    loads = manifest.groupby("worker")["model_loads"].max().sum()
    assert 4 <= loads <= 5, manifest[["worker", "model", "model_loads"]]
    assert sweep.load(tmp_path / "local")["manifest"]["model_loads"].max() == 4


def test_ray_retries_a_task_whose_worker_dies(tmp_path, data, ray_instance, capsys):
    marker = tmp_path / "crashed"
    text = with_crash(spec_text(tmp_path / "out", *data, studies=("accuracy", "selective-heads")), "selective-heads", marker)
    assert main(["sweep", str(write_spec(tmp_path / "s.toml", text)), "--ray", "--quiet"]) == 0  # joins the test's Ray
    assert marker.is_file() and "4 tasks: 0 already done, 4 run, 0 failed" in capsys.readouterr().out
    tables = sweep.load(tmp_path / "out")
    assert tables["manifest"]["attempts"].max() == 2 and (tables["manifest"]["status"] == "done").all()
    assert len(tables["heads"].groupby(["model", "dataset"])) == 2  # every task once
    assert not tables["heads"].duplicated(["task_id", "layer", "head"]).any()


def test_the_sweeps_image_ablation_encodes_each_image_once(tiny_model, tmp_path):
    """The sweep's image ablation scores its instances against the ablation's own target runs:
    the vision tower sees each instance's image and its mean-colour image once each (three passes
    per instance when the instances were encoded first)."""
    from clip_lens import studies
    from clip_lens.sweep.spec import Entry
    from clip_lens.sweep.studies import image_ablation, prepare_dataset

    data = prepare_dataset(tiny_model, Entry("shapes", {"kind": "shapes", "scenes": 6, "seed": 2}), tmp_path)
    seen = {"images": 0}
    handle = tiny_model.vision.patch_embed.register_forward_pre_hook(
        lambda module, inputs: seen.update(images=seen["images"] + inputs[0].shape[0]))
    try:
        tables = image_ablation(tiny_model, data, studies.get("image-ablation").Options())
    finally:
        handle.remove()
    n = len(data.existence())
    assert n >= 4 and seen["images"] == 2 * n
    assert list(tables["image_ablation"]["layer"])[-1] == "average"
