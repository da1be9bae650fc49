"""Training an SAE on activations held in memory (docs/methods.md#topk-sparse-autoencoder).

    sae, history = train_sae(acts, n_latents=4096, k=32, steps=5000, checkpoint_dir="runs/sae")
    stats = sae_statistics(sae, acts)      # explained variance, dead latents, mean active
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.sae.architectures import SparseAutoencoder, TopKSAE


@dataclass
class TrainHistory:
    steps: list = field(default_factory=list)
    loss: list = field(default_factory=list)        # normalised MSE per logged step


def _checkpoint(directory: Path, sae: SparseAutoencoder, optimizer, step: int, history: TrainHistory) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".checkpoint.pt.tmp"  # written whole, then renamed: a kill never leaves half a checkpoint
    torch.save({"step": step, "sae": sae.state_dict(), "config": sae.config(), "optimizer": optimizer.state_dict(),
                "history": history.__dict__}, tmp)
    os.replace(tmp, directory / "checkpoint.pt")


def train_sae(activations: Float[Tensor, "n d_in"], n_latents: int, k: int, *, steps: int = 2000,
              batch_size: int = 256, lr: float = 1e-3, seed: int = 0, checkpoint_dir: Optional[Union[str, Path]] = None,
              checkpoint_every: int = 500, resume: bool = True, progress: bool = True,
              hook: Optional[str] = None) -> tuple[TopKSAE, TrainHistory]:
    """Train a TopK SAE on activations [n, d_in] (shuffled minibatches, Adam, unit-norm decoder rows).

    With `checkpoint_dir`, the SAE, optimiser and history are saved every `checkpoint_every` steps
    and at the end; with `resume`, training continues from a checkpoint found there.
    Loss: ||x - x_hat||^2 / ||x - mean(x)||^2 per batch (normalised MSE).
    """
    activations = activations.detach().float()
    sae = TopKSAE(activations.shape[1], n_latents, k, seed=seed, hook=hook, device=activations.device)
    with torch.no_grad():
        sae.b_dec.copy_(activations.mean(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    history, start = TrainHistory(), 0
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if directory is not None and resume and (directory / "checkpoint.pt").is_file():
        # tensors and plain values only: loading runs no code
        state = torch.load(directory / "checkpoint.pt", weights_only=True, map_location=activations.device)
        if state["config"] != sae.config():
            raise ValueError(f"checkpoint in {directory} is for {state['config']}, not {sae.config()}")
        sae.load_state_dict(state["sae"])
        optimizer.load_state_dict(state["optimizer"])
        history, start = TrainHistory(**state["history"]), state["step"]
    gen = torch.Generator().manual_seed(seed)
    draw = functools.partial(torch.randint, len(activations), (batch_size,), generator=gen, device="cpu")
    for _ in range(start):  # the same batch order as an uninterrupted run
        draw()
    variance = (activations - activations.mean(0)).pow(2).sum(-1).mean()
    bar = tqdm(range(start, steps), desc="training SAE", disable=not progress, initial=start, total=steps)
    for step in bar:
        batch = activations[draw().to(activations.device)]
        recon, _ = sae(batch)
        loss = (batch - recon).pow(2).sum(-1).mean() / variance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.device("cpu"):  # torch's Adam keeps its step counters on the default device, meant as the CPU
            optimizer.step()
        sae.normalize_decoder()
        if step % 50 == 0 or step == steps - 1:
            history.steps.append(step)
            history.loss.append(float(loss.detach()))
            bar.set_postfix(nmse=f"{float(loss.detach()):.4f}")
        if directory is not None and (step + 1) % checkpoint_every == 0:
            _checkpoint(directory, sae, optimizer, step + 1, history)
    if directory is not None:
        _checkpoint(directory, sae, optimizer, steps, history)
    return sae.eval(), history


@torch.no_grad()
def sae_statistics(sae: SparseAutoencoder, activations: Float[Tensor, "n d_in"], batch_size: int = 4096) -> dict:
    """Explained variance (1 - residual / total variance), dead latents (never active on these
    activations: count and share) and the mean number of active latents per input."""
    activations = activations.float()
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=activations.device)
    residual, active = 0.0, 0.0
    for i in range(0, len(activations), batch_size):
        x = activations[i:i + batch_size]
        recon, latents = sae(x)
        residual += float((x - recon).pow(2).sum())
        fired |= (latents > 0).any(0)
        active += float((latents > 0).sum())
    total = float((activations - activations.mean(0)).pow(2).sum())
    dead = int((~fired).sum())
    return {"explained_variance": 1 - residual / total, "dead_latents": dead, "dead_share": dead / sae.n_latents,
            "mean_active": active / len(activations)}
