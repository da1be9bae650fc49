"""An activation store on disk: one hook's activations over many inputs, in fixed-size shards with
a manifest, for training SAEs on more vectors than fit in memory (docs/sae.md).

    fill_store(model, "photos/", "vision.blocks.11.hook_resid_post", "runs/acts", positions="all")
    store = ActivationStore("runs/acts")            # len(store) vectors of width store.d
    for batch in store.batches(4096, seed=0):       # float32 [4096, d], each vector once per pass
        ...

The folder:

    manifest.json                 what was stored (hook, positions, seed, model, source, dtype, d,
                                  shard_size, vectors per input) and, per written shard, its input
                                  range, its number of vectors and the SHA-256 of its files
    shard_00000.npy               [n, d] vectors, n = shard_size except in the last shard
    shard_00000.origins.npy       [n, 2] int64: (input index, position) each vector came from

Why .npy shards: the format is numpy's own (no extra dependency), its header states dtype and
shape, so a shard is read with one sequential `readinto` after a few header bytes (the shuffled
reader) or memory-mapped for random access (`ActivationStore.vectors`), and any numpy can open it.
safetensors would do as well for reading but brings nothing more here: a shard is one array.

Writing: a shard is always a whole range of inputs (`shard_size` a multiple of the vectors each
input gives; for every text position, as many whole texts as fit), so a killed fill resumes at the
next unwritten shard without recomputing the inputs of the shards already written (kept when their
SHA-256 matches the manifest). Each shard and the manifest are written under a temporary name,
fsynced and renamed. Memory holds one shard and one model batch, never the store.

Several processes may fill one store, each its own `shards=range(...)`: a shard's inputs follow from
the configuration alone, and the manifest is updated under an exclusive lock (`.manifest.lock`), so
the workers' records merge. (The sweep executor runs studies into tables; a store's shards are not
studies, so workers are plain processes given shard ranges.)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from clip_lens.hooks import split_tower_prefix
from clip_lens.model_sources import file_digest
from clip_lens.report import write_atomically

FORMAT, VERSION = "clip_lens activation store", 1
MANIFEST, LOCK = "manifest.json", ".manifest.lock"
DTYPES = ("float32", "float16")
DEFAULT_SHARD_VECTORS = 1 << 16
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# what must agree for a fill to add to an existing store (the rest of the manifest is its state)
CONFIG_KEYS = ("format", "version", "hook", "positions", "seed", "dtype", "d", "shard_size", "vectors_per_input",
               "n_inputs", "n_shards", "n_vectors", "model", "source")


class StoreError(ValueError):
    """A store folder that cannot be used as asked (another configuration, a damaged file)."""


# --- inputs --------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """The inputs of a fill, indexable by range: texts (strings) or images (paths or a pixel tensor)."""

    modality: str                       # "text" or "vision"
    items: Any                          # list of texts, list of image paths, or a tensor [n, ...]
    source: dict                        # what identifies them (compared when a fill resumes)
    path: Optional[str] = None          # where they were read from (not compared: a moved folder resumes)

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, index: int) -> str:
        """One input named for an error message."""
        if self.source["kind"] == "text file":
            return f"{self.path} line {index + 1} ({self.items[index]!r})"
        if self.source["kind"] == "image folder":
            return str(self.items[index])
        return f"input {index}"

    def tensor(self, model: Any, start: int, stop: int) -> Tensor:
        """Model inputs for items [start, stop): tokens (trimmed) or pixels."""
        chunk = self.items[start:stop]
        if self.modality == "text":
            return chunk if isinstance(chunk, Tensor) else model.to_tokens(list(chunk))
        return chunk if isinstance(chunk, Tensor) else model.to_pixels(list(chunk))


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def _text_file(path: Path) -> Inputs:
    raw = path.read_bytes()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error})") from None
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ValueError(f"{path} line {blank[0]} is blank: a text file holds one sentence per line"
                         + (f" ({len(blank)} blank lines)" if len(blank) > 1 else ""))
    if not lines:
        raise ValueError(f"{path} holds no sentences")
    return Inputs("text", lines, {"kind": "text file", "count": len(lines), "sha256": _digest(raw)}, str(path))


def _image_folder(path: Path) -> Inputs:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
    listing = "\n".join(f"{p.name}\t{p.stat().st_size}" for p in files).encode()
    return Inputs("vision", files, {"kind": "image folder", "count": len(files), "names_and_sizes": _digest(listing)},
                  str(path))


def resolve_inputs(inputs: Any) -> Inputs:
    """An image folder (every image file, sorted by name), a text file (one sentence per line), a
    list of texts, a pixel tensor [n, 3, H, W] or a token tensor [n, pos]."""
    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        if path.is_dir():
            return _image_folder(path)
        if path.is_file():
            return _text_file(path)
        raise FileNotFoundError(f"inputs not found: {path} (an image folder or a text file, one sentence per line)")
    if isinstance(inputs, Tensor):
        kind = "pixels" if inputs.is_floating_point() and inputs.ndim == 4 else "tokens"
        if kind == "tokens" and (inputs.ndim != 2 or inputs.is_floating_point()):
            raise ValueError(f"an input tensor is pixels [n, 3, H, W] or tokens [n, pos], not {inputs.dtype} "
                             f"{list(inputs.shape)}")
        data = inputs.detach().cpu().contiguous()
        return Inputs("vision" if kind == "pixels" else "text", data,
                      {"kind": kind, "shape": list(data.shape), "sha256": _digest(data.numpy().tobytes())})
    if isinstance(inputs, Sequence) and inputs and all(isinstance(t, str) for t in inputs):
        texts = list(inputs)
        return Inputs("text", texts, {"kind": "texts", "count": len(texts),
                                      "sha256": _digest("\n".join(texts).encode())})
    raise ValueError(f"inputs must be an image folder, a text file, a non-empty list of texts or a pixel tensor, "
                     f"not {type(inputs).__name__}")


# --- what a fill computes ------------------------------------------------------------------------
def check_hook(model: Any, hook: str, modality: str) -> tuple[Any, str]:
    """(the tower, its own hook name) for a HookedCLIP hook name with its tower prefix."""
    prefix, local = split_tower_prefix(hook)
    if prefix is None:
        raise ValueError(f"hook {hook!r} has no tower prefix: name it as the HookedCLIP does, e.g. "
                         f"'vision.{hook}' or 'text.{hook}'")
    if hook not in model.hook_dict:
        near = [name for name in model.hook_dict if name.startswith(prefix + ".") and name.endswith(hook[-12:])][:3]
        raise ValueError(f"unknown hook {hook!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    if prefix != modality:
        raise ValueError(f"hook {hook!r} is in the {prefix} tower, but the inputs are {modality} inputs")
    return getattr(model, prefix), local


def parse_positions(positions: Union[str, int]) -> Union[str, int]:
    if positions in ("pooled", "all"):
        return positions
    if isinstance(positions, str) and positions.isdigit():
        positions = int(positions)
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise ValueError(f"positions must be 'pooled', 'all' or a positive number sampled per input, not {positions!r}")
    return positions


@dataclass
class Plan:
    """Which inputs each shard holds: shard i is inputs [starts[i], starts[i + 1]) with counts[i] vectors."""

    starts: list
    counts: list

    def __len__(self) -> int:
        return len(self.counts)


def vectors_per_input(tower: Any, positions: Union[str, int], has_positions: bool) -> Optional[int]:
    """Vectors each input gives (None: as many as each text has positions, for "all" on text)."""
    if not has_positions:
        if positions != "pooled":
            raise ValueError(f"this hook has no position axis: only positions='pooled' applies, not {positions!r}")
        return 1
    if positions == "pooled":
        return 1
    n_ctx = tower.cfg.n_ctx
    if positions == "all":
        return n_ctx if tower.modality == "vision" else None
    if positions > n_ctx:
        raise ValueError(f"positions={positions} sampled per input, but the {tower.modality} tower has {n_ctx} positions")
    return positions


def text_lengths(model: Any, inputs: Inputs, chunk: int = 1024) -> np.ndarray:
    """Each text's positions up to and including EOT (the tower's own `sequence_lengths`)."""
    lengths = [model.text.sequence_lengths(inputs.tensor(model, i, i + chunk)).cpu().numpy()
               for i in range(0, len(inputs), chunk)]
    return np.concatenate(lengths).astype(np.int64)


def make_plan(n_inputs: int, per_input: Optional[int], shard_size: int, lengths: Optional[np.ndarray]) -> Plan:
    """Shards as whole input ranges: shard_size / per_input inputs each, or (texts at every
    position) as many whole texts as fit in shard_size vectors."""
    if per_input is not None:
        if shard_size % per_input:
            raise ValueError(f"shard_size={shard_size} is not a multiple of the {per_input} vectors each input gives: "
                             f"a shard holds whole inputs (e.g. shard_size={max(1, shard_size // per_input) * per_input})")
        step = shard_size // per_input
        starts = list(range(0, n_inputs, step)) + [n_inputs]
        return Plan(starts, [(b - a) * per_input for a, b in zip(starts, starts[1:])])
    longest = int(lengths.max())
    if longest > shard_size:
        raise ValueError(f"shard_size={shard_size} is smaller than text {int(lengths.argmax())}'s {longest} positions: "
                         "a shard holds whole texts")
    starts, counts, filled = [0], [], 0
    for i, n in enumerate(lengths.tolist()):
        if filled + n > shard_size:
            starts.append(i)
            counts.append(filled)
            filled = 0
        filled += n
    return Plan(starts + [n_inputs], counts + [filled])


def _positions(tower: Any, inputs: Inputs, tokens: Tensor, start: int, positions: Union[str, int],
               seed: int) -> list[np.ndarray]:
    """The positions read from each input of a batch (its first input is input `start`)."""
    if positions == "pooled":
        return [np.array([p]) for p in tower.pooled_positions(tokens).cpu().tolist()]
    lengths = tower.sequence_lengths(tokens).cpu().tolist()
    if positions == "all":
        return [np.arange(n) for n in lengths]
    chosen = []
    for offset, n in enumerate(lengths):
        if n < positions:
            raise ValueError(f"{inputs.describe(start + offset)} has {n} positions (up to EOT), fewer than the "
                             f"{positions} sampled per input")
        rng = np.random.default_rng([seed, start + offset])  # one stream per input: any shard range draws the same
        chosen.append(np.sort(rng.choice(n, positions, replace=False)))
    return chosen


@torch.no_grad()
def _batch_vectors(tower: Any, local_hook: str, batch: Tensor, chosen: list[np.ndarray]) -> Tensor:
    """The hook's activations at the chosen positions of each input, concatenated [n, d] (float32, CPU)."""
    _, cache = tower.run_with_cache(batch, names_filter=[local_hook])
    acts = cache[local_hook].float().cpu()
    if acts.ndim == 2:  # no position axis (pooled hooks): one vector per input
        return acts
    return torch.cat([acts[i, torch.as_tensor(p)] for i, p in enumerate(chosen)])


