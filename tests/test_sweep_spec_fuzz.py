"""Property-based checks of sweep specs: mutations of a valid tiny spec (a key dropped, an unknown
key added, a value of another type, out of range, a string where a list is meant, a table where a
scalar is meant, unicode, empty strings, another entry's plausible value) are either refused when
the spec is read, with a SpecError naming the entry and the key, or accepted, planned, and (for a
sample) run on the tiny CLIP, where a task may fail only for a reason the spec cannot show: a file
that is missing, or a study that does not apply to that kind of dataset."""

import copy
import dataclasses
import datetime
import math
import re
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import SHARED_DATA, write_noise_images
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clip_lens import sweep
from clip_lens.sweep import SpecError, read_spec

SECTIONS = {"models": "model", "datasets": "dataset", "studies": "study"}
# the reasons a task of an accepted spec may fail: data that is not there, or a study that does not
# run on that kind of dataset (docs/sweeps.md: such a task fails, the others run)
TASK_TIME = re.compile(r"^FileNotFoundError: |is an image folder|needs VALSE existence|runs on an image folder|"
                       r"scores each pair against its image, and dataset .* has no images|has no pair left")
# keys whose numbers set how much work a task does: a run is tried only when they stay small
SIZE_KEYS = {"scenes", "limit", "top_k", "map_images", "beams", "caption_image", "check", "n_random", "steps", "sizes",
             "sae_latents", "sae_k", "sae_steps", "top", "ks"}


def _files(folder: Path) -> dict:
    """The data of the base spec: a pairs file with noise images, a one-shape image folder."""
    from clip_lens.data.shapes import single_shape_set

    images = write_noise_images(["a.png", "b.png"], folder / "images")
    pd.DataFrame({"caption": ["There is a dog.", "A red car."], "foil": ["There is no dog.", "A blue car."],
                  "image": ["a.png", "b.png"]}).to_csv(folder / "pairs.csv", index=False)
    shapes_images, captions = single_shape_set(folder / "scenes", per_class=1)
    return dict(pairs=str(folder / "pairs.csv"), images=str(images), shapes_images=str(shapes_images),
                captions=str(captions))


FOLDER = Path(tempfile.mkdtemp(prefix="clip_lens_spec_fuzz_"))
FILES = _files(FOLDER)
BASE = {
    "out": "out", "retries": 1, "resources": {"cpus": 1},
    "models": [{"name": "tiny", "architecture": "clip_lens/tiny-shapes"}],
    "datasets": [{"name": "shapes", "kind": "shapes", "scenes": 2, "seed": 3},
                 {"name": "mine", "kind": "pairs", "file": FILES["pairs"], "images": FILES["images"], "limit": 2},
                 {"name": "existence", "kind": "valse", "valse": str(SHARED_DATA / "valse"), "piece": "existence",
                  "images": "generated", "limit": 2},
                 {"name": "cannot", "kind": "cannot", "paths": [str(SHARED_DATA / "cannot-sources" / "nan_nli.tsv")], "limit": 2},
                 {"name": "photos", "kind": "images", "images": FILES["shapes_images"], "captions": FILES["captions"]}],
    "studies": [{"name": "accuracy"}, {"name": "selective-heads"}, {"name": "causal-tracing"},
                {"name": "head-ablation", "top_k": 1, "random_seeds": [0], "intervention": "mean"},
                {"name": "image-ablation", "grey": True, "checkpoint_chunk": 2},
                {"name": "attention-cancellation", "settings": "1 1-2", "map_images": 1},
                {"name": "circuit", "check": 2, "n_random": 1, "steps": 1, "sizes": [1, 2]},
                {"name": "attribution", "sae_latents": 8, "sae_k": 2, "sae_steps": 5, "ks": [0, 1], "top": 1}],
}
# values a key of some entry takes: mutations draw from them to reach accepted specs too
PLAUSIBLE = ["shapes", "pairs", "valse", "cannot", "images", "accuracy", "circuit", "attribution", "head-ablation",
             "clip_lens/tiny-shapes", "ViT-B-32", "ViT-B-23", "openai", "generated", "random", "existence", "plurals",
             "float16", "bfloat16", "cuda", "cpu", "mps", "zero", "resample", "text", "activations", "greedy", "1 2",
             "clip_lens/tiny-shapes-captioner", "en_core_web_sm", "There is a {}.", FILES["pairs"], FILES["images"],
             FILES["captions"], str(SHARED_DATA / "valse")]
