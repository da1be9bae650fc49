"""Every study keeps one contract (clip_lens.studies): a frozen, keyword-only Options dataclass
checked when made, compute and report; the command line and sweep specs set its options through
that dataclass alone, so every flag and every sweep key has the dataclass's default."""

import argparse
import dataclasses

import pytest

from clip_lens import studies
from clip_lens.cli import build_parser
from clip_lens.studies.options import OptionError, StudyOptions, flag_name, options_from_mapping
from clip_lens.sweep.spec import SWEEP_STUDIES, SpecError, read_spec


@pytest.mark.parametrize("name", studies.NAMES)
def test_every_study_keeps_the_contract(name):
    study = studies.get(name)
    assert study.name == name and callable(study.compute) and callable(study.report)
    options = study.Options()                                      # every default passes its own checks
    assert isinstance(options, StudyOptions)
    params = study.Options.__dataclass_params__
    assert params.frozen and all(f.kw_only for f in dataclasses.fields(study.Options))
    with pytest.raises(TypeError):
        study.Options(1)                                           # keyword-only
    for field in dataclasses.fields(study.Options):
        assert field.metadata.get("help"), f"{name}: option {field.name} has no help text"
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(options, field.name, getattr(options, field.name))


def _study_commands():
    """{command: (its parser, the study it runs)} for every command built by `study_parser`."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {command: (p, p.get_default("study_name")) for command, p in sub.choices.items()
            if p.get_default("study_name")}


def test_the_study_commands_are_the_studies():
    commands = _study_commands()
    assert {"valse-existence", "cannot", "attention-cancellation", "attribution", "circuit", "pairs", "compare-tasks",
            "covariates"} <= set(commands)


@pytest.mark.parametrize("command", sorted(_study_commands()))
def test_each_flag_is_an_option_with_the_dataclass_default(command):
    parser, name = _study_commands()[command]
    fields = {f.name: f for f in dataclasses.fields(studies.get(name).Options)}
    for action in parser._actions:
        if action.dest not in fields or not fields[action.dest].metadata["cli"]:
            continue  # (an option the command sets from a positional choice has no flag of its own)
        field = fields[action.dest]
        assert flag_name(field.name) in action.option_strings
        assert action.default is argparse.SUPPRESS        # not given -> not set -> the dataclass's default
        shown = field.default if not isinstance(field.default, tuple) else " ".join(map(str, field.default))
        assert f"(default {shown})" in action.help
    flags = {a.dest for a in parser._actions if a.dest in fields and a.option_strings}
    cli_fields = {n for n, f in fields.items() if f.metadata["cli"]}
    assert flags == cli_fields, f"{command}: options without a flag: {sorted(cli_fields - flags)}"


@pytest.mark.parametrize("name", SWEEP_STUDIES)
def test_each_sweep_key_is_an_option_with_the_dataclass_default(name):
    options = studies.get(name).Options
    assert options_from_mapping(options, {}, f"study {name!r}") == options()
    with pytest.raises(OptionError, match=f"study '{name}' has unknown key 'no_such_key'"):
        options_from_mapping(options, {"no_such_key": 1}, f"study {name!r}")


SPEC = """out = "runs"
[[models]]
name = "tiny"
architecture = "clip_lens/tiny-shapes"
[[datasets]]
name = "scenes"
kind = "shapes"
{dataset}
[[studies]]
name = "{study}"
{option}
{resources}
"""


@pytest.mark.parametrize("study, option, dataset, resources, named", [
    ("image-ablation", 'grey = "false"', "", "", "study 'image-ablation': key grey='false'"),
    ("attribution", "limit = -1", "", "", "study 'attribution': key limit=-1"),
    ("head-ablation", "random_seeds = []", "", "", "study 'head-ablation': key random_seeds=[]"),
    ("circuit", "n_random = -1", "", "", "study 'circuit': key n_random=-1"),
    ("head-ablation", "top_k = -1", "", "", "study 'head-ablation': key top_k=-1"),
    ("accuracy", "", "scenes = 0", "", "dataset 'scenes' (shapes): key scenes=0"),
    ("accuracy", "", "", '[resources]\ncpus = "2"', "[resources]: key cpus='2'"),
])
def test_a_spec_with_a_wrong_value_is_refused_when_read(study, option, dataset, resources, named):
    with pytest.raises(SpecError) as error:
        read_spec(SPEC.format(study=study, option=option, dataset=dataset, resources=resources))
    assert named in str(error.value)


def test_an_option_error_names_the_option_and_what_is_allowed():
    options = studies.get("covariates").Options
    with pytest.raises(OptionError, match=r"scenes=0: give an integer >= 1"):
        options(scenes=0)
    with pytest.raises(OptionError, match=r"scenes=True: give an integer"):
        options(scenes=True)                                       # an integer, not a bool
    with pytest.raises(OptionError, match=r"seed='1'"):
        options(seed="1")