# --- writing -------------------------------------------------------------------------------------
class _HashingWriter:
    """A file handle that hashes what is written through it."""

    def __init__(self, handle):
        self.handle, self.hash = handle, hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.handle.write(data)


def _write_array(path: Path, array: np.ndarray) -> str:
    """`array` as .npy at `path` (temporary name, fsync, rename); returns the file's SHA-256."""
    digest = {}

    def write(handle) -> None:
        hashing = _HashingWriter(handle)
        np.lib.format.write_array(hashing, np.ascontiguousarray(array), allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
        digest["sha256"] = hashing.hash.hexdigest()

    write_atomically(path, write, binary=True)
    return digest["sha256"]


def shard_files(index: int) -> tuple[str, str]:
    return f"shard_{index:05d}.npy", f"shard_{index:05d}.origins.npy"


def shard_problem(folder: Path, record: dict) -> Optional[str]:
    """Why a recorded shard cannot be used (missing, or its bytes not those recorded), or None."""
    for name, key in ((record["file"], "sha256"), (record["origins"], "origins_sha256")):
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if file_digest(path) != record[key]:
            return f"{path} does not match its SHA-256 in {folder / MANIFEST} (damaged or changed)"
    return None


@contextmanager
def manifest_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's manifest lock (blocking: other writers of the store wait their turn).
    A flock is dropped by the kernel when its process dies, so a killed writer never leaves it held."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def read_manifest(folder: Path) -> Optional[dict]:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"{path} is not an activation store manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path} is not an activation store manifest (no format {FORMAT!r})")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    def write(handle) -> None:
        handle.write(json.dumps(manifest, indent=1, sort_keys=True))
        handle.flush()
        os.fsync(handle.fileno())

    write_atomically(folder / MANIFEST, write)


