"""What one sweep task runs: load a model, prepare a dataset for it, run a study, return its tables.

Each study's own `compute` runs on the prepared data, with the study's `Options` read from the
spec's table; nothing is written here (the executors store the tables). This module and the CLI
are the front ends of `clip_lens.studies`; nothing below them imports the studies.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch

from clip_lens.sweep.spec import Entry


# --- models --------------------------------------------------------------------------------------
def model_source(entry: Entry):
    """The `ModelSource` a model entry names (clip_lens.model_sources: one meaning of "no pretrained")."""
    from clip_lens.model_sources import ModelSource

    name = entry.get("huggingface") or entry.get("architecture")
    return ModelSource(str(name), entry.get("pretrained"), seed=entry.get("seed", 0), dtype=entry.get("dtype", "float32"),
                       device=entry.get("device", "cpu"))


def load_model(entry: Entry):
    """The HookedCLIP a model entry names, errors naming the entry."""
    from clip_lens.model_sources import load_model as load

    source = model_source(entry)
    if entry.get("huggingface") and not Path(source.name).is_dir():
        raise FileNotFoundError(f"model {entry.name!r}: no Hugging Face directory at {source.name}")
    try:
        return load(source, warn=False)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"model {entry.name!r}: {error}") from None


def weights_digest(entry: Entry) -> str:
    """What identifies a model's weights in a task's hash (`clip_lens.model_sources.weights_digest`)."""
    from clip_lens.model_sources import weights_digest as digest

    source = model_source(entry)
    if entry.get("huggingface") and not Path(source.name).is_dir():
        return f"hf-missing:{source.name}"
    return digest(source)


def data_digest(entry: Entry) -> str:
    """What identifies a dataset's content in a task's hash: the SHA-256 of its data files (VALSE
    piece, pairs file, CANNOT files, captions and labels files) and, for image folders, the names
    and sizes of their files; a path that does not exist is named as missing (its task fails)."""
    from clip_lens.model_sources import file_digest

    files: list[Path] = []
    folders: list[Path] = []
    kind = entry.get("kind")
    if kind == "valse":
        files.append(Path(entry.get("valse")) / f"{entry.get('piece')}.json")
    if kind == "pairs":
        files.append(Path(entry.get("file")))
    if kind == "cannot":
        for path in map(Path, entry.get("paths")):
            files += sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    if kind == "images":
        files += [Path(entry.get(key)) for key in ("captions", "labels") if entry.get(key)]
    folders += [Path(entry.get("images"))] if kind in ("valse", "pairs", "images") and entry.get("images") not in (None, "generated") else []
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}:{file_digest(path) if path.is_file() else 'missing'};".encode())
    for folder in folders:
        listing = sorted((f.relative_to(folder).as_posix(), f.stat().st_size) for f in folder.rglob("*") if f.is_file()) \
            if folder.is_dir() else "missing"
        h.update(repr(listing).encode())
    return h.hexdigest()


# --- datasets ------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A dataset made ready for one model: its minimal pairs, which text is marked (see
    `minimal_pairs.orient`), image embeddings [pairs, d_embed] or None, for image ablation a
    function that selects the existence-format pairs (`existence.select`: their images not encoded
    yet); or, for an image folder, its `image_set` (frame, captions, targets) and no pairs."""

    name: str
    pairs: object
    marked: object
    image_emb: Optional[torch.Tensor]
    existence: Optional[Callable[[], object]] = None
    image_set: object = None


