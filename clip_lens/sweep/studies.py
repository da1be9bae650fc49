"""What one sweep task runs: load a model, prepare a dataset for it, run a study, return its tables.

This module and the CLI are the only library code that reaches into the studies
(`clip_lens.experiments`): both drive them, nothing below imports them.
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
def load_model(entry: Entry):
    """The HookedCLIP a model entry names: clip_lens/tiny-shapes, an open_clip architecture with a
    tag or checkpoint (random weights, seeded by `seed`, without one), or a transformers directory."""
    import clip_lens
    from clip_lens import zoo
    from clip_lens.model import DTYPES, random_model_pair

    device, dtype = entry.get("device", "cpu"), DTYPES[entry.get("dtype", "float32")]
    if entry.get("huggingface"):
        path = Path(entry.get("huggingface"))
        if not path.is_dir():
            raise FileNotFoundError(f"model {entry.name!r}: no Hugging Face directory at {path}")
        return clip_lens.HookedCLIP.from_huggingface(path, device=device, dtype=dtype)
    name, pretrained = entry.get("architecture"), entry.get("pretrained")
    if name == zoo.NAME or pretrained is not None:
        if pretrained is not None and ("/" in str(pretrained) or "\\" in str(pretrained)) and not Path(pretrained).is_file():
            raise FileNotFoundError(f"model {entry.name!r}: no checkpoint file at {pretrained}")
        return clip_lens.HookedCLIP.from_pretrained(name, pretrained=pretrained, device=device, dtype=dtype)
    _, model = random_model_pair(name, seed=entry.get("seed", 0))
    return model.to(device=device, dtype=dtype)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(entry: Entry) -> str:
    """What identifies a model's weights in a task's hash: the file's SHA-256 where there is a file,
    else the tag or the random seed."""
    from clip_lens import zoo

    digest = _file_digest

    if entry.get("huggingface"):
        folder = Path(entry.get("huggingface"))
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
        return "hf:" + ",".join(digest(f) for f in files) if files else f"hf-missing:{folder}"
    name, pretrained = entry.get("architecture"), entry.get("pretrained")
    if name == zoo.NAME and pretrained is None:
        return "file:" + digest(zoo.WEIGHTS)
    if pretrained is not None:
        path = Path(pretrained)
        return "file:" + digest(path) if path.is_file() else f"tag:{pretrained}"
    return f"random:{entry.get('seed', 0)}"


def data_digest(entry: Entry) -> str:
    """What identifies a dataset's content in a task's hash: the SHA-256 of its data files (VALSE
    piece, pairs file, CANNOT files, captions and labels files) and, for image folders, the names
    and sizes of their files; a path that does not exist is named as missing (its task fails)."""
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
        h.update(f"{path.name}:{_file_digest(path) if path.is_file() else 'missing'};".encode())
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
    function that builds the existence-format instances; or, for an image folder, its `image_set`
    (frame, captions, targets) and no pairs."""

    name: str
    pairs: object
    marked: object
    image_emb: Optional[torch.Tensor]
    existence: Optional[Callable[[], object]] = None
    image_set: object = None
    folder: Optional[dict] = None  # an image folder's entry keys (images, captions, labels)


def prepare_dataset(model, entry: Entry, workdir: Path) -> Prepared:
    from clip_lens.data import read_pairs_file
    from clip_lens.studies import compare_tasks
    from clip_lens.studies.analyses import existence
    from clip_lens.scores import encode_images

    kind, limit = entry.get("kind"), entry.get("limit")
    if kind == "images":
        from clip_lens.data.image_sets import open_image_set

        images = entry.get("images")
        if images is not None and not Path(images).is_dir():
            raise FileNotFoundError(f"dataset {entry.name!r}: no image folder at {images}")
        image_set = open_image_set(images, entry.get("captions"), entry.get("labels"), workdir / "sample_images")
        folder = {key: entry.get(key) for key in ("images", "captions", "labels")}
        return Prepared(entry.name, None, None, None, image_set=image_set, folder=folder)
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
        task = compare_tasks.build_tasks(model, valse=folder, pieces=[piece], images=None if generated else images,
                                         generated_images=generated, limit=limit, seed=entry.get("seed", 0),
                                         progress=False)[0]

        def instances():
            if piece != "existence" or generated:
                raise ValueError(f"dataset {entry.name!r}: image ablation needs VALSE existence with its image folder")
            return existence.prepare(model, folder / "existence.json", images, missing="skip", limit=limit, progress=False)

        return Prepared(entry.name, task.pairs, task.marked, task.image_emb, instances)
    if kind == "cannot":
        paths = [Path(p) for p in entry.get("paths")]
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"dataset {entry.name!r}: no CANNOT file or folder at {p}")
        task = compare_tasks.build_tasks(model, cannot=paths, limit=limit, spacy_model=entry.get("spacy_model", "en_core_web_sm"),
                                         progress=False)[0]
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