def _differences(found: dict, wanted: dict) -> list[str]:
    return [f"{key}: the store has {found.get(key)!r}, this fill {wanted[key]!r}"
            for key in CONFIG_KEYS if found.get(key) != wanted[key]]


def open_for_writing(folder: Path, config: dict) -> dict:
    """The folder's manifest, created for `config` when there is none; a store of another
    configuration is refused, naming what differs."""
    with manifest_lock(folder):
        manifest = read_manifest(folder)
        if manifest is None:
            manifest = {**config, "shards": {}, "shards_written": 0, "complete": False}
            write_manifest(folder, manifest)
        differences = _differences(manifest, config)
        if differences:
            raise StoreError(f"{folder} holds an activation store of another configuration ("
                             + "; ".join(differences) + "): use another folder, or delete this one")
    return manifest


def record_shard(folder: Path, index: int, record: dict) -> dict:
    """Add one written shard to the manifest (read again under the lock: other writers' shards stay)."""
    with manifest_lock(folder):
        manifest = read_manifest(folder)
        manifest["shards"][str(index)] = record
        manifest["shards_written"] = len(manifest["shards"])
        manifest["complete"] = manifest["shards_written"] == manifest["n_shards"]
        write_manifest(folder, manifest)
    return manifest


def write_shard(folder: Path, index: int, vectors: np.ndarray, origins: np.ndarray, inputs: tuple[int, int]) -> dict:
    """Write shard `index` (its vectors and origins) and record it in the manifest."""
    name, origins_name = shard_files(index)
    record = {"file": name, "origins": origins_name, "vectors": int(len(vectors)), "inputs": list(inputs),
              "sha256": _write_array(folder / name, vectors),
              "origins_sha256": _write_array(folder / origins_name, origins.astype(np.int64))}
    return record_shard(folder, index, record)


