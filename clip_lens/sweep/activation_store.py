"""One activation store filled by several Ray workers (`clip-lens cache-activations --ray`).

The driver counts the store's shards, gives each worker a contiguous range of them, and each worker
loads the model itself and runs `clip_lens.sae.store.fill_store(..., shards=range)`: a shard's inputs
follow from the store's configuration alone, and the manifest is updated under the store's lock,
so the workers' records merge into one store, equal to a fill in one process. Ray is started (and
its processes reaped) by the sweep's `ray_session`; a killed run resumes as any fill does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from tqdm.auto import tqdm

from clip_lens.sweep.executors import ray_capacity, ray_session

CPUS_PER_WORKER = 1  # and as many torch threads: a fill is many small forward passes


def fill_store_on_ray(source: Any, inputs: Any, hook: str, folder: Union[str, Path], *, workers: Optional[int] = None,
                      address: Optional[str] = None, progress: bool = True, **fill: Any):
    """Fill the store at `folder` on Ray workers (at most `workers`, default as many as the
    cluster's CPUs; each one CPU and one torch thread). `source` is the `clip_lens.model_sources.ModelSource` each worker loads; `fill` holds
    `fill_store`'s keywords (positions, shard_size, batch_size, seed, dtype). Returns the merged
    `FillResult`."""
    from clip_lens.model_sources import load_model
    from clip_lens.sae.store import FillResult, count_shards

    counted = {key: fill[key] for key in ("positions", "shard_size", "seed", "dtype") if key in fill}
    n_shards = count_shards(load_model(source, warn=False), inputs, hook, **counted)
    results = []
    with ray_session(address) as ray:
        n_workers = max(1, min(n_shards, workers or ray_capacity(ray, CPUS_PER_WORKER)))
        bounds = [round(i * n_shards / n_workers) for i in range(n_workers + 1)]
        task = ray.remote(num_cpus=CPUS_PER_WORKER)(_fill_shards)
        pending = [task.remote(source, inputs, hook, str(folder), list(range(lo, hi)), fill, CPUS_PER_WORKER)
                   for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
        with tqdm(total=n_shards, desc="cache activations (ray)", unit="shard", disable=not progress) as bar:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                result = ray.get(ready[0])
                results.append(result)
                bar.update(len(result.written) + len(result.kept))
    return FillResult(Path(folder), written=sorted(i for r in results for i in r.written),
                      kept=sorted(i for r in results for i in r.kept), complete=any(r.complete for r in results))


def _fill_shards(source: Any, inputs: Any, hook: str, folder: str, shards: list, fill: dict, threads: int):
    """One worker's part: its own model, its shard range."""
    import torch

    from clip_lens.model_sources import load_model
    from clip_lens.sae.store import fill_store

    torch.set_num_threads(threads)
    return fill_store(load_model(source, warn=False), inputs, hook, folder, shards=shards, progress=False, **fill)