ODD_STRINGS = ["", " ", "/", "../x", "~no-such-user-here/x", "a\x00b", "é🙂", "\n", "{}", "1", "-1", "true", "None"]
NUMBERS = st.one_of(st.integers(-3, 40), st.sampled_from([0, -1, 2**31, 2**63 - 1, -(2**63), 2**64, 10**30]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0, -0.0, 1e300]))
SCALARS = st.one_of(NUMBERS, st.booleans(), st.text(max_size=10), st.sampled_from(ODD_STRINGS + PLAUSIBLE),
                    st.dates())
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                           max_size=2), max_leaves=4)
OTHER_VALUES = {"kind": ["shapes", "pairs", "valse", "cannot", "images", "photos"],
                "architecture": ["ViT-B-32", "ViT-B-23", "clip_lens/tiny-shapes", str(FOLDER)], "pretrained": ["openai", "w.pt"],
                "dtype": ["float16", "bfloat16"], "device": ["cuda", "mps", "gpu"], "piece": ["plurals", "counting-hard", "nope"],
                "intervention": ["zero", "resample"], "settings": ["2", "1,2", "0", "x"], "tower": ["text"],
                "captioner": ["clip_lens/tiny-shapes-captioner", "random", "missing.safetensors"], "limit": [1, 3, 0],
                "seed": [5, 2**63 - 1], "scenes": [1, 3], "images": ["generated", "missing"], "sizes": [[3], []],
                "random_seeds": [[1, 2], []], "ks": [[0, 2, 4], [1, 0]], "map_layer": [0, 1, 5], "path": ["activations"],
                "selection": ["greedy", "top"], "sae_hook": ["resid", "blocks.0.hook_resid_post"], "cpus": [2, 4],
                "concept_template": ["There is a {}.", "no slot"], "spacy_model": ["en_core_web_sm"], "out": ["out2", "."]}


def plausible(key: str) -> list:
    """Values a key takes somewhere in the base spec, or could well take: most mutations of this
    kind are accepted, so that tasks run."""
    found = [entry[key] for section in SECTIONS for entry in BASE[section] if key in entry]
    return found + OTHER_VALUES.get(key, []) + ([BASE[key]] if key in BASE else []) or PLAUSIBLE


KEYS = st.one_of(st.text(max_size=8), st.sampled_from(["limit", "seed", "images", "paths", "file", "kind", "name",
                                                       "pretrained", "device", "dtype", "cpus", "gpus", "sae",
                                                       "captioner", "sae_hook", "settings", "tower", "map_layer",
                                                       "random_seeds", "huggingface", "spacy_model", "piece"]))


# --- TOML text from a spec's dict ----------------------------------------------------------------
def _string(text: str) -> str:
    return '"' + "".join(f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c for c in text) + '"'