def remove_stale_temporaries(folder: Path, indices: Iterable[int]) -> None:
    """Temporary files a killed writer of these shards left behind."""
    for index in indices:
        for name in shard_files(index):
            for tmp in folder.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)


# --- fill_store ----------------------------------------------------------------------------------
@dataclass
class FillResult:
    folder: Path
    written: list = field(default_factory=list)    # shards computed by this call
    kept: list = field(default_factory=list)       # shards already there, checked, not recomputed
    complete: bool = False                         # every shard of the store is written


def model_identity(model: Any, tower: Any) -> dict:
    """The model's name and the SHA-256 of the tower's weights (a store is one model's)."""
    h = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {"name": getattr(model, "name", None), "tower_sha256": h.hexdigest()}


def _probe(tower: Any, local_hook: str, model: Any, inputs: Inputs) -> tuple[int, bool]:
    """(width d, whether the hook has a position axis), from one input's forward."""
    with torch.no_grad():
        _, cache = tower.run_with_cache(inputs.tensor(model, 0, 1), names_filter=[local_hook])
    shape = tuple(cache[local_hook].shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"hook {local_hook!r} gives activations of shape [batch, {', '.join(map(str, shape[1:]))}]; a "
                         "store holds vectors: a hook of shape [batch, pos, d] or [batch, d]")
    return shape[-1], len(shape) == 3


def _config(model: Any, inputs: Inputs, hook: str, positions, seed: int, dtype: str, shard_size: Optional[int]):
    """(the store's configuration, its plan, the tower and its own hook name)."""
    tower, local = check_hook(model, hook, inputs.modality)
    d, has_positions = _probe(tower, local, model, inputs)
    per_input = vectors_per_input(tower, positions, has_positions)
    if shard_size is None:
        shard_size = DEFAULT_SHARD_VECTORS - DEFAULT_SHARD_VECTORS % (per_input or 1)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive number of vectors, not {shard_size!r}")
    lengths = text_lengths(model, inputs) if per_input is None else None
    plan = make_plan(len(inputs), per_input, shard_size, lengths)
    config = {"format": FORMAT, "version": VERSION, "hook": hook, "positions": positions, "seed": seed, "dtype": dtype,
              "d": d, "shard_size": shard_size, "vectors_per_input": per_input, "n_inputs": len(inputs),
              "n_shards": len(plan), "n_vectors": int(sum(plan.counts)), "model": model_identity(model, tower),
              "source": inputs.source, "source_path": inputs.path}
    return config, plan, tower, local


