"""Training an SAE of any architecture on activations in memory or in an activation store
(docs/methods.md#sparse-autoencoders).

    sae, history = train_sae(acts, n_latents=4096, k=32, steps=5000, checkpoint_dir="runs/sae")
    sae, history = train_sae(store, 4096, architecture="jumprelu", l0_coefficient=1e-3, steps=50_000)
    stats = sae_statistics(sae, acts)      # explained variance, dead latents, mean active

`activations` is a tensor [n, d] or a store: any object with `d`, `__len__` and
`batches(batch_size, shuffle=True, seed=...)` yielding float32 tensors [batch, d]
(`clip_lens.sae.store`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.sae.architectures import ARCHITECTURES, SparseAutoencoder
from clip_lens.sae.jumprelu import jumprelu, step

WITH_K = ("topk", "batchtopk")
DEFAULTS = {  # each architecture's own training settings, and their defaults
    "topk": {"aux_k": None, "aux_coefficient": 1 / 32, "dead_after": 10_000_000},
    "batchtopk": {"aux_k": None, "aux_coefficient": 1 / 32, "dead_after": 10_000_000},
    "jumprelu": {"l0_coefficient": 1e-3, "bandwidth": 1e-3},
    "standard": {"l1_coefficient": 1e-2},
}
THRESHOLD_MOMENTUM = 0.01      # BatchTopK: weight of each batch's smallest kept activation in the threshold
INITIAL_THRESHOLD = 1e-3       # JumpReLU: every latent's threshold at the start (in data scale units)
STATISTICS_SAMPLE = 2 ** 18    # a store's mean and scale are read from at most this many vectors
STATISTICS_BATCH = 4096


@dataclass
class TrainHistory:
    steps: list = field(default_factory=list)
    loss: list = field(default_factory=list)        # normalised MSE per logged step
    l0: list = field(default_factory=list)          # mean active latents per input of the logged batch
    dead: list = field(default_factory=list)        # latents silent for dead_after inputs (0 where not tracked)


# the data ------------------------------------------------------------------------------------
def _is_store(activations: Any) -> bool:
    return all(hasattr(activations, name) for name in ("batches", "d", "__len__"))


def _check_activations(activations: Any) -> int:
    """The width d of a tensor [n, d] or a store; anything else refused by name."""
    if isinstance(activations, Tensor):
        if activations.ndim != 2 or len(activations) == 0:
            raise ValueError(f"activations must be a tensor [n, d] with n >= 1, got shape {list(activations.shape)}")
        return activations.shape[1]
    if not _is_store(activations):
        raise TypeError(f"activations must be a tensor [n, d] or a store with batches(), d and len(), "
                        f"not a {type(activations).__name__}")
    if len(activations) == 0:
        raise ValueError(f"the activation store {activations!r} is empty")
    return int(activations.d)


def _checked_batch(batch: Any, d: int, where: str) -> Tensor:
    if not isinstance(batch, Tensor) or batch.ndim != 2 or batch.shape[1] != d or len(batch) == 0:
        shape = list(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise ValueError(f"{where} yielded a batch of {shape}, not a tensor [batch, {d}]")
    return batch


def _chunks(activations: Any, limit: Optional[int] = None) -> Iterator[Tensor]:
    """The activations in order, STATISTICS_BATCH at a time, up to `limit` vectors (all of a tensor)."""
    if isinstance(activations, Tensor):
        yield from activations.detach().float().split(STATISTICS_BATCH)
        return
    seen = 0
    for batch in activations.batches(STATISTICS_BATCH, shuffle=False):
        yield _checked_batch(batch, int(activations.d), f"the activation store {activations!r}").float()
        seen += len(batch)
        if limit is not None and seen >= limit:
            return


def _mean_and_variance(activations: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """The data's mean [d] and mean squared distance to it (a scalar), in two sequential passes
    (a store's over its first STATISTICS_SAMPLE vectors)."""
    limit = None if isinstance(activations, Tensor) else STATISTICS_SAMPLE
    total, count = 0.0, 0
    for chunk in _chunks(activations, limit):
        total, count = total + chunk.to(device).sum(0), count + len(chunk)
    mean = total / count
    spread = sum(float((chunk.to(device) - mean).pow(2).sum()) for chunk in _chunks(activations, limit))
    return mean, torch.tensor(spread / count, device=device)


class _TensorBatches:
    """Minibatches drawn with replacement from a tensor; a seed fixes the order."""

    def __init__(self, activations: Tensor, batch_size: int, seed: int):
        self.activations, self.batch_size, self.drawn = activations.detach().float(), batch_size, 0
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: the same order on every device

    def __next__(self) -> Tensor:
        self.drawn += 1
        index = torch.randint(len(self.activations), (self.batch_size,), generator=self.generator, device="cpu")
        return self.activations[index.to(self.activations.device)]

    def position(self) -> dict:
        return {"drawn": self.drawn}

    def resume(self, position: dict) -> None:
        for _ in range(position["drawn"]):  # the same batch order as an uninterrupted run
            next(self)


class _StoreBatches:
    """The store's shuffled batches, epoch after epoch (epoch e shuffled with seed + e)."""

    def __init__(self, store: Any, batch_size: int, seed: int, device: torch.device):
        self.store, self.batch_size, self.seed, self.device = store, batch_size, seed, device
        self.epoch, self.index, self._batches = 0, 0, None

    def _open(self) -> None:
        self._batches = iter(self.store.batches(self.batch_size, shuffle=True, seed=self.seed + self.epoch))

    def __next__(self) -> Tensor:
        if self._batches is None:
            self._open()
        for _ in range(2):
            batch = next(self._batches, None)
            if batch is not None:
                self.index += 1
                return _checked_batch(batch, int(self.store.d), f"the activation store {self.store!r}").to(
                    self.device, torch.float32)
            self.epoch, self.index = self.epoch + 1, 0
            self._open()
        raise ValueError(f"the activation store {self.store!r} yielded no batches")

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def resume(self, position: dict) -> None:
        """Reopen the checkpoint's epoch and pass over the batches it had used (they are read again)."""
        self.epoch, self._batches = position["epoch"], None
        self._open()
        for _ in range(position["index"]):
            next(self._batches)
        self.index = position["index"]


# the settings --------------------------------------------------------------------------------
def _positive(name: str, value: Any, integer: bool = False, zero: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not (value >= 0 if zero else value > 0) \
            or (not integer and not math.isfinite(value)):
        what = "integer" if integer else "number"
        raise ValueError(f"{name}={value!r}: give a {'non-negative' if zero else 'positive'} {what}")


def _settings(architecture: str, k: Any, n_latents: int, d: int, given: dict) -> dict:
    """The architecture's training settings: those given, the rest defaulted; a setting of another
    architecture, or k where it has none (or none where it needs one), refused by name."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r} is not one of {sorted(ARCHITECTURES)}")
    if architecture in WITH_K and k is None:
        raise ValueError(f"architecture={architecture!r} needs k (active latents per input)")
    if architecture not in WITH_K and k is not None:
        raise ValueError(f"k={k!r} is for {' and '.join(WITH_K)}, not architecture={architecture!r}")
    own = DEFAULTS[architecture]
    foreign = [name for name, value in given.items() if value is not None and name not in own]
    if foreign:
        raise ValueError(f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not a setting of "
                         f"architecture={architecture!r} (its own: {', '.join(own)})")
    settings = {name: given[name] if given.get(name) is not None else default for name, default in own.items()}
    if "aux_k" in settings:
        settings["aux_k"] = settings["aux_k"] or min(max(1, d // 2), n_latents)
        _positive("aux_k", settings["aux_k"], integer=True)
        _positive("dead_after", settings["dead_after"], integer=True)
        _positive("aux_coefficient", settings["aux_coefficient"], zero=True)
    for name in ("l0_coefficient", "l1_coefficient"):
        if name in settings:
            _positive(name, settings[name], zero=True)
    if "bandwidth" in settings:
        _positive("bandwidth", settings["bandwidth"])
    return settings


def _new_sae(architecture: str, d: int, n_latents: int, k: Any, seed: int, hook: Optional[str],
             device: torch.device, mean: Tensor, scale: float) -> SparseAutoencoder:
    """A fresh SAE: b_dec at the data mean, a JumpReLU's thresholds at INITIAL_THRESHOLD * scale."""
    cls = ARCHITECTURES[architecture]
    sae = cls(d, n_latents, **({"k": k} if architecture in WITH_K else {}), seed=seed, hook=hook, device=device)
    with torch.no_grad():
        sae.b_dec.copy_(mean)
        if architecture == "jumprelu":
            sae.threshold.fill_(INITIAL_THRESHOLD * scale)
    return sae


# one step ------------------------------------------------------------------------------------
def _auxk_loss(sae: SparseAutoencoder, pre: Tensor, residual: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """Normalised MSE of the residual x - x_hat against its reconstruction from the aux_k largest
    pre-activations of dead latents only (0 while none is dead)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    values, indices = (F.relu(pre) * dead).topk(min(aux_k, n_dead), dim=-1)
    recon = torch.zeros_like(pre).scatter(-1, indices, values) @ sae.W_dec
    target = residual.detach()
    return (target - recon).pow(2).sum(-1).mean() / (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)


def _loss(sae: SparseAutoencoder, batch: Tensor, variance: Tensor, settings: dict, dead: Tensor,
          scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(total loss, normalised MSE, latents) of one batch for the SAE's architecture."""
    pre = sae.pre_activations(batch)
    jump = sae.architecture == "jumprelu"
    bandwidth = settings["bandwidth"] * scale if jump else None
    latents = jumprelu(pre, sae.threshold, bandwidth) if jump else sae.activate(pre)
    recon = sae.decode(latents)
    nmse = (batch - recon).pow(2).sum(-1).mean() / variance
    if sae.architecture in WITH_K:
        extra = settings["aux_coefficient"] * _auxk_loss(sae, pre, batch - recon, dead, settings["aux_k"])
    elif jump:
        extra = settings["l0_coefficient"] * step(pre, sae.threshold, bandwidth).sum(-1).mean()
    else:  # standard: L1 of the latents weighted by their decoder norms, in units of the data's spread
        extra = settings["l1_coefficient"] * (latents * sae.W_dec.norm(dim=-1)).sum(-1).mean() / variance.sqrt()
    return nmse + extra, nmse, latents


@torch.no_grad()
def _remove_parallel_gradient(sae: SparseAutoencoder) -> None:
    """Drop the part of each decoder row's gradient along the (unit) row: it would only change the
    row's norm, which the renormalisation undoes."""
    if sae.W_dec.grad is not None:
        grad, rows = sae.W_dec.grad, sae.W_dec
        grad.sub_((grad * rows).sum(-1, keepdim=True) * rows)


@torch.no_grad()
def _after_step(sae: SparseAutoencoder, latents: Tensor, step_index: int) -> None:
    """Unit decoder rows; a BatchTopK's inference threshold follows the smallest kept activation
    (a moving average); a JumpReLU's thresholds stay non-negative."""
    sae.normalize_decoder()
    if sae.architecture == "batchtopk":
        kept = latents[latents > 0]
        if kept.numel():
            smallest = kept.min()
            sae.threshold.copy_(smallest if step_index == 0 else torch.lerp(sae.threshold, smallest, THRESHOLD_MOMENTUM))
    if sae.architecture == "jumprelu":
        sae.threshold.clamp_(min=0.0)


# checkpoints ---------------------------------------------------------------------------------
def _checkpoint(directory: Path, state: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".checkpoint.pt.tmp"  # written whole, then renamed: a kill never leaves half a checkpoint
    torch.save(state, tmp)
    os.replace(tmp, directory / "checkpoint.pt")


def _check_checkpoint(directory: Path, state: dict, sae: SparseAutoencoder, training: dict) -> None:
    """Refuse a checkpoint of another SAE or other training settings, naming what differs."""
    # a checkpoint from before the training settings were saved holds a TopK SAE
    saved = {**state["config"], **state.get("training", {**training, "architecture": "topk"})}
    wanted = {**sae.config(), **training}
    differ = [f"{key}={saved.get(key)!r}, not {wanted.get(key)!r}" for key in sorted(set(saved) | set(wanted))
              if saved.get(key) != wanted.get(key)]
    if differ:
        raise ValueError(f"checkpoint in {directory} is for {'; '.join(differ)} (start afresh with resume=False "
                         f"or another checkpoint_dir)")


def _resume(directory: Path, sae: SparseAutoencoder, optimizer, training: dict, device) -> Optional[dict]:
    """The checkpoint in `directory` loaded into the SAE and optimiser, or None when there is none."""
    if not (directory / "checkpoint.pt").is_file():
        return None
    # tensors and plain values only: loading runs no code
    state = torch.load(directory / "checkpoint.pt", weights_only=True, map_location=device)
    _check_checkpoint(directory, state, sae, training)
    sae.load_state_dict(state["sae"])
    optimizer.load_state_dict(state["optimizer"])
    return state


# training ------------------------------------------------------------------------------------
def train_sae(activations: Any, n_latents: int, k: Optional[Union[int, float]] = None, *,
              architecture: str = "topk", steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
              seed: int = 0, aux_k: Optional[int] = None, aux_coefficient: Optional[float] = None,
              dead_after: Optional[int] = None, l0_coefficient: Optional[float] = None,
              bandwidth: Optional[float] = None, l1_coefficient: Optional[float] = None,
              checkpoint_dir: Optional[Union[str, Path]] = None, checkpoint_every: int = 500,
              resume: bool = True, progress: bool = True, hook: Optional[str] = None,
              device: Optional[Union[str, torch.device]] = None) -> tuple[SparseAutoencoder, TrainHistory]:
    """Train an SAE ("topk" by default; "batchtopk", "jumprelu", "standard") on activations: a
    tensor [n, d] (minibatches drawn with replacement) or a store (its shuffled batches, epoch after
    epoch). Adam; decoder rows at unit norm after every step, their gradient along the row removed.

    Loss: normalised MSE ||x - x_hat||^2 / mean ||x - mean(x)||^2, plus
    - topk, batchtopk: aux_coefficient (default 1/32) x AuxK: latents silent for `dead_after`
      (default 10^7) inputs are dead; the residual is reconstructed from the `aux_k` (default d/2)
      largest pre-activations among dead latents, and its normalised MSE is the AuxK loss. A
      BatchTopK's inference `threshold` is a moving average of the smallest kept activation;
    - jumprelu: l0_coefficient (default 1e-3) x L0, thresholds learnt through a straight-through
      rectangle of width `bandwidth` (default 1e-3) x the data's per-dimension spread;
    - standard: l1_coefficient (default 1e-2) x sum_j latent_j ||W_dec[j]|| / the data's spread.

    With `checkpoint_dir`, the SAE, optimiser, dead-latent counters, batch position and history are
    saved every `checkpoint_every` steps and at the end; with `resume`, training continues from a
    checkpoint found there (one of another SAE or other settings is refused, naming what differs),
    with the batches an uninterrupted run would have used. Returns (SAE in eval mode, history).
    """
    d = _check_activations(activations)
    _positive("n_latents", n_latents, integer=True)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        _positive(name, value, integer=True)
    _positive("lr", lr)
    settings = _settings(architecture, k, n_latents, d, {
        "aux_k": aux_k, "aux_coefficient": aux_coefficient, "dead_after": dead_after, "l0_coefficient": l0_coefficient,
        "bandwidth": bandwidth, "l1_coefficient": l1_coefficient})
    if device is None:
        device = activations.device if isinstance(activations, Tensor) else torch.device("cpu")
    device = torch.device(device)
    mean, variance = _mean_and_variance(activations, device)
    scale = float(variance.clamp_min(1e-12).sqrt()) / math.sqrt(d)   # per-dimension spread of the data
    sae = _new_sae(architecture, d, n_latents, k, seed, hook, device, mean, scale)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    training = {"architecture": architecture, "batch_size": batch_size, "lr": lr, "seed": seed, **settings}
    stream = _TensorBatches(activations.to(device), batch_size, seed) if isinstance(activations, Tensor) \
        else _StoreBatches(activations, batch_size, seed, device)
    run = {"history": TrainHistory(), "start": 0,
           "since_fired": torch.zeros(n_latents, dtype=torch.long, device=device)}
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state = _resume(directory, sae, optimizer, training, device) if directory is not None and resume else None
    if state is not None:
        run = {"history": TrainHistory(**state["history"]), "start": state["step"],
               "since_fired": state.get("since_fired", run["since_fired"]).to(device)}
        stream.resume(state.get("stream", {"drawn": state["step"]}))
    _train(sae, optimizer, stream, steps, run, variance, settings, scale, progress,
           lambda step_done: directory is not None and (step_done % checkpoint_every == 0 or step_done == steps),
           lambda step_done: _checkpoint(directory, {
               "step": step_done, "sae": sae.state_dict(), "config": sae.config(), "training": training,
               "optimizer": optimizer.state_dict(), "history": run["history"].__dict__,
               "since_fired": run["since_fired"], "stream": stream.position()}))
    return sae.eval(), run["history"]


def _train(sae: SparseAutoencoder, optimizer, stream, steps: int, run: dict, variance: Tensor, settings: dict,
           scale: float, progress: bool, save_now, save) -> None:
    """The loop: one batch a step from `stream`, from run["start"] to `steps`."""
    history, since_fired = run["history"], run["since_fired"]
    dead_after = settings.get("dead_after")
    sae.train()
    bar = tqdm(range(run["start"], steps), desc=f"training {sae.architecture} SAE", disable=not progress,
               initial=run["start"], total=steps)
    for step_index in bar:
        batch = next(stream)
        dead = since_fired >= dead_after if dead_after else torch.zeros_like(since_fired, dtype=torch.bool)
        loss, nmse, latents = _loss(sae, batch, variance, settings, dead, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _remove_parallel_gradient(sae)
        with torch.device("cpu"):  # torch's Adam keeps its step counters on the default device, meant as the CPU
            optimizer.step()
        _after_step(sae, latents.detach(), step_index)
        fired = (latents.detach() > 0).any(0)
        since_fired.add_(len(batch)).masked_fill_(fired, 0)
        if step_index % 50 == 0 or step_index == steps - 1:
            _log(history, bar, step_index, nmse, latents, int(dead.sum()))
        if save_now(step_index + 1):
            save(step_index + 1)


def _log(history: TrainHistory, bar, step_index: int, nmse: Tensor, latents: Tensor, dead: int) -> None:
    history.steps.append(step_index)
    history.loss.append(float(nmse.detach()))
    history.l0.append(float((latents.detach() > 0).sum(-1).float().mean()))
    history.dead.append(dead)
    bar.set_postfix(nmse=f"{history.loss[-1]:.4f}", l0=f"{history.l0[-1]:.1f}", dead=dead)


@torch.no_grad()
def sae_statistics(sae: SparseAutoencoder, activations: Any, batch_size: int = 4096) -> dict:
    """Explained variance (1 - residual / total variance), dead latents (never active on these
    activations: count and share) and the mean number of active latents per input, of an SAE of
    any architecture in eval mode (a BatchTopK's threshold, not its batch top-k), on a tensor
    [n, d] or a store (`STATISTICS_SAMPLE` vectors at most)."""
    _check_activations(activations)
    device = sae.b_dec.device
    mean, variance = _mean_and_variance(activations, device)
    was_training = sae.training
    sae.eval()
    try:
        fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
        residual, active, count = 0.0, 0.0, 0
        limit = None if isinstance(activations, Tensor) else STATISTICS_SAMPLE
        for chunk in _chunks(activations, limit):
            for x in chunk.to(device).split(batch_size):
                recon, latents = sae(x)
                residual += float((x - recon).pow(2).sum())
                fired |= (latents > 0).any(0)
                active += float((latents > 0).sum())
                count += len(x)
    finally:
        sae.train(was_training)
    dead = int((~fired).sum())
    return {"explained_variance": 1 - residual / (float(variance) * count), "dead_latents": dead,
            "dead_share": dead / sae.n_latents, "mean_active": active / count}