def toml_value(value) -> str:
    """A value as TOML (inline tables and arrays; every spec key written `key = value`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value) if isinstance(value, int) else _string(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def toml_text(raw: dict) -> str:
    return "".join(f"{_string(key)} = {toml_value(value)}\n" for key, value in raw.items())


# --- mutations -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Mutated:
    """A spec's dict and the places its mutations touched: (section or None for the top level or
    "resources", entry index, key)."""

    raw: dict
    places: list


def _mutate_table(draw, table: dict, fixed_keys=()) -> str:
    """One change to `table` in place; returns the key it touched."""
    keys = [k for k in table if k not in fixed_keys]
    how = draw(st.sampled_from(["drop", "add", "value", "plausible", "plausible", "plausible"] if keys else ["add"]))
    if how == "add":
        key = draw(KEYS)
        table[key] = draw(VALUES)
        return key
    key = draw(st.sampled_from(sorted(keys)))
    if how == "drop":
        del table[key]
    else:
        table[key] = copy.deepcopy(draw(VALUES if how == "value" else st.sampled_from(plausible(key))))  # never BASE's own
    return key


@st.composite
def mutated_specs(draw, max_mutations: int = 2):
    """The base spec with 1 to `max_mutations` changes, and where they are."""
    raw, places = copy.deepcopy(BASE), []
    for _ in range(draw(st.integers(1, max_mutations))):
        where = draw(st.sampled_from(["top", "resources", "models", "datasets", "datasets", "studies", "studies"]))
        if where == "top":
            places.append((None, 0, _mutate_table(draw, raw, fixed_keys=("models", "datasets", "studies"))))
        elif where == "resources" and isinstance(raw.get("resources"), dict):
            places.append(("resources", 0, _mutate_table(draw, raw["resources"])))
        elif where != "resources" and isinstance(raw.get(where), list) and raw[where]:
            index = draw(st.integers(0, len(raw[where]) - 1))
            if isinstance(raw[where][index], dict):
                places.append((where, index, _mutate_table(draw, raw[where][index])))
    return Mutated(raw, places)


# --- the property --------------------------------------------------------------------------------
def _entry_words(raw: dict, section, index: int) -> list[str]:
    """How a message may name the place: an entry by its name (or its index, or its section when it
    has no name or shares it), [resources], or a top-level key."""
    if section is None:
        return ["top-level key", "[resources]", "out", "retries", "[[models]]", "[[datasets]]", "[[studies]]"]
    if section == "resources":
        return ["[resources]"]
    words = [f"{section}[{index}]"]
    item = raw[section][index]
    if isinstance(item.get("name"), str):
        words += [f"{SECTIONS[section]} {item['name']!r}", f"two {section} are named {item['name']!r}"]
    return words


def _names_entry_and_key(message: str, mutated: Mutated) -> bool:
    """Whether the message names one of the mutated entries and its key (a changed name or kind is
    named by the entry's words themselves)."""
    for section, index, key in mutated.places:
        named_key = key in ("name", "kind") or f"{key!r}" in message or (
            key.strip() != "" and re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", message) is not None)
        if named_key and any(word in message for word in _entry_words(mutated.raw, section, index)):
            return True
    return False


def _is_small(study: dict, dataset: dict) -> bool:
    """A task cheap enough to run here: its numbers that set the work (sizes, limits, steps) small,
    a limit on the large datasets, and not the attribution study (an SAE trained per task)."""
    def small(value):
        if isinstance(value, (list, tuple)):
            return all(small(v) for v in value)
        return not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 8

    sized = all(small(v) for entry in (study, dataset) for k, v in entry.items() if k in SIZE_KEYS)
    limited = dataset.get("kind") not in ("valse", "cannot") or dataset.get("limit") is not None
    return sized and limited and study.get("name") != "attribution"


def check_spec(mutated: Mutated, data, run: bool) -> None:
    """Refused naming entry and key; or planned, and with `run` one of its small tasks run."""
    with tempfile.TemporaryDirectory(prefix="clip_lens_spec_") as folder:
        try:
            spec = read_spec(toml_text(mutated.raw), base=folder)
        except SpecError as error:
            assert _names_entry_and_key(str(error), mutated), f"{error}\n  mutated: {mutated.places}"
            event("refused when read")
            return
        tasks = sweep.plan(spec)
        assert len(tasks) == len(spec.models) * len(spec.datasets) * len(spec.studies)
        small = [(m, d, s) for m in spec.models for d in spec.datasets for s in spec.studies
                 if _is_small(s.options | {"name": s.name}, d.options)]
        touched = {entry.get("name") for section, index, _ in mutated.places if section in SECTIONS
                   for entry in [mutated.raw[section][index]] if isinstance(entry, dict)}
        small = [task for task in small if touched & {entry.name for entry in task}] or small
        event("accepted and planned")
        if not run or not small:
            return
        model, dataset, study = data.draw(st.sampled_from(small), label="task")
        one = dataclasses.replace(spec, models=(model,), datasets=(dataset,), studies=(study,), out=Path(folder) / "run")
        result = sweep.run(one, progress=False, report=False)
        event(f"ran: {study.name} on {dataset.get('kind')}, {'done' if result.ok else 'failed'}")
        for error in result.failed["error"]:
            assert TASK_TIME.search(str(error)), f"a task failed for a reason the spec shows: {error}\n  {mutated.places}"


QUICK = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@QUICK
@given(mutated=mutated_specs(), data=st.data())
def test_a_mutated_spec_is_refused_naming_entry_and_key_or_planned(mutated, data):
    check_spec(mutated, data, run=False)


def _accepted(mutated: Mutated) -> bool:
    try:
        read_spec(toml_text(mutated.raw), base=FOLDER)
    except SpecError:
        return False
    return True


@settings(max_examples=2, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mutated=mutated_specs(max_mutations=1).filter(_accepted), data=st.data())
def test_an_accepted_mutated_spec_runs(mutated, data):
    check_spec(mutated, data, run=True)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated=mutated_specs(max_mutations=3), data=st.data())
def test_many_mutated_specs_are_refused_or_run(mutated, data):
    check_spec(mutated, data, run=True)