def _needs_images(data: Prepared, study: str) -> None:
    _needs_pairs(data, study)
    if data.image_emb is None:
        raise ValueError(f"study {study!r} scores each pair against its image, and dataset {data.name!r} has no images")


def accuracy(model, data: Prepared, options: dict) -> dict[str, pd.DataFrame]:
    """Each pair's S for both texts against its image; accuracy = share preferring the correct one."""
    from clip_lens.scores import pair_scores

    _needs_images(data, "accuracy")
    frame = data.pairs.pairs
    a_correct = (frame["correct"] == "a").to_numpy()
    right = [a if ok else b for a, b, ok in zip(frame["a"], frame["b"], a_correct)]
    wrong = [b if ok else a for a, b, ok in zip(frame["a"], frame["b"], a_correct)]
    scores = pair_scores(model, right, wrong, data.image_emb)
    per_pair = pd.DataFrame({"id": frame["id"].astype(str), "S_correct": scores["S_caption"], "S_wrong": scores["S_foil"],
                             "d": scores["d"], "correct": scores["d"] > 0})
    summary = pd.DataFrame([{"pairs": len(per_pair), "excluded": len(data.pairs.excluded),
                             "accuracy": float(per_pair["correct"].mean()), "mean_d": float(per_pair["d"].mean())}])
    return {"accuracy": summary, "pair_scores": per_pair}


def causal_tracing(model, data: Prepared, options: dict) -> dict[str, pd.DataFrame]:
    """Causal tracing around the differing span; localisation = spread of CTE over the span and
    the positions after it, per layer (as `clip-lens compare-tasks`)."""
    from clip_lens.studies import compare_tasks
    from clip_lens.studies.analyses import minimal_pairs

    _needs_images(data, "causal-tracing")
    traced = minimal_pairs.trace(model, data.pairs, data.image_emb, data.marked, progress=False).frame()
    tail = traced[traced["position"].isin(compare_tasks.TAIL)]
    spread = tail.groupby("layer")["cte"].std(ddof=0).rename("localisation").reset_index()
    return {"causal_tracing": traced, "localisation": spread}


def selective_heads(model, data: Prepared, options: dict) -> dict[str, pd.DataFrame]:
    """Each head's selectivity for the differing tokens (docs/methods.md#minimal-pairs)."""
    from clip_lens.studies.analyses import minimal_pairs

    _needs_pairs(data, "selective-heads")
    return {"heads": minimal_pairs.selective_heads(model, data.pairs, data.marked, progress=False).head_table()}


def image_ablation(model, data: Prepared, options) -> dict[str, pd.DataFrame]:
    """MHA and MLP outputs replaced by the mean-colour image's, block by block (VALSE existence):
    the study "image-ablation" (`options`: its Options), its mean IAE per layer."""
    from clip_lens.studies import negation

    if data.existence is None:
        raise ValueError(f"dataset {data.name!r}: image ablation needs VALSE existence (or shapes) with images")
    tables = negation.STUDIES["image-ablation"].compute(model, data.existence(), options, progress=False)
    return {"image_ablation": tables["image_ablation_mha_vs_mlp"]}


def attention_cancellation(model, data: Prepared, options: dict) -> dict[str, pd.DataFrame]:
    """Value-only attention per setting on an image folder (docs/methods.md#attention-cancellation);
    with `captioner` (a name, file, Hugging Face directory or "random") also the generated captions
    (docs/methods.md#generated-captions)."""
    from clip_lens.studies.analyses import attention_cancellation as cancellation

    if data.image_set is None:
        raise ValueError(f"dataset {data.name!r}: attention cancellation runs on an image folder with captions "
                         "(kind = \"images\")")
    settings = cancellation.parse_settings(options["settings"], model.vision.cfg.n_layers) if options.get("settings") else None
    captioner = None
    if options.get("captioner"):
        from clip_lens.captioning import load_captioner
        from clip_lens.captioning.train import random_captioner

        source = options["captioner"]
        captioner = (random_captioner(model.vision.cfg.d_embed) if source == "random" else load_captioner(source)).to(model.device)
    image_set = data.image_set
    result = cancellation.run(model, image_set.frame, image_set.captions, targets=image_set.targets, settings=settings,
                              captioner=captioner, beams=options.get("beams", 1), progress=False)
    return {"attention_cancellation": result.summary(), "cancellation_predictions": result.predictions()}


