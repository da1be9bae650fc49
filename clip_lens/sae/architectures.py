"""Sparse autoencoder architectures: one encoder and one decoder, four ways to pick the active
latents (docs/methods.md#sparse-autoencoders).

Every SAE reads x [..., d_in] and writes latents [..., n_latents]:

    pre = (x - b_dec) W_enc + b_enc          (b_dec subtracted unless apply_b_dec_to_input is False)
    latents = activate(pre)
    x_hat = latents W_dec + b_dec             (W_dec rows kept at unit norm while training)

- "standard": ReLU(pre);
- "topk": the k largest of ReLU(pre) per input, the rest 0;
- "batchtopk": while training, the k x batch largest of ReLU(pre) over the whole batch (k per
  input on average); at inference ReLU(pre) where pre exceeds one threshold learnt in training;
- "jumprelu": ReLU(pre) where pre exceeds each latent's own threshold, else 0.

These are the architectures of SAELens's on-disk layout (`clip_lens.sae.saelens`), which loads into
these classes and is written from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from clip_lens.sae.files import load_sae, save_sae


class SparseAutoencoder(nn.Module):
    """The weights and the encode / decode every architecture shares.

    Attributes:
        W_enc: [d_in, n_latents]; b_enc: [n_latents]; W_dec: [n_latents, d_in] (unit-norm rows
            after training); b_dec: [d_in].
        hook: the HookedCLIP hook it was trained on (e.g. "vision.blocks.11.hook_resid_post"), or
            None when unknown; saved with it, and checked by `patch(sae=...)` and the studies.
        apply_b_dec_to_input: subtract b_dec from x before encoding (SAELens's flag; True here).
    """

    architecture: ClassVar[str] = ""

    def __init__(self, d_in: int, n_latents: int, *, seed: int = 0, hook: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", apply_b_dec_to_input: bool = True):
        super().__init__()
        for name, value in (("d_in", d_in), ("n_latents", n_latents)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: give a positive integer")
        self.d_in, self.n_latents, self.hook = d_in, n_latents, hook
        self.apply_b_dec_to_input = apply_b_dec_to_input
        gen = torch.Generator().manual_seed(seed)  # a CPU generator: the same SAE on every device
        decoder = F.normalize(torch.randn(n_latents, d_in, generator=gen, device="cpu"), dim=-1).to(device)
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(decoder.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))

    # the computation -------------------------------------------------------------------------
    def pre_activations(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_latents"]:
        x = x.to(self.b_dec.dtype)  # in the SAE's dtype (a half-precision tower's activations are cast)
        return ((x - self.b_dec) if self.apply_b_dec_to_input else x) @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Tensor, "... n_latents"]) -> Float[Tensor, "... n_latents"]:
        raise NotImplementedError

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_latents"]:
        """Sparse latents [..., n_latents]."""
        return self.activate(self.pre_activations(x))

    def decode(self, latents: Float[Tensor, "... n_latents"]) -> Float[Tensor, "... d_in"]:
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_in"]) -> tuple[Tensor, Tensor]:
        """(reconstruction [..., d_in], latents [..., n_latents])."""
        latents = self.encode(x)
        return self.decode(latents), latents

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    # what it is -------------------------------------------------------------------------------
    def hyperparameters(self) -> dict:
        """The architecture's own constructor arguments beyond d_in and n_latents (e.g. k)."""
        return {}

    def config(self) -> dict:
        """The constructor arguments that rebuild this SAE (its weights aside)."""
        config = {"d_in": self.d_in, "n_latents": self.n_latents, **self.hyperparameters(), "hook": self.hook}
        if not self.apply_b_dec_to_input:
            config["apply_b_dec_to_input"] = False
        return config

    @classmethod
    def parameter_shapes(cls, d_in: int, n_latents: int) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of an SAE of these sizes, as its state dict holds them."""
        return {"W_dec": (n_latents, d_in), "W_enc": (d_in, n_latents), "b_enc": (n_latents,), "b_dec": (d_in,)}

    def save(self, path: Union[str, Path]) -> Path:
        """`path.safetensors` (weights) and `path.json` (config, with the architecture); returns the
        weights path (`clip_lens.sae.files`)."""
        return save_sae(self, path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SparseAutoencoder":
        """An SAE saved by `save` (see `clip_lens.sae.files.load_sae`), checked to be this class."""
        sae = load_sae(path, ARCHITECTURES)
        if cls is not SparseAutoencoder and not isinstance(sae, cls):
            raise ValueError(f"{path} holds a {sae.architecture!r} SAE, not a {cls.architecture!r} one")
        return sae


def _check_k(k, n_latents: int, integer: bool = True) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or (integer and not isinstance(k, int)) \
            or not 0 < k <= n_latents:
        raise ValueError(f"k={k} must lie in 1..n_latents={n_latents}")


class StandardSAE(SparseAutoencoder):
    """ReLU latents (sparsity comes from the training loss, e.g. an L1 penalty)."""

    architecture = "standard"

    def activate(self, pre: Tensor) -> Tensor:
        return F.relu(pre)


class TopKSAE(SparseAutoencoder):
    """The k largest ReLU'd pre-activations of each input; the rest 0."""

    architecture = "topk"

    def __init__(self, d_in: int, n_latents: int, k: int, seed: int = 0, hook: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", apply_b_dec_to_input: bool = True):
        _check_k(k, n_latents)
        super().__init__(d_in, n_latents, seed=seed, hook=hook, device=device, apply_b_dec_to_input=apply_b_dec_to_input)
        self.k = k

    def activate(self, pre: Tensor) -> Tensor:
        pre = F.relu(pre)
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def hyperparameters(self) -> dict:
        return {"k": self.k}


class BatchTopKSAE(SparseAutoencoder):
    """While training, the k x n largest ReLU'd pre-activations of a batch of n inputs (k active
    per input on average, more where an input needs them); at inference, ReLU(pre) where pre
    exceeds `threshold` (a scalar buffer, the running mean of the smallest kept activation)."""

    architecture = "batchtopk"

    def __init__(self, d_in: int, n_latents: int, k: Union[int, float], seed: int = 0, hook: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", apply_b_dec_to_input: bool = True):
        _check_k(k, n_latents, integer=False)
        super().__init__(d_in, n_latents, seed=seed, hook=hook, device=device, apply_b_dec_to_input=apply_b_dec_to_input)
        self.k = k
        self.register_buffer("threshold", torch.zeros((), device=device))

    def activate(self, pre: Tensor) -> Tensor:
        pre = F.relu(pre)
        if not self.training:
            return pre * (pre > self.threshold)
        flat = pre.flatten()
        values, indices = flat.topk(max(1, int(self.k * pre.shape[:-1].numel())))
        return torch.zeros_like(flat).scatter(-1, indices, values).view_as(pre)

    def hyperparameters(self) -> dict:
        return {"k": self.k}

    @classmethod
    def parameter_shapes(cls, d_in: int, n_latents: int) -> dict[str, tuple[int, ...]]:
        return {**super().parameter_shapes(d_in, n_latents), "threshold": ()}


class JumpReLUSAE(SparseAutoencoder):
    """ReLU(pre) where pre exceeds the latent's own threshold [n_latents], else 0."""

    architecture = "jumprelu"

    def __init__(self, d_in: int, n_latents: int, seed: int = 0, hook: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", apply_b_dec_to_input: bool = True):
        super().__init__(d_in, n_latents, seed=seed, hook=hook, device=device, apply_b_dec_to_input=apply_b_dec_to_input)
        self.threshold = nn.Parameter(torch.zeros(n_latents, device=device))

    def activate(self, pre: Tensor) -> Tensor:
        return F.relu(pre) * (pre > self.threshold)

    @classmethod
    def parameter_shapes(cls, d_in: int, n_latents: int) -> dict[str, tuple[int, ...]]:
        return {**super().parameter_shapes(d_in, n_latents), "threshold": (n_latents,)}


ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (StandardSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE)}