def _compute_shard(model: Any, tower: Any, local: str, inputs: Inputs, span: tuple[int, int], positions, seed: int,
                   batch_size: int) -> tuple[Tensor, np.ndarray]:
    """One shard's vectors [n, d] and origins [n, 2] (input index, position), batch by batch."""
    vectors, origins = [], []
    for start in range(span[0], span[1], batch_size):
        batch = inputs.tensor(model, start, min(start + batch_size, span[1]))
        chosen = _positions(tower, inputs, batch, start, positions, seed)
        vectors.append(_batch_vectors(tower, local, batch, chosen))
        origins += [np.stack([np.full(len(p), start + i), p], 1) for i, p in enumerate(chosen)]
    return torch.cat(vectors), np.concatenate(origins)


def _already_written(folder: Path, manifest: dict, index: int) -> bool:
    """Whether shard `index` is recorded and its files match their checksums (a damaged one is redone)."""
    record = manifest["shards"].get(str(index))
    if record is None:
        return False
    problem = shard_problem(folder, record)
    if problem:
        warnings.warn(f"shard {index} is recomputed: {problem}", stacklevel=3)
    return problem is None


def count_shards(model: Any, inputs: Any, hook: str, *, positions: Union[str, int] = "pooled",
                 shard_size: Optional[int] = None, seed: int = 0, dtype: str = "float32") -> int:
    """How many shards `fill_store` with these arguments writes (one probe forward pass): what a
    driver needs to hand workers their `shards=` ranges."""
    _, plan, _, _ = _config(model, resolve_inputs(inputs), hook, parse_positions(positions), seed, dtype, shard_size)
    return len(plan)


def fill_store(model: Any, inputs: Any, hook: str, folder: Union[str, Path], *,
               positions: Union[str, int] = "pooled", shard_size: Optional[int] = None, batch_size: int = 64,
               seed: int = 0, dtype: str = "float32", progress: bool = True,
               shards: Optional[Iterable[int]] = None) -> FillResult:
    """Stream `inputs` through `model` and store `hook`'s activations in `folder` as shards.

    Args:
        model: a HookedCLIP.
        inputs: an image folder (every image file, sorted), a text file (one sentence per line), a
            list of texts, a pixel tensor [n, 3, H, W] or a token tensor [n, pos].
        hook: a HookedCLIP hook name with its tower prefix, e.g. "vision.blocks.2.hook_resid_post".
        positions: "pooled" (the position the tower pools: class token, EOT), "all" (every real
            position; texts up to EOT) or a number of positions sampled per input (seeded by `seed`
            and the input's index; sorted).
        shard_size: vectors per shard, a multiple of the vectors each input gives (default: about
            65536, rounded down to such a multiple).
        dtype: "float32" or "float16" on disk (read back as float32).
        shards: the shard indices this call fills (default all), for several processes filling
            one store; a shard already written and intact is kept, not recomputed.

    Returns the shards written and kept, and whether the store is now complete.
    """
    folder, positions = Path(folder), parse_positions(positions)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    resolved = resolve_inputs(inputs)
    config, plan, tower, local = _config(model, resolved, hook, positions, seed, dtype, shard_size)
    todo = list(range(len(plan)) if shards is None else shards)
    outside = [i for i in todo if not 0 <= i < len(plan)]
    if outside:
        raise ValueError(f"shard {outside[0]} is outside this store's {len(plan)} shards (0..{len(plan) - 1})")
    manifest = open_for_writing(folder, config)
    remove_stale_temporaries(folder, todo)
    result = FillResult(folder)
    from tqdm.auto import tqdm

    for index in tqdm(todo, desc=f"filling {folder.name}", disable=not progress):
        if _already_written(folder, manifest, index):
            result.kept.append(index)
            continue
        span = (plan.starts[index], plan.starts[index + 1])
        vectors, origins = _compute_shard(model, tower, local, resolved, span, positions, seed, batch_size)
        manifest = write_shard(folder, index, vectors.numpy().astype(dtype), origins, span)
        result.written.append(index)
    result.complete = bool(manifest["complete"])
    return result


