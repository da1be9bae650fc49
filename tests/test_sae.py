"""TopK SAE: recovers a known sparse dictionary, saves and loads exactly, resumes exactly."""

import pytest
import torch
import torch.nn.functional as F

import clip_lens
from clip_lens import tiny
from clip_lens.sae import TopKSAE, cache_activations, sae_statistics, train_sae


def synthetic(n=8000, d=32, n_true=48, active=3, seed=0):
    """Activations made from a known dictionary [n_true, d] with `active` atoms per sample."""
    gen = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(n_true, d, generator=gen), dim=-1)
    codes = torch.zeros(n, n_true)
    idx = torch.stack([torch.randperm(n_true, generator=gen)[:active] for _ in range(n)])
    codes.scatter_(1, idx, torch.rand(n, active, generator=gen) * 2 + 0.5)
    return codes @ atoms, atoms


def test_recovers_the_true_atoms():
    x, atoms = synthetic()
    sae, history = train_sae(x, n_latents=96, k=3, steps=1500, lr=2e-3, progress=False)
    cosine = F.normalize(sae.W_dec, dim=-1) @ atoms.T              # [latents, true atoms]
    recovered = (cosine.max(dim=0).values > 0.9).float().mean().item()
    assert recovered >= 0.8
    stats = sae_statistics(sae, x)
    assert stats["explained_variance"] > 0.9 and stats["mean_active"] <= 3
    assert history.loss[-1] < history.loss[0]


def test_save_and_load_round_trip_exactly(tmp_path):
    sae = TopKSAE(16, 40, 4, seed=2)
    with torch.no_grad():
        sae.b_enc.normal_()
    sae.save(tmp_path / "sae")
    loaded = TopKSAE.load(tmp_path / "sae")
    assert loaded.config() == sae.config()
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), loaded.state_dict().values()))
    x = torch.randn(5, 16)
    assert torch.equal(sae(x)[0], loaded(x)[0])
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        TopKSAE.load(tmp_path / "nothere")


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    x, _ = synthetic(n=2000)
    whole, _ = train_sae(x, n_latents=64, k=3, steps=120, progress=False)
    train_sae(x, n_latents=64, k=3, steps=60, checkpoint_dir=tmp_path, progress=False)   # "interrupted" at 60
    resumed, history = train_sae(x, n_latents=64, k=3, steps=120, checkpoint_dir=tmp_path, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert history.steps[-1] == 119
    with pytest.raises(ValueError, match="checkpoint .* is for"):
        train_sae(x, n_latents=32, k=3, steps=130, checkpoint_dir=tmp_path, progress=False)


def test_cache_activations_of_a_hook():
    model = clip_lens.HookedCLIP.from_pretrained(tiny.NAME)
    pixels = torch.rand(5, 3, 64, 64)
    acts = cache_activations(model, "vision.blocks.2.hook_resid_post", pixels, position=0, batch_size=2)
    _, cache = model.vision.run_with_cache(pixels)
    torch.testing.assert_close(acts, cache["blocks.2.hook_resid_post"][:, 0])