def prepare_dataset(model, entry: Entry, workdir: Path) -> Prepared:
    from clip_lens.data import read_pairs_file
    from clip_lens.scores import encode_images
    from clip_lens.studies import compare_tasks
    from clip_lens.studies.analyses import existence

    kind, limit = entry.get("kind"), entry.get("limit")
    if kind == "images":
        from clip_lens.data.image_sets import open_image_set

        images = entry.get("images")
        if images is not None and not Path(images).is_dir():
            raise FileNotFoundError(f"dataset {entry.name!r}: no image folder at {images}")
        image_set = open_image_set(images, entry.get("captions"), entry.get("labels"), workdir / "sample_images")
        return Prepared(entry.name, None, None, None, image_set=image_set)
    if kind == "shapes":
        from clip_lens.data.shapes import export_valse

        json_path = export_valse(workdir / "shapes", entry.get("scenes", 40), seed=entry.get("seed", 1))
        kind, entry = "valse", Entry(entry.name, {"valse": str(json_path.parent), "piece": "existence",
                                                  "images": str(json_path.parent / "images")})
    if kind == "valse":
        folder, piece, images = Path(entry.get("valse")), entry.get("piece"), entry.get("images")
        if not (folder / f"{piece}.json").is_file():
            raise FileNotFoundError(f"dataset {entry.name!r}: no VALSE piece {piece!r} at {folder / (piece + '.json')}")
        generated = images == "generated"
        if not generated and not Path(images).is_dir():
            raise FileNotFoundError(f"dataset {entry.name!r}: no image folder at {images}")
        sources = compare_tasks.TaskSources(valse=folder, pieces=[piece], images=None if generated else images,
                                            generated_images=generated)
        task = compare_tasks.build_tasks(model, sources, limit=limit, seed=entry.get("seed", 0), progress=False)[0]

        def instances():
            if piece != "existence" or generated:
                raise ValueError(f"dataset {entry.name!r}: image ablation needs VALSE existence with its image folder")
            return existence.select(model, folder / "existence.json", images, missing="skip", limit=limit)

        return Prepared(entry.name, task.pairs, task.marked, task.image_emb, instances)
    if kind == "cannot":
        paths = [Path(p) for p in entry.get("paths")]
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"dataset {entry.name!r}: no CANNOT file or folder at {p}")
        sources = compare_tasks.TaskSources(cannot=paths, spacy_model=entry.get("spacy_model", "en_core_web_sm"))
        task = compare_tasks.build_tasks(model, sources, limit=limit, progress=False)[0]
        return Prepared(entry.name, task.pairs, task.marked, None)
    pairs = read_pairs_file(entry.get("file"), lambda texts: model.to_tokens(texts, trim=False), images=entry.get("images"))
    if limit:
        pairs.pairs = pairs.pairs.head(limit).reset_index(drop=True)
    has_images = len(pairs) and not pairs.pairs["image"].isna().any()
    emb = encode_images(model, list(pairs.pairs["image"]), progress=False) if has_images else None
    return Prepared(entry.name, pairs, "b", emb)


# --- studies -------------------------------------------------------------------------------------
def _needs_pairs(data: Prepared, study: str) -> None:
    if data.pairs is None:
        raise ValueError(f"dataset {data.name!r} is an image folder: of the sweep's studies only attention-cancellation "
                         f"runs on it, not {study!r}")


def _pair_task(data: Prepared, study: str):
    """The dataset as one minimal-pair task (`clip_lens.studies.pair_tasks.TaskInput`)."""
    from clip_lens.studies.pair_tasks import TaskInput

    _needs_pairs(data, study)
    return TaskInput(data.name, data.pairs, data.marked, data.image_emb)


def _pair_compute(name: str, model, data: Prepared, options) -> dict[str, pd.DataFrame]:
    """The compute of `clip_lens.studies.pair_tasks`' study `name` on the dataset's pairs."""
    from clip_lens.studies import pair_tasks

    return pair_tasks.STUDIES[name].compute(model, _pair_task(data, name), options, progress=False)


def accuracy(model, data: Prepared, options) -> dict[str, pd.DataFrame]:
    """Each pair's S for both texts against its image; accuracy = share preferring the correct one."""
    return _pair_compute("accuracy", model, data, options)


def causal_tracing(model, data: Prepared, options) -> dict[str, pd.DataFrame]:
    """Causal tracing around the differing span; localisation = spread of CTE over the span and
    the positions after it, per layer (as `clip-lens compare-tasks`)."""
    return _pair_compute("causal-tracing", model, data, options)


def selective_heads(model, data: Prepared, options) -> dict[str, pd.DataFrame]:
    """Each head's selectivity for the differing tokens (docs/methods.md#minimal-pairs)."""
    return _pair_compute("selective-heads", model, data, options)


def head_ablation(model, data: Prepared, options) -> dict[str, pd.DataFrame]:
    """The model's `top_k` most selective heads for this dataset intervened on ("zero", "mean" or
    "resample"), against as many random heads per seed: accuracy and mean d
    (docs/methods.md#head-interventions)."""
    return _pair_compute("head-ablation", model, data, options)


