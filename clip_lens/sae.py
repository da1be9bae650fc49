"""TopK sparse autoencoders on cached activations of any hook (docs/methods.md#topk-sparse-autoencoder, latent components).

    acts = cache_activations(model, "vision.blocks.11.hook_resid_post", pixels, position=0)  # [N, d_model]
    sae, history = train_sae(acts, n_latents=4096, k=32, steps=5000, checkpoint_dir="runs/sae")
    sae.save("runs/sae/final"); TopKSAE.load("runs/sae/final")
    stats = sae_statistics(sae, acts)      # explained variance, dead latents, mean active

A TopK SAE keeps the k largest pre-activations of each input (ReLU'd) and reconstructs from them:
latents = TopK(ReLU((x - b_dec) W_enc + b_enc)), x_hat = latents W_dec + b_dec, with unit-norm
decoder rows, so each latent is a direction in activation space. A small module of our own:
sae-lens's training is built around language-model token pipelines.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from clip_lens.hooks import split_tower_prefix, stacked_activations


class TopKSAE(nn.Module):
    """A TopK sparse autoencoder.

    Attributes:
        W_enc: [d_in, n_latents]; b_enc: [n_latents]; W_dec: [n_latents, d_in] (unit-norm rows);
        b_dec: [d_in].
        hook: the HookedCLIP hook it was trained on (e.g. "vision.blocks.11.hook_resid_post"), or
            None when unknown; saved with it, and checked by `patch(sae=...)` and the studies.
    """

    def __init__(self, d_in: int, n_latents: int, k: int, seed: int = 0, hook: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu"):
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"k={k} must lie in 1..n_latents={n_latents}")
        self.d_in, self.n_latents, self.k, self.hook = d_in, n_latents, k, hook
        gen = torch.Generator().manual_seed(seed)  # a CPU generator: the same SAE on every device
        decoder = F.normalize(torch.randn(n_latents, d_in, generator=gen, device="cpu"), dim=-1).to(device)
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(decoder.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))

    def pre_activations(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_latents"]:
        return (x.to(self.b_dec.dtype) - self.b_dec) @ self.W_enc + self.b_enc  # in the SAE's dtype (a half-precision tower's activations are cast)

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_latents"]:
        """Sparse latents: the k largest ReLU'd pre-activations, the rest 0."""
        pre = F.relu(self.pre_activations(x))
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def decode(self, latents: Float[Tensor, "... n_latents"]) -> Float[Tensor, "... d_in"]:
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_in"]) -> tuple[Tensor, Tensor]:
        """(reconstruction [..., d_in], latents [..., n_latents])."""
        latents = self.encode(x)
        return self.decode(latents), latents

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    def config(self) -> dict:
        return {"d_in": self.d_in, "n_latents": self.n_latents, "k": self.k, "hook": self.hook}

    def save(self, path: Union[str, Path]) -> Path:
        """`path.safetensors` (weights) and `path.json` (config); returns the weights path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        weights, config = path.with_suffix(".safetensors"), path.with_suffix(".json")
        # each file written whole under a temporary name, then renamed: no partial SAE under its final name
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(weights) + ".tmp")
        config.with_suffix(".json.tmp").write_text(json.dumps(self.config()))
        os.replace(str(weights) + ".tmp", weights)
        os.replace(config.with_suffix(".json.tmp"), config)
        return weights

    @staticmethod
    def parameter_shapes(d_in: int, n_latents: int) -> dict[str, tuple[int, ...]]:
        """The shape of each weight of an SAE of these sizes, as its state dict holds them."""
        return {"W_dec": (n_latents, d_in), "W_enc": (d_in, n_latents), "b_enc": (n_latents,), "b_dec": (d_in,)}

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TopKSAE":
        """An SAE saved by `save`: `path.json` (its config, each key checked by name and type) and
        `path.safetensors` (its weights, whose shapes in the file's header must be those the config
        implies); every problem is refused, naming the file, before anything is allocated."""
        from safetensors.torch import load_file

        path = Path(path)
        config_path, weights_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
        for p in (config_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"SAE file not found: {p}" + (" (it is a folder)" if p.is_dir() else ""))
        config = _sae_config(config_path)
        _check_sae_weights(weights_path, config_path, cls.parameter_shapes(config["d_in"], config["n_latents"]))
        sae = cls(**config)
        sae.load_state_dict(load_file(str(weights_path)))
        return sae


SAE_SIZES = ("d_in", "n_latents", "k")


def _sae_config(path: Path) -> dict:
    """An SAE's JSON config: d_in, n_latents, k (positive integers, k <= n_latents) and hook (a
    hook name or null); anything else is a ValueError naming the file and key."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a JSON SAE config ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: an SAE config is a JSON object, not a {type(config).__name__}")
    missing = [key for key in SAE_SIZES if key not in config]
    unknown = sorted(set(config) - set(SAE_SIZES) - {"hook"})
    if missing or unknown:
        what = "lacks " + ", ".join(missing) if missing else "has unknown keys " + ", ".join(unknown)
        raise ValueError(f"{path}: the SAE config {what} (it has d_in, n_latents, k and hook)")
    for key in SAE_SIZES:
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 1:
            raise ValueError(f"{path}: {key} must be a positive integer, got {config[key]!r}")
    if config["k"] > config["n_latents"]:
        raise ValueError(f"{path}: k={config['k']} must lie in 1..n_latents={config['n_latents']}")
    if config.get("hook") is not None and not isinstance(config["hook"], str):
        raise ValueError(f"{path}: hook must be a hook name or null, got {config['hook']!r}")
    return config


def _check_sae_weights(weights: Path, config: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse a weights file whose tensors (read from its header, none loaded) are not the ones
    the config implies."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"{weights} is not a safetensors file: {error}") from None
    if set(found) != set(expected):
        raise ValueError(f"{weights} holds tensors {sorted(found)}, an SAE has {sorted(expected)}")
    for key, shape in expected.items():
        if found[key] != shape:
            raise ValueError(f"{config}'s d_in and n_latents imply {key} of shape {list(shape)}, but {weights} holds "
                             f"{list(found[key])}")


@dataclass
class TrainHistory:
    steps: list = field(default_factory=list)
    loss: list = field(default_factory=list)        # normalised MSE per logged step


def _checkpoint(directory: Path, sae: TopKSAE, optimizer, step: int, history: TrainHistory) -> None:
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
def sae_statistics(sae: TopKSAE, activations: Float[Tensor, "n d_in"], batch_size: int = 4096) -> dict:
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


@torch.no_grad()
def cache_activations(model: Any, hook_name: str, inputs: Tensor, position: Optional[int] = None,
                      batch_size: int = 64) -> Tensor:
    """Activations of one hook over inputs, [n, ...] (at one `position` when given: [n, d]).

    `model` is a HookedCLIP (prefixed names, e.g. "vision.blocks.11.hook_resid_post") or a tower.
    """
    prefix, local_name = split_tower_prefix(hook_name)
    if prefix is not None and hasattr(model, "text"):  # a HookedCLIP: its tower runs the tower's inputs
        model, hook_name = getattr(model, prefix), local_name
    return stacked_activations(model, inputs, [hook_name], batch_size, position=position)[:, 0]