def circuit(model, data: Prepared, options: dict) -> dict[str, pd.DataFrame]:
    """The text tower's circuit for the pairs' difference (marked text clean, unmarked corrupted, S
    against the image): EAP and EAP-IG over every edge, the top edges checked by exact edge
    patching, faithfulness against random circuits (docs/methods.md#circuits)."""
    from clip_lens import circuits
    from clip_lens.studies import circuit as circuit_study
    from clip_lens.studies.analyses import minimal_pairs

    _needs_images(data, "circuit")
    marked, unmarked = minimal_pairs.orient(data.pairs, data.marked)
    task = circuits.make_task(model, clean=marked, corrupt=unmarked, image=data.image_emb)
    table = pd.DataFrame({"id": data.pairs.pairs["id"].astype(str), "clean": marked, "corrupt": unmarked})
    found = circuit_study.CircuitTask(task, table, f"{len(table)} pairs of {data.name}: the marked text (clean) against "
                                                   "the other (corrupted)")
    with tempfile.TemporaryDirectory(prefix="clip_lens_circuit_") as out:
        tables = circuit_study.circuit_study(model, getattr(model, "name", "") or "model", out, found,
                                             steps=options.get("steps", 5), check=options.get("check", 20),
                                             n_random=options.get("n_random", 3), progress=False)
    return {f"circuit_{name}": tables[name] for name in ("summary", "faithfulness", "circuit", "agreement")}


def attribution(model, data: Prepared, options: dict) -> dict[str, pd.DataFrame]:
    """Attribution of each image's S with its caption to heads, neurons and SAE latents, Logit Lens
    and the deletion curves (docs/attribution.md), on an image folder with captions."""
    from clip_lens.studies import attribution as attribution_study

    if data.folder is None:
        raise ValueError(f"dataset {data.name!r}: attribution runs on an image folder with captions (kind = \"images\")")
    with tempfile.TemporaryDirectory(prefix="clip_lens_attribution_") as out:
        tables = attribution_study.attribution_study(
            model, getattr(model, "name", "") or "model", Path(out) / "study", **data.folder,
            sae_latents=options.get("sae_latents", 64), sae_k=options.get("sae_k", 4),
            sae_steps=options.get("sae_steps", 300), limit=options.get("limit"), progress=False)
    return {f"attribution_{name}": table for name, table in tables.items()}


def head_ablation(model, data: Prepared, options: dict) -> dict[str, pd.DataFrame]:
    """The model's `top_k` most selective heads for this dataset intervened on ("zero", "mean" or
    "resample"), against as many random heads per seed: accuracy and mean d
    (docs/methods.md#head-interventions)."""
    from clip_lens.studies.analyses import head_interventions
    from clip_lens.studies.analyses import minimal_pairs

    _needs_images(data, "head-ablation")
    intervention = options.get("intervention", "zero")
    if intervention not in ("zero", "mean", "resample"):
        raise ValueError(f"head-ablation intervention {intervention!r}: use zero, mean or resample")
    heads = minimal_pairs.selective_heads(model, data.pairs, data.marked, progress=False).head_table()
    top = [(int(r.layer), int(r.head)) for r in heads.head(options.get("top_k", 3)).itertuples()]
    table = head_interventions.intervention_study(model, data.pairs, data.image_emb, top, intervention=intervention,
                                                  random_seeds=tuple(options.get("random_seeds", (0, 1, 2))))
    return {"head_ablation": table}


STUDIES: dict[str, Callable[..., dict]] = {"accuracy": accuracy, "causal-tracing": causal_tracing,
                                           "selective-heads": selective_heads, "image-ablation": image_ablation,
                                           "attention-cancellation": attention_cancellation, "circuit": circuit,
                                           "attribution": attribution, "head-ablation": head_ablation}


def _study_options(study: Entry):
    """The study's `Options` from the entry's keys (transitional: a dict while a study has none)."""
    from clip_lens import studies

    keys = {k: v for k, v in study.options.items() if k != "crash_once_marker"}
    try:
        options = studies.get(study.name).Options
    except (ImportError, AttributeError, KeyError):
        return study.options
    return options(**keys)


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

