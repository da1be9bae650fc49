"""Training every SAE architecture (docs/methods.md#sparse-autoencoders): a planted sparse dictionary
recovered by TopK, BatchTopK and JumpReLU; AuxK reviving dead latents; training from a store;
checkpoints resumed exactly; bad arguments refused by name."""

import pytest
import torch
import torch.nn.functional as F

from clip_lens.sae import sae_statistics, train_sae
from clip_lens.sae.jumprelu import jumprelu, step


def planted(n=4000, d=32, n_atoms=64, active=3, subspace=None, seed=0):
    """Inputs [n, d] each a positive combination of `active` of `n_atoms` unit atoms [n_atoms, d]
    (the atoms drawn inside a random `subspace`-dimensional subspace when given)."""
    gen = torch.Generator().manual_seed(seed)
    width = subspace or d
    atoms = F.normalize(torch.randn(n_atoms, width, generator=gen), dim=-1)
    if subspace:
        atoms = atoms @ torch.linalg.qr(torch.randn(d, subspace, generator=gen))[0].T
    chosen = torch.stack([torch.randperm(n_atoms, generator=gen)[:active] for _ in range(n)])
    codes = torch.zeros(n, n_atoms).scatter_(1, chosen, torch.rand(n, active, generator=gen) * 2 + 0.5)
    return codes @ atoms, atoms


def recovered(sae, atoms) -> float:
    """Share of the atoms whose best-aligned decoder row has cosine above 0.9."""
    return ((F.normalize(sae.W_dec, dim=-1) @ atoms.T).max(dim=0).values > 0.9).float().mean().item()


def same_weights(a, b) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(a.state_dict()[key], b.state_dict()[key]) for key in a.state_dict())


class FakeStore:
    """The activation store's reading interface over a tensor: `d`, `len()`, and
    `batches(batch_size, shuffle, seed)` (an epoch of shuffled batches; with `replacement`, an
    endless draw with replacement, the order the tensor path uses)."""

    def __init__(self, x, replacement=False):
        self.x, self.replacement, self.d, self.opened = x, replacement, x.shape[1], []

    def __len__(self):
        return len(self.x)

    def batches(self, batch_size, shuffle=True, seed=0):
        self.opened.append((shuffle, seed))
        if not shuffle:
            yield from self.x.split(batch_size)
            return
        gen = torch.Generator().manual_seed(seed)
        while self.replacement:
            yield self.x[torch.randint(len(self.x), (batch_size,), generator=gen)]
        order = torch.randperm(len(self.x), generator=gen)
        for start in range(0, len(order), batch_size):
            yield self.x[order[start:start + batch_size]]


# the planted dictionary ------------------------------------------------------------------------
@pytest.mark.parametrize("architecture, extra", [
    ("topk", {"k": 3}), ("batchtopk", {"k": 3}), ("jumprelu", {"l0_coefficient": 1e-2})])
def test_each_architecture_recovers_the_planted_atoms(architecture, extra):
    x, atoms = planted()
    sae, history = train_sae(x, 128, architecture=architecture, steps=800, lr=2e-3, progress=False, **extra)
    assert recovered(sae, atoms) >= 0.9
    stats = sae_statistics(sae, x)                          # eval mode: a BatchTopK reads its threshold
    assert stats["explained_variance"] > 0.9
    assert 2 <= stats["mean_active"] <= (4 if architecture != "jumprelu" else 8)
    assert history.loss[-1] < history.loss[0]
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(128))


def test_standard_trains_sparse_latents_with_unit_decoder_rows():
    x, atoms = planted(n=2000)
    sae, history = train_sae(x, 64, architecture="standard", l1_coefficient=0.05, steps=300, lr=2e-3, progress=False)
    stats = sae_statistics(sae, x)
    assert stats["explained_variance"] > 0.8 and stats["mean_active"] < 32
    assert history.loss[-1] < history.loss[0]
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64))


def test_batchtopk_threshold_gives_about_k_active_in_eval_mode():
    x, _ = planted(n=2000)
    sae, _ = train_sae(x, 96, 4, architecture="batchtopk", steps=300, lr=2e-3, progress=False)
    assert sae.threshold > 0
    active = (sae.encode(x) > 0).sum(-1).float().mean()
    assert 3 <= active <= 5
    sae.train()
    sae_statistics(sae, x)
    assert sae.training                                      # sae_statistics puts the mode back


def test_auxk_leaves_fewer_dead_latents():
    # 96 atoms in a 32-dimensional subspace of 128 dimensions, 96 latents: the latents started
    # far from the subspace die unless AuxK pulls them towards what is left unexplained
    x, atoms = planted(d=128, subspace=32, n_atoms=96)
    runs = {c: train_sae(x, 96, 3, steps=600, lr=2e-3, dead_after=1000, aux_coefficient=c, progress=False)[0]
            for c in (0.0, 1 / 32)}
    dead = {c: sae_statistics(sae, x)["dead_latents"] for c, sae in runs.items()}
    assert dead[1 / 32] < dead[0.0]
    assert recovered(runs[1 / 32], atoms) > recovered(runs[0.0], atoms)