def write_vectors(chunks: Iterable[Union[Tensor, np.ndarray]], folder: Union[str, Path], *, shard_size: int,
                  dtype: str = "float32", source: str = "vectors given") -> FillResult:
    """Store vectors computed elsewhere (chunks [n_i, d], in order) as shards in an empty folder:
    memory holds one shard. Each vector's origin is (its index, 0)."""
    folder = Path(folder)
    if read_manifest(folder) is not None:
        raise StoreError(f"{folder} already holds an activation store: write_vectors starts a new one")
    folder.mkdir(parents=True, exist_ok=True)
    result, buffer, filled, total, d = FillResult(folder), None, 0, 0, None
    for chunk in chunks:
        chunk = np.asarray(chunk.detach().cpu() if isinstance(chunk, Tensor) else chunk)
        if buffer is None:
            d = chunk.shape[1]
            buffer = np.empty((shard_size, d), dtype=dtype)
            _start_manifest(folder, d, shard_size, dtype, source)
        while len(chunk):
            take = min(shard_size - filled, len(chunk))
            buffer[filled:filled + take], chunk, filled = chunk[:take], chunk[take:], filled + take
            if filled == shard_size:
                total = _flush(folder, result, buffer, filled, total)
                filled = 0
    if filled:
        total = _flush(folder, result, buffer, filled, total)
    _finish_manifest(folder, total, len(result.written))
    result.complete = True
    return result


def _start_manifest(folder: Path, d: int, shard_size: int, dtype: str, source: str) -> None:
    write_manifest(folder, {"format": FORMAT, "version": VERSION, "hook": None, "positions": "given", "seed": None,
                            "dtype": dtype, "d": d, "shard_size": shard_size, "vectors_per_input": 1,
                            "n_inputs": None, "n_shards": None, "n_vectors": None, "model": None,
                            "source": {"kind": source}, "source_path": None, "shards": {}, "shards_written": 0,
                            "complete": False})


def _flush(folder: Path, result: FillResult, buffer: np.ndarray, filled: int, total: int) -> int:
    index = len(result.written)
    origins = np.stack([np.arange(total, total + filled), np.zeros(filled, dtype=np.int64)], 1)
    write_shard(folder, index, buffer[:filled], origins, (total, total + filled))
    result.written.append(index)
    return total + filled


def _finish_manifest(folder: Path, total: int, n_shards: int) -> None:
    with manifest_lock(folder):
        manifest = read_manifest(folder)
        manifest.update(n_inputs=total, n_vectors=total, n_shards=n_shards, complete=True)
        write_manifest(folder, manifest)


# --- reading -------------------------------------------------------------------------------------
def _npy_header(handle) -> tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(handle)
    if fortran:
        raise StoreError(f"{handle.name} is stored in Fortran order; shards are C order")
    return shape, dtype