def image_ablation(model, data: Prepared, options) -> dict[str, pd.DataFrame]:
    """MHA and MLP outputs replaced by the mean-colour image's, block by block (VALSE existence):
    the study "image-ablation" (`options`: its Options), its mean IAE per layer. The instances are
    scored against the ablation's own target runs (`image_ablation.run_and_score`), so each image
    is encoded once."""
    from clip_lens.studies import valse_existence
    from clip_lens.studies.analyses import image_ablation as analysis

    if data.existence is None:
        raise ValueError(f"dataset {data.name!r}: image ablation needs VALSE existence (or shapes) with images")
    _, ablation = analysis.run_and_score(model, data.existence(), grey=options.grey, progress=False, **options.engine())
    return {"image_ablation": valse_existence.image_ablation_tables(ablation)["image_ablation_mha_vs_mlp"]}


def attention_cancellation(model, data: Prepared, options) -> dict[str, pd.DataFrame]:
    """Value-only attention per setting on an image folder (docs/methods.md#attention-cancellation);
    with `captioner` (a name, file, Hugging Face directory or "random", seeded by `seed`) also the
    generated captions (docs/methods.md#generated-captions). `options`: the study's Options."""
    from clip_lens.studies import attention_cancellation as study

    if data.image_set is None:
        raise ValueError(f"dataset {data.name!r}: attention cancellation runs on an image folder with captions "
                         "(kind = \"images\")")
    result, _ = study.cancel(model, data.image_set, options, progress=False)
    return {"attention_cancellation": result.summary(), "cancellation_predictions": result.predictions()}


def circuit(model, data: Prepared, options) -> dict[str, pd.DataFrame]:
    """The text tower's circuit for the pairs' difference (marked text clean, unmarked corrupted, S
    against the image): EAP and EAP-IG over every edge, the top edges checked by exact edge
    patching, faithfulness against random circuits (docs/methods.md#circuits)."""
    from clip_lens.studies import circuit as circuit_study
    from clip_lens.studies.pair_tasks import needs_images

    task = _pair_task(data, "circuit")
    needs_images(task, "circuit")
    found = circuit_study.marked_pairs(model, data.name, data.pairs, data.marked, data.image_emb)
    tables = circuit_study.compute(model, found, options, progress=False)
    return {f"circuit_{name}": tables[name] for name in ("summary", "faithfulness", "circuit", "agreement")}


def attribution(model, data: Prepared, options) -> dict[str, pd.DataFrame]:
    """Attribution of each image's S with its caption to heads, neurons and SAE latents, Logit Lens
    and the deletion curves (docs/attribution.md), on an image folder with captions. `options`: the
    study's Options (its defaults: an SAE of 256 latents, k 16, 1500 steps)."""
    from clip_lens.studies import attribution as study

    if data.image_set is None:
        raise ValueError(f"dataset {data.name!r}: attribution runs on an image folder with captions (kind = \"images\")")
    tables = study.compute(model, data.image_set, options, progress=False)
    return {f"attribution_{name}": table for name, table in tables.items() if name not in study.REPORT_TABLES}


STUDIES: dict[str, Callable[..., dict]] = {"accuracy": accuracy, "causal-tracing": causal_tracing,
                                           "selective-heads": selective_heads, "image-ablation": image_ablation,
                                           "attention-cancellation": attention_cancellation, "circuit": circuit,
                                           "attribution": attribution, "head-ablation": head_ablation}


def _study_options(study: Entry):
    """The study's `Options` from the entry's keys (checked when the spec was read)."""
    from clip_lens import studies
    from clip_lens.sweep.spec import TEST_KEYS

    return studies.get(study.name).Options(**{k: v for k, v in study.options.items() if k not in TEST_KEYS})


def run_study(model, dataset: Entry, study: Entry) -> dict[str, pd.DataFrame]:
    """One task's tables (each a DataFrame; the caller adds the task's columns)."""
    with tempfile.TemporaryDirectory(prefix="clip_lens_sweep_") as workdir:
        data = prepare_dataset(model, dataset, Path(workdir))
        if data.pairs is not None and len(data.pairs) == 0:
            raise ValueError(f"dataset {dataset.name!r} has no pair left for this model ({len(data.pairs.excluded)} "
                             "excluded)")
        tables = STUDIES[study.name](model, data, _study_options(study))
    return {name: table.reset_index(drop=True) for name, table in tables.items()}


def as_plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns Parquet stores as they are: objects made strings, numpy scalars kept."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = out[column].map(lambda v: v if v is None or isinstance(v, str) else str(v))
    out.columns = [str(c) for c in out.columns]
    return out

