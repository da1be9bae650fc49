"""Image ablation in the vision encoder (docs/methods.md#image-ablation).

The output of the attention block (MHA) or the MLP of one layer, at every position, is replaced by
its value on the mean-colour version of the image (`run`), or on another baseline image per
instance such as the subject-removed image (`run_with_baseline`,
docs/methods.md#subject-removed-baseline); d* is the caption-foil difference of that run and
IAE = d - d*: how much of d the component's image-specific output carries (positive: the ablation
made the instance worse). All ablations run through `clip_lens.patch`, each resuming from
the cached residual of its (half-)layer. `run_and_score` scores instances against the image
embeddings of the ablation's own target runs, so that a study encodes each image once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from clip_lens import plot
from clip_lens.checkpoints import Checkpoints, concatenate
from clip_lens.hooks import act_name
from clip_lens.images import ImageLike, mean_colour_pixels
from clip_lens.model import HookedCLIP
from clip_lens.patching import patch
from clip_lens.scores import difference_metric, encode_images
from clip_lens.studies.analyses import existence
from clip_lens.studies.analyses.existence import ExistenceInstances, ExistencePairs

COMPONENTS = {"MHA": "attn_out", "MLP": "mlp_out"}


@dataclass
class ImageAblation:
    """Result of `run`.

    Attributes:
        instances: one row per instance (id, negation_in, caption, foil, d, segment, ...).
        d_star: [instances, 2, layers], d with MHA (index 0) or MLP (index 1) of a layer ablated.
        layers: the block indices along the last axis (0-based).
    """

    instances: pd.DataFrame
    d_star: Float[np.ndarray, "n 2 layer"]
    layers: list

    @property
    def iae(self) -> Float[np.ndarray, "n 2 layer"]:
        """IAE = d - d*."""
        return self.instances["d"].to_numpy()[:, None, None] - self.d_star

    def table(self) -> pd.DataFrame:
        """Long format: one row per instance x component x layer, with d, d_star, iae, `change`
        (worse: d* < d, better: d* > d, unchanged) and `ends` (correct: d* > 0, else incorrect)."""
        n, c, l = self.d_star.shape
        index = pd.MultiIndex.from_product([range(n), list(COMPONENTS), self.layers], names=["instance", "component", "layer"])
        frame = pd.DataFrame({"d_star": self.d_star.reshape(-1), "iae": self.iae.reshape(-1)}, index=index).reset_index()
        info = self.instances[["id", "negation_in", "segment", "d"]].reset_index(drop=True)
        frame = frame.join(info, on="instance")
        frame["change"] = np.where(frame["iae"] > 0, "worse", np.where(frame["iae"] < 0, "better", "unchanged"))
        frame["ends"] = np.where(frame["d_star"] > 0, "correct", "incorrect")
        return frame

    def segment_means(self) -> pd.DataFrame:
        """Mean IAE per negation placement x segment x component x layer (and instances)."""
        return (self.table().groupby(["negation_in", "segment", "component", "layer"], sort=False)["iae"]
                .agg(iae="mean", instances="size").reset_index())

    def outcome_counts(self) -> pd.DataFrame:
        """Instances per component x layer x change x ends (the stacked bars)."""
        return self.table().groupby(["component", "layer", "change", "ends"]).size().rename("instances").reset_index()

    def mha_vs_mlp(self) -> pd.DataFrame:
        """Mean IAE of MHA and MLP per layer, their difference, and the average over layers (last row)."""
        mean = self.iae.mean(axis=0)  # [2, layers]
        frame = pd.DataFrame({"layer": [str(l) for l in self.layers], "MHA": mean[0], "MLP": mean[1]})
        frame.loc[len(frame)] = ["average", mean[0].mean(), mean[1].mean()]
        frame["MHA - MLP"] = frame["MHA"] - frame["MLP"]
        return frame

    def figures(self) -> dict[str, go.Figure]:
        return figures(self.segment_means(), self.outcome_counts(), self.mha_vs_mlp())


def figures(segment_means: pd.DataFrame, outcomes: pd.DataFrame, mha_vs_mlp: pd.DataFrame) -> dict[str, go.Figure]:
    """The study's figures from the tables `ImageAblation.segment_means()`, `.outcome_counts()` and
    `.mha_vs_mlp()` (as the study writes them)."""
    return {"iae_by_layer": plot.iae_by_layer(segment_means, "Image ablation effect per layer (IAE = d - d*)"),
            "ablation_outcomes": plot.outcome_bars(outcomes, "Instances after ablating one component"),
            "mha_vs_mlp": plot.mha_vs_mlp(mha_vs_mlp, "MHA against MLP: mean IAE")}


ENGINE = {"batch_size": 64, "pair_chunk": 32}  # the patching engine's defaults here (docs/patching.md, "Memory")


def run(model: HookedCLIP, instances: ExistenceInstances, *, pixels: Optional[Tensor] = None, grey: bool = False,
        layers="all", checkpoints: Optional[Checkpoints] = None, progress: bool = True, **engine: int) -> ImageAblation:
    """IAE of MHA and MLP in every layer for every instance, against each image's mean-colour image,
    `pair_chunk` instances at a time (each chunk saved to `checkpoints` as it finishes, and read from
    there by a resumed run). `run_with_baseline` takes other baseline images.

    Args:
        pixels: [n, 3, H, W] model inputs row-aligned with the instances (default: read from the
            instances' image paths, a chunk at a time).
        grey: a grey mean colour (channels averaged) instead of the per-channel mean colour.
        layers: "all" or a list of block indices.
        engine: `batch_size` (ablations per forward pass, default 64) and `pair_chunk` (instances
            whose runs are cached at a time, and saved to `checkpoints` as one chunk; default 32).
    """
    ablated = _ablate(model, instances, mean_colour_source(model, grey), pixels, checkpoints, progress, engine,
                      _single_layers(model, layers))
    return ImageAblation(instances.instances_table(), *ablated.d_star_and_layers(instances))


def run_and_score(model: HookedCLIP, pairs: ExistencePairs, *, grey: bool = False, layers="all",
                  checkpoints: Optional[Checkpoints] = None, progress: bool = True,
                  **engine: int) -> tuple[ExistenceInstances, ImageAblation]:
    """`run` on pairs whose images are not encoded yet (`existence.select`): the instances are
    scored against the image embeddings of the ablation's own target runs, so each image is encoded
    once (`existence.prepare` and then `run` would encode it twice). Arguments as in `run`.

    Returns (the scored instances, as `existence.score` gives them; their image ablation)."""
    if pairs.images is not None and pairs.images.ndim != 4:
        raise ValueError("image ablation needs the images: pairs were given image embeddings "
                         f"{tuple(pairs.images.shape)}, not pixels [n, 3, H, W] or an image folder")
    ablated = _ablate(model, pairs, mean_colour_source(model, grey), pairs.images, checkpoints, progress, engine,
                      _single_layers(model, layers))
    instances = existence.score(model, pairs, ablated.image_emb)
    return instances, ImageAblation(instances.instances_table(), *ablated.d_star_and_layers(instances))


def mean_colour_source(model: HookedCLIP, grey: bool) -> "Source":
    """The ablation source of `run`: each image's mean-colour image (checkpoints "image_ablation")."""
    mean, std = model.preprocess_cfg["mean"], model.preprocess_cfg["std"]
    return Source("image_ablation", lambda lo, hi, target: mean_colour_pixels(target, mean, std, grey=grey))


def baseline_source(model: HookedCLIP, instances: ExistenceInstances, baseline: Union[Tensor, Sequence[ImageLike]],
                    name: str) -> Source:
    """The ablation source of given baseline images, one per instance (pixels [n, 3, H, W], or
    images preprocessed by the model a chunk at a time); checkpoints kept under `name`. An instance
    whose baseline equals its own pixels gets d* = d."""
    if len(baseline) != len(instances.frame):
        raise ValueError(f"baseline has {len(baseline)} images for {len(instances.frame)} instances; give one per instance")

    def baseline_pixels(lo: int, hi: int, target: Tensor) -> Tensor:
        chunk = baseline[lo:hi] if isinstance(baseline, Tensor) else model.to_pixels(list(baseline[lo:hi]))
        if chunk.shape != target.shape:
            raise ValueError(f"baseline images {lo}..{hi - 1} have shape {tuple(chunk.shape)}; the instances' "
                             f"pixels have {tuple(target.shape)}")
        return chunk.to(device=target.device, dtype=target.dtype)

    return Source(name, baseline_pixels, identical_unchanged=True)


def run_with_baseline(model: HookedCLIP, instances: ExistenceInstances, baseline: Union[Tensor, Sequence[ImageLike]], *,
                      pixels: Optional[Tensor] = None, layers="all", checkpoints: Optional[Checkpoints] = None,
                      progress: bool = True, **engine: int) -> ImageAblation:
    """`run` against given baseline images instead of the mean-colour ones: one per instance, e.g.
    the subject-removed images of `clip_lens.baselines` (docs/methods.md#subject-removed-baseline).

    Args:
        baseline: [n, 3, H, W] model inputs, or n images (paths, PIL images), row-aligned with the
            instances; images are preprocessed by the model a chunk at a time.
        pixels, layers, checkpoints, progress, engine: as in `run`. Checkpoints are kept apart from
            `run`'s (study "image_ablation_baseline").

    An instance whose baseline equals its own pixels exactly (a subject-removed image of a scene
    without the subject) gets d* = d: IAE exactly 0, outcome "unchanged".
    """
    source = baseline_source(model, instances, baseline, "image_ablation_baseline")
    ablated = _ablate(model, instances, source, pixels, checkpoints, progress, engine, _single_layers(model, layers))
    return ImageAblation(instances.instances_table(), *ablated.d_star_and_layers(instances))


class Source(NamedTuple):
    """Where a run's baseline images come from: `pixels(lo, hi, target)` -> the baseline model
    inputs of instances lo..hi - 1 (target: their own pixels); `study` names its checkpoints. With
    `identical_unchanged`, an instance whose baseline equals its own pixels exactly gets d* = d
    (each activation replaced by itself), not d up to the float noise of a second forward pass."""

    study: str
    pixels: Callable[[int, int, Tensor], Tensor]
    identical_unchanged: bool = False


# (target pixels, baseline pixels, caption - foil direction, batch_size, pair_chunk) of one chunk of
# instances -> (d* [instances, 2, layers or windows], the layers or windows' first blocks, the
# target runs' image embeddings [instances, d_embed])
ChunkAblation = Callable[[Tensor, Tensor, Tensor, int, int], tuple[np.ndarray, list, Tensor]]


class Ablated(NamedTuple):
    """What `_ablate` returns.

    Attributes:
        d_star: [n, 2, layers or windows], d of each ablated run.
        layers: the blocks (or the windows' first blocks) along the last axis.
        image_emb: [n, d_embed], the image embeddings of the target runs (the images themselves).
        same: [n], True where the baseline image equals the image exactly (`Source.identical_unchanged`).
    """

    d_star: np.ndarray
    layers: list
    image_emb: Tensor
    same: np.ndarray

    def d_star_and_layers(self, instances: ExistenceInstances) -> tuple[np.ndarray, list]:
        """(d* with d* = d where the baseline equals the image, so that IAE is exactly 0 there; layers)."""
        d_star = self.d_star.copy()
        d_star[self.same] = instances.frame["d"].to_numpy()[self.same, None, None]
        return d_star, self.layers


def _ablate(model: HookedCLIP, instances: Union[ExistenceInstances, ExistencePairs], source: Source,
            pixels: Optional[Tensor], checkpoints: Optional[Checkpoints], progress: bool, engine: dict,
            ablate: ChunkAblation) -> Ablated:
    """What every image ablation shares: the engine knobs checked, the instances `pair_chunk` at a
    time (each chunk saved to `checkpoints`), their baseline images from `source`, and d* and the
    image embeddings of each chunk from `ablate`."""
    unknown = set(engine) - set(ENGINE)
    if unknown:
        raise TypeError(f"image ablation got unexpected keyword arguments {sorted(unknown)}; engine knobs: "
                        f"{sorted(ENGINE)}")
    batch_size, pair_chunk = ({**ENGINE, **engine}[name] for name in ("batch_size", "pair_chunk"))
    frame = instances.frame
    if pixels is None and "image_path" not in frame:
        raise ValueError("give pixels, or instances prepared from an image folder")
    caption_emb, foil_emb = instances.text_embeddings(model)
    difference = F.normalize(caption_emb.float(), dim=-1) - F.normalize(foil_emb.float(), dim=-1)  # float32 always

    def target_pixels(lo: int, hi: int) -> Tensor:
        return pixels[lo:hi] if pixels is not None else model.to_pixels(list(frame["image_path"][lo:hi]))

    def chunk(lo: int, hi: int) -> dict:
        target = target_pixels(lo, hi)
        baseline = source.pixels(lo, hi, target)
        d_star, layers, image_emb = ablate(target, baseline, difference[lo:hi], batch_size, pair_chunk)
        same = ((baseline == target).flatten(1).all(dim=1).cpu().numpy() if source.identical_unchanged
                else np.zeros(hi - lo, dtype=bool))
        return {"d_star": d_star, "layers": np.asarray(layers), "image_emb": image_emb.float().cpu().numpy(),
                "same": same}

    chunks = (checkpoints or Checkpoints(None)).chunks(source.study, len(frame), pair_chunk, chunk, progress,
                                                        ids=list(frame["id"]))
    image_emb = torch.from_numpy(np.concatenate(_chunk_embeddings(model, chunks, target_pixels)))
    same = np.concatenate([c.get("same", np.zeros(len(c["d_star"]), dtype=bool)) for c in chunks])
    return Ablated(concatenate(chunks, "d_star"), chunks[0]["layers"].tolist(),
                   image_emb.to(device=model.device, dtype=model.dtype), same)


def _chunk_embeddings(model: HookedCLIP, chunks: list[dict], target_pixels: Callable[[int, int], Tensor]) -> list:
    """Each chunk's image embeddings [chunk, d_embed] (numpy): as saved, or, for a chunk saved
    before checkpoints kept them (its d* already holds d where a baseline equals its image),
    encoded now."""
    out, lo = [], 0
    for chunk in chunks:
        hi = lo + len(chunk["d_star"])
        if "image_emb" in chunk:
            out.append(chunk["image_emb"])
        else:
            out.append(encode_images(model, target_pixels(lo, hi), progress=False).float().cpu().numpy())
        lo = hi
    return out


def _single_layers(model: HookedCLIP, layers) -> ChunkAblation:
    """Each component of each of `layers` replaced alone: both components in one `patch` call, so
    the target and baseline runs are cached once for both."""
    def ablate(target: Tensor, baseline: Tensor, difference: Tensor, batch_size: int, pair_chunk: int):
        result = patch(model, target=target, source=baseline, hook=list(COMPONENTS.values()), layers=layers,
                       positions="sequence", metric="embedding", batch_size=batch_size, pair_chunk=pair_chunk,
                       progress=False)
        return d_of(model, result.effects, difference), list(result.layers), result.baseline
    return ablate


def d_of(model: HookedCLIP, image_emb: Float[Tensor, "n ... d_embed"],
         difference: Float[Tensor, "n d_embed"]) -> Float[np.ndarray, "n ..."]:
    """d of each instance's image embeddings (`scores.difference_metric`), against its caption - foil
    direction `difference` (normalised caption minus normalised foil)."""
    flat = image_emb.reshape(len(image_emb), -1, image_emb.shape[-1])      # [n, runs, d_embed]
    with torch.no_grad():
        d = difference_metric(model)(flat, difference[:, None].to(flat.device))  # [n, runs]
    return d.reshape(image_emb.shape[:-1]).cpu().numpy()


def improvement_rates(ablations: Mapping[str, ImageAblation]) -> pd.DataFrame:
    """How often ablating one component improves an instance, per baseline x negation placement x
    component: over every instance x layer, the share whose outcome (`ImageAblation.table()`) is
    `better` (d* > d), `worse` (d* < d) or `unchanged`, and the share that ablation `fixes`
    (d <= 0 < d*) or `breaks` (d* <= 0 < d). `cases` counts the instance x layer rows.

    Args:
        ablations: {baseline name: image-ablation result}, e.g. {"mean colour": ..., "subject removed": ...}.
    """
    rows = []
    for name, ablation in ablations.items():
        table = ablation.table()
        table["fixes"] = (table["d"] <= 0) & (table["d_star"] > 0)
        table["breaks"] = (table["d"] > 0) & (table["d_star"] <= 0)
        for change in ("better", "worse", "unchanged"):
            table[change] = table["change"] == change
        shares = (table.groupby(["negation_in", "component"], sort=False)
                  [["better", "worse", "unchanged", "fixes", "breaks"]].mean())
        shares.insert(0, "cases", table.groupby(["negation_in", "component"], sort=False).size())
        rows.append(shares.reset_index().assign(baseline=name))
    frame = pd.concat(rows, ignore_index=True)
    return frame[["baseline", "negation_in", "component", "cases", "better", "worse", "unchanged", "fixes", "breaks"]]


# --- image ablation over windows of consecutive layers (docs/methods.md#image-ablation-over-layer-windows) ---


def layer_windows(k, n_layers: int) -> list[tuple[int, ...]]:
    """The windows of `k` consecutive blocks of an `n_layers`-block tower, one per start
    l = 0..n_layers - k: (l, ..., l + k - 1)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k={k!r}: the window size must be an integer number of blocks (1..{n_layers})")
    if not 1 <= int(k) <= n_layers:
        raise ValueError(f"k={k}: the window size must be between 1 and the tower's {n_layers} blocks")
    return [tuple(range(start, start + int(k))) for start in range(n_layers - int(k) + 1)]


@dataclass
class WindowAblation(ImageAblation):
    """Result of `run_windows`: an `ImageAblation` whose last axis runs over windows of `k`
    consecutive blocks; `layers` holds each window's first block, and `table()` adds its last
    (`last_layer`) and the window size `k`. With k = 1 it is the single-block `ImageAblation`."""

    k: int = 1

    def table(self) -> pd.DataFrame:
        frame = super().table()
        frame.insert(frame.columns.get_loc("layer") + 1, "last_layer", frame["layer"] + self.k - 1)
        frame["k"] = self.k
        return frame


def run_windows(model: HookedCLIP, instances: ExistenceInstances, *, k: int, pixels: Optional[Tensor] = None,
                grey: bool = False, checkpoints: Optional[Checkpoints] = None, progress: bool = True,
                **engine: int) -> WindowAblation:
    """`run` with MHA (or MLP) of `k` consecutive blocks ablated together, for every window start
    l = 0..L - k, against each image's mean-colour image (docs/methods.md#image-ablation-over-layer-windows).

    Args:
        k: the window size, 1..L (k = 1 gives `run`'s d* up to float noise).
        pixels, grey, checkpoints, progress: as in `run` (checkpoints kept per k).
        engine: as in `run`; `batch_size` matters for k = 1 only (longer windows run a chunk of
            `pair_chunk` instances in one pass per window).
    """
    source = mean_colour_source(model, grey)._replace(study=f"image_ablation_windows_k{k}")
    return _ablate_windows(model, instances, source, k, pixels, checkpoints, progress, engine)


def run_windows_with_baseline(model: HookedCLIP, instances: ExistenceInstances, baseline: Union[Tensor, Sequence[ImageLike]],
                              *, k: int, pixels: Optional[Tensor] = None, checkpoints: Optional[Checkpoints] = None,
                              progress: bool = True, **engine: int) -> WindowAblation:
    """`run_windows` against given baseline images, one per instance, as `run_with_baseline` takes
    them; an instance whose baseline equals its own pixels gets d* = d (IAE exactly 0)."""
    source = baseline_source(model, instances, baseline, f"image_ablation_baseline_windows_k{k}")
    return _ablate_windows(model, instances, source, k, pixels, checkpoints, progress, engine)


def replace_with(cache: dict) -> Callable[[Tensor, Any], Tensor]:
    """Hook function: the activation at hook `hook.name` replaced, at every position, by `cache[hook.name]`
    (the same instances' run on their baseline images)."""
    def replace(activation: Tensor, hook) -> Tensor:
        value = cache[hook.name]
        if value.shape != activation.shape:
            raise ValueError(f"{hook.name}: baseline activation {tuple(value.shape)} does not match the "
                             f"target's {tuple(activation.shape)}")
        return value.to(activation.dtype)
    return replace


def _windows(model: HookedCLIP, windows: list) -> ChunkAblation:
    """MHA / MLP of each window's blocks replaced together. Windows of one block take the single-layer
    path (the same numbers as `run`); longer ones `_hooked_windows`."""
    if all(len(window) == 1 for window in windows):
        return _single_layers(model, [window[0] for window in windows])
    return _hooked_windows(model, windows)


def _hooked_windows(model: HookedCLIP, windows: list) -> ChunkAblation:
    """`patch`'s hook-function path: the baseline run's MHA / MLP outputs cached, and each window's
    blocks given them together in one run of the target resumed at the window's first block."""
    names = [act_name(hook, layer) for hook in COMPONENTS.values() for layer in range(model.vision.cfg.n_layers)]

    def ablate(target: Tensor, baseline: Tensor, difference: Tensor, batch_size: int, pair_chunk: int):
        with torch.no_grad():
            _, cache = model.vision.run_with_cache(baseline, names_filter=names)
        replace = replace_with({name: cache[name] for name in names})
        results = [patch(model, target=target, hook=hook, layers=windows, intervention=replace, metric="embedding",
                         pair_chunk=len(target), progress=False) for hook in COMPONENTS.values()]
        d_star = np.stack([d_of(model, result.effects, difference) for result in results], axis=1)
        return d_star, [window[0] for window in windows], results[0].baseline
    return ablate


def _ablate_windows(model: HookedCLIP, instances: ExistenceInstances, source: Source, k, pixels: Optional[Tensor],
                    checkpoints: Optional[Checkpoints], progress: bool, engine: dict) -> WindowAblation:
    """The engine of `run_windows` and `run_windows_with_baseline`."""
    windows = layer_windows(k, model.vision.cfg.n_layers)
    ablated = _ablate(model, instances, source, pixels, checkpoints, progress, engine, _windows(model, windows))
    return WindowAblation(instances.instances_table(), *ablated.d_star_and_layers(instances), k=int(k))
