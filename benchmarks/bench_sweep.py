"""Sweep overhead: the same 12-task sweep in this process and on a local Ray instance with 2
single-threaded workers, timed in one run.

    python benchmarks/bench_sweep.py [--scenes 48] [--keep DIR]

12 tasks = 3 models (the tiny CLIP, random ViT-B-32 and ViT-B-32-quickgelu) x 2 datasets
(synthetic scenes in the existence layout, and a pairs file of noise images) x 2 studies (causal
tracing, selective heads). Prints wall seconds, the ratio, Ray's start-up, and the time spent in
model loading and in the tasks themselves, so that the gap can be read.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SPEC = """
out = "{out}"
[resources]
cpus = {cpus}
[[models]]
name = "tiny"
architecture = "clip_lens/tiny-shapes"
[[models]]
name = "b32"
architecture = "ViT-B-32"
[[models]]
name = "b32-quickgelu"
architecture = "ViT-B-32-quickgelu"
[[datasets]]
name = "scenes"
kind = "shapes"
scenes = {scenes}
[[datasets]]
name = "noise-pairs"
kind = "pairs"
file = "{pairs}"
images = "{images}"
[[studies]]
name = "causal-tracing"
[[studies]]
name = "selective-heads"
"""


def pairs_file(folder: Path, n: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    colours, things = ["red", "blue", "green", "yellow"], ["car", "dog", "cup", "hat"]
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        c, t = colours[i % 4], things[(i // 4) % 4]
        rows.append({"caption": f"There is a {c} {t}.", "foil": f"There is a {colours[(i + 1) % 4]} {t}.", "image": f"{i}.png"})
    pd.DataFrame(rows).to_csv(folder / "pairs.csv", index=False)
    return folder / "pairs.csv", folder / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=48, help="scenes and pairs per dataset")
    parser.add_argument("--keep", type=Path, default=None, help="keep the sweeps' outputs here")
    args = parser.parse_args()
    import ray

    from clip_lens import sweep

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    pairs, images = pairs_file(work / "data", args.scenes)
    times = {}
    for name, executor, cpus in (("in-process, 2 threads", "local", 2), ("in-process, 1 thread", "local", 1),
                                 ("ray, 2 workers x 1 thread", "ray", 1)):
        out = work / name.split(",")[0].replace(" ", "-") / str(cpus)
        spec_path = work / f"{executor}-{cpus}.toml"
        spec_path.write_text(SPEC.format(out=out, cpus=cpus, scenes=args.scenes, pairs=pairs, images=images))
        start = time.perf_counter()
        ray_start = 0.0
        if executor == "ray":
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            ray_start = time.perf_counter() - start
        result = sweep.run(spec_path, executor, report=False, progress=False)
        if executor == "ray":
            ray.shutdown()
        wall = time.perf_counter() - start
        manifest = result.manifest
        assert result.ok and result.ran == 12, result.summary()
        times[name] = wall
        print(f"{name}: {wall:.1f} s wall (Ray start-up {ray_start:.1f} s); tasks {manifest['seconds'].sum():.1f} s "
              f"summed; model loads {int(manifest.groupby('worker')['model_loads'].max().sum())}")
    base = times["in-process, 2 threads"]
    for name, wall in times.items():
        print(f"  {name}: {wall / base:.2f}x the in-process run with 2 threads")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