# the straight-through estimator ----------------------------------------------------------------
def test_jumprelu_gradients_are_the_rectangle_pseudo_derivatives():
    pre = torch.tensor([[0.5, 0.995, 1.2], [1.004, 0.2, 0.9]], requires_grad=True)
    threshold = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    out = jumprelu(pre, threshold, 0.02)
    assert torch.equal(out, pre * (pre > threshold))
    out.sum().backward()
    assert torch.equal(pre.grad, (pre > threshold).float())
    # within bandwidth/2 = 0.01 of the threshold: [0][1] (latent 1) and [1][0] (latent 0)
    torch.testing.assert_close(threshold.grad, torch.tensor([-50.0, -50.0, 0.0]))
    threshold.grad = None
    step(pre, threshold, 0.02).sum().backward()
    torch.testing.assert_close(threshold.grad, torch.tensor([-50.0, -50.0, 0.0]))


# stores, checkpoints and resume ----------------------------------------------------------------
def test_training_from_a_store_equals_training_from_the_tensor_on_the_same_batches():
    x, _ = planted(n=1000)
    store = FakeStore(x, replacement=True)
    for architecture, extra in (("topk", {"k": 3}), ("jumprelu", {})):
        from_tensor, _ = train_sae(x, 48, architecture=architecture, steps=40, progress=False, **extra)
        from_store, _ = train_sae(store, 48, architecture=architecture, steps=40, progress=False, **extra)
        assert same_weights(from_tensor, from_store)


def test_a_store_recovers_the_atoms_over_several_epochs():
    x, atoms = planted(n=2000)
    store = FakeStore(x)
    sae, _ = train_sae(store, 128, 3, steps=600, lr=2e-3, progress=False)
    assert recovered(sae, atoms) >= 0.9
    assert (True, 0) in store.opened and (True, 1) in store.opened       # epoch e shuffled with seed + e


@pytest.mark.parametrize("architecture, extra", [
    ("topk", {"k": 3, "dead_after": 64}), ("batchtopk", {"k": 3, "dead_after": 64}),
    ("jumprelu", {"l0_coefficient": 1e-2}), ("standard", {})])
def test_resume_equals_an_uninterrupted_run(tmp_path, architecture, extra):
    x, _ = planted(n=500)
    for source in (x, FakeStore(x)):                  # a store: the interruption falls mid-epoch (8 batches an epoch)
        whole, whole_history = train_sae(source, 48, architecture=architecture, steps=30, batch_size=64,
                                         progress=False, **extra)
        folder = tmp_path / type(source).__name__
        train_sae(source, 48, architecture=architecture, steps=13, batch_size=64, checkpoint_dir=folder,
                  progress=False, **extra)
        resumed, history = train_sae(source, 48, architecture=architecture, steps=30, batch_size=64,
                                     checkpoint_dir=folder, progress=False, **extra)
        assert same_weights(whole, resumed)
        logged = dict(zip(history.steps, zip(history.loss, history.dead)))   # also the interrupted run's last step
        assert history.steps[-1] == 29 and all(logged[s] == v for s, v in zip(
            whole_history.steps, zip(whole_history.loss, whole_history.dead)))


def test_a_checkpoint_of_another_architecture_or_setting_is_refused_by_name(tmp_path):
    x, _ = planted(n=300)
    train_sae(x, 16, 2, steps=4, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="checkpoint in .* is for architecture='topk', not 'jumprelu'"):
        train_sae(x, 16, architecture="jumprelu", steps=8, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="checkpoint in .* is for .*aux_coefficient=0.03125, not 0.5"):
        train_sae(x, 16, 2, aux_coefficient=0.5, steps=8, checkpoint_dir=tmp_path, progress=False)


@pytest.mark.parametrize("call, message", [
    (dict(n_latents=8, k=2, architecture="gated"), "architecture='gated' is not one of"),
    (dict(n_latents=8), "architecture='topk' needs k"),
    (dict(n_latents=8, architecture="batchtopk"), "architecture='batchtopk' needs k"),
    (dict(n_latents=8, k=2, architecture="jumprelu"), "k=2 is for topk and batchtopk, not architecture='jumprelu'"),
    (dict(n_latents=8, k=2, l0_coefficient=0.1), "l0_coefficient is not a setting of architecture='topk'"),
    (dict(n_latents=8, architecture="jumprelu", aux_k=4), "aux_k is not a setting of architecture='jumprelu'"),
    (dict(n_latents=8, architecture="jumprelu", bandwidth=0.0), "bandwidth=0.0: give a positive number"),
    (dict(n_latents=8, k=2, dead_after=-1), "dead_after=-1: give a positive integer"),
    (dict(n_latents=0, k=2), "n_latents=0"),
    (dict(n_latents=8, k=2, batch_size=0), "batch_size=0"),
])
def test_bad_arguments_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        train_sae(torch.randn(20, 6), steps=2, progress=False, **call)


def test_activations_that_are_neither_a_tensor_nor_a_store_are_refused():
    with pytest.raises(TypeError, match="not a list"):
        train_sae([[0.0, 1.0]], 4, 2, steps=2, progress=False)
    with pytest.raises(ValueError, match=r"yielded a batch of \[4, 5\], not a tensor \[batch, 6\]"):
        store = FakeStore(torch.randn(4, 5))
        store.d = 6
        train_sae(store, 4, 2, steps=2, progress=False)
