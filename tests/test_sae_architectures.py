"""The four SAE architectures (docs/methods.md#sparse-autoencoders): what each keeps active, and a
round trip through clip_lens's own file layout."""

import pytest
import torch

from clip_lens.sae import ARCHITECTURES, BatchTopKSAE, JumpReLUSAE, SparseAutoencoder, StandardSAE, TopKSAE


def _pre(sae, x):
    return (x - sae.b_dec) @ sae.W_enc + sae.b_enc


def _built(architecture: str, seed: int = 0) -> SparseAutoencoder:
    cls = ARCHITECTURES[architecture]
    sae = cls(6, 10, **({"k": 3} if architecture in ("topk", "batchtopk") else {}), seed=seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed + 1)))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.linspace(0.0, 0.5, 10))
        if architecture == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae.eval()


def test_each_architecture_keeps_what_it_says():
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    for architecture in ARCHITECTURES:
        sae = _built(architecture)
        pre, codes = _pre(sae, x), sae.encode(x)
        relu = pre.clamp_min(0)
        kept = codes != 0
        assert torch.equal(codes[kept], relu[kept])                     # a kept latent is its ReLU'd pre-activation
        if architecture == "standard":
            assert torch.equal(codes, relu)
        if architecture == "topk":
            assert (kept.sum(-1) <= 3).all()
            assert (relu.topk(3).values[:, -1:] <= codes.max(-1, keepdim=True).values).all()
        if architecture == "jumprelu":
            assert torch.equal(kept, pre > sae.threshold)
        if architecture == "batchtopk":
            assert torch.equal(kept, pre > 0.2)
    batch = BatchTopKSAE(6, 10, k=2).train()
    codes = batch.encode(x)
    assert int((codes != 0).sum()) == 2 * 32                           # k per input on average, over the batch


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_architecture_round_trips_through_its_files(architecture, tmp_path):
    sae = _built(architecture)
    sae.hook = "vision.blocks.2.hook_resid_post"
    sae.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.config() == sae.config()
    x = torch.randn(8, 6)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    if architecture != "topk":
        with pytest.raises(ValueError, match=f"holds a {architecture!r} SAE, not a 'topk' one"):
            TopKSAE.load(tmp_path / "sae")


def test_bad_sizes_are_refused_by_name():
    with pytest.raises(ValueError, match="k=11 must lie in 1..n_latents=10"):
        TopKSAE(6, 10, k=11)
    with pytest.raises(ValueError, match="n_latents=0: give a positive integer"):
        StandardSAE(6, 0)
    with pytest.raises(ValueError, match=r"k=2\.5 must lie"):
        TopKSAE(6, 10, k=2.5)
    assert JumpReLUSAE(6, 10).threshold.shape == (10,)