class ActivationStore:
    """A complete store written by `fill_store` or `write_vectors`, read as float32 torch tensors.

    Opening checks the manifest and every shard's header (shape, dtype) against it; `verify=True`
    also checks every shard's SHA-256 (reads the whole store once).
    """

    def __init__(self, folder: Union[str, Path], *, verify: bool = False):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise FileNotFoundError(f"no activation store in {self.folder} (no {MANIFEST})")
        if not manifest["complete"]:
            raise StoreError(f"{self.folder} holds an incomplete store ({manifest['shards_written']} of "
                             f"{manifest['n_shards']} shards written): run the fill again to finish it")
        self.manifest, self.d = manifest, int(manifest["d"])
        self.records = [manifest["shards"][str(i)] for i in range(manifest["n_shards"])]
        self.counts = np.array([r["vectors"] for r in self.records], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self._maps: dict[int, np.ndarray] = {}
        for index, record in enumerate(self.records):
            self._check_header(index, record)
            problem = shard_problem(self.folder, record) if verify else None
            if problem:
                raise StoreError(f"shard {index}: {problem}")

    def _check_header(self, index: int, record: dict) -> None:
        path = self.folder / record["file"]
        if not path.is_file():
            raise StoreError(f"shard {index}: {path} is missing")
        with open(path, "rb") as handle:
            try:
                shape, dtype = _npy_header(handle)
            except ValueError as error:
                raise StoreError(f"shard {index}: {path} is not a .npy file ({error})") from None
            data_start = handle.tell()
        expected = (record["vectors"], self.d)
        if shape != expected or dtype != np.dtype(self.manifest["dtype"]):
            raise StoreError(f"shard {index}: {path} holds {dtype} {list(shape)}, the manifest says "
                             f"{self.manifest['dtype']} {list(expected)}")
        if path.stat().st_size != data_start + dtype.itemsize * shape[0] * shape[1]:
            raise StoreError(f"shard {index}: {path} is truncated or has extra bytes")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.folder)!r}: {len(self)} vectors of width {self.d}, "
                f"{len(self.records)} shards, hook {self.manifest['hook']!r}, positions {self.manifest['positions']!r})")

    def read_shard(self, index: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Shard `index`'s vectors [n, d], read sequentially: into `out[:n]` (float32) when given,
        else into a new array of the store's dtype."""
        path = self.folder / self.records[index]["file"]
        with open(path, "rb") as handle:
            shape, dtype = _npy_header(handle)
            if out is not None and dtype == out.dtype:
                target = out[:shape[0]]
            else:
                target = np.empty(shape, dtype=dtype)
            handle.readinto(memoryview(target).cast("B"))
        if out is not None and target.dtype != out.dtype:
            out[:shape[0]] = target
            return out[:shape[0]]
        return target

    def origins(self, index: int) -> np.ndarray:
        """Shard `index`'s (input index, position) per vector, [n, 2]."""
        return np.load(self.folder / self.records[index]["origins"], allow_pickle=False)

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, buffer_shards: int = 4,
                drop_last: bool = False) -> Iterator[Tensor]:
        """float32 [batch_size, d] batches covering every vector exactly once (the last batch may be
        shorter unless `drop_last`). Shuffled: shards in a seeded random order, each read
        sequentially, vectors shuffled within a buffer of `buffer_shards` shards (memory: that
        buffer plus one batch). Unshuffled: the store's order."""
        if batch_size < 1 or buffer_shards < 1:
            raise ValueError(f"batch_size and buffer_shards must be positive, not {batch_size}, {buffer_shards}")
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.records), generator=gen).tolist() if shuffle else range(len(self.records))
        order = list(order)
        capacity = int(self.counts.max()) * buffer_shards + batch_size
        buffer, held = np.empty((capacity, self.d), dtype=np.float32), 0
        for group_start in range(0, len(order), buffer_shards):
            for index in order[group_start:group_start + buffer_shards]:
                held += len(self.read_shard(index, buffer[held:]))
            pool = torch.from_numpy(buffer[:held])
            perm = torch.randperm(held, generator=gen) if shuffle else torch.arange(held)
            usable = held - held % batch_size
            for start in range(0, usable, batch_size):
                yield pool[perm[start:start + batch_size]] if shuffle else pool[start:start + batch_size].clone()
            rest = pool[perm[usable:]].clone()  # carried into the next buffer (each vector once)
            buffer[:len(rest)], held = rest.numpy(), len(rest)
        if held and not drop_last:
            yield torch.from_numpy(buffer[:held].copy())

    def _map(self, index: int) -> np.ndarray:
        if index not in self._maps:
            self._maps[index] = np.load(self.folder / self.records[index]["file"], mmap_mode="r", allow_pickle=False)
        return self._maps[index]

    def vectors(self, indices: Union[Sequence[int], np.ndarray, Tensor]) -> Tensor:
        """The vectors at these global indices, float32 [len(indices), d] (random access through
        memory maps: each index is a separate read; `batches` is the fast path for training)."""
        indices = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index {int(indices.max() if indices.max() >= len(self) else indices.min())} is outside "
                             f"the store's {len(self)} vectors")
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((len(indices), self.d), dtype=np.float32)
        for index in np.unique(shard):
            rows = np.nonzero(shard == index)[0]
            out[rows] = self._map(int(index))[indices[rows] - self.offsets[index]]
        return torch.from_numpy(out)

    def close(self) -> None:
        """Drop the memory maps `vectors` opened."""
        self._maps.clear()
