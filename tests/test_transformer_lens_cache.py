"""TransformerLens's cache tools on tower caches: residual decompositions sum to the residual,
`apply_ln` at the last layer reproduces the tower's own embedding, and `incl_bwd=True` caches the
gradients autograd gives (each crashed on tower caches before)."""

import pytest
import torch


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def _inputs(model, modality):
    if modality == "text":
        return model.text, model.to_tokens(["There is a red circle.", "There are no squares."])
    return model.vision, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_decompose_resid_sums_to_the_residual(model, modality):
    tower, inputs = _inputs(model, modality)
    _, cache = tower.run_with_cache(inputs)
    L = tower.cfg.n_layers
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[-1] == f"{L - 1}_mlp_out" and len(parts) == len(labels)
    torch.testing.assert_close(parts.sum(0), cache[f"blocks.{L - 1}.hook_resid_post"], atol=1e-5, rtol=1e-5)
    middle = cache.decompose_resid(layer=1, mlp_input=True)
    torch.testing.assert_close(middle.sum(0), cache["blocks.1.hook_resid_mid"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_apply_ln_at_the_last_layer_gives_the_embedding(model, modality):
    tower, inputs = _inputs(model, modality)
    emb, cache = tower.run_with_cache(inputs)
    pooled = tower.pooled_positions(inputs)
    rows = torch.arange(len(inputs))
    normed = cache.accumulated_resid(apply_ln=True)[-1]          # the final norm applied, [batch, pos, d_model]
    torch.testing.assert_close(tower.proj(normed[rows, pooled]), emb, atol=1e-5, rtol=1e-5)
    scaled = cache.decompose_resid(apply_ln=True).sum(0)         # centred and divided by the cached scale
    torch.testing.assert_close(tower.proj(scaled[rows, pooled] * tower.final_norm.w + tower.final_norm.b), emb,
                               atol=1e-5, rtol=1e-5)
    heads = cache.stack_head_results(apply_ln=True, pos_slice=0)
    assert heads.shape[0] == tower.cfg.n_layers * tower.cfg.n_heads and torch.isfinite(heads).all()


def test_text_full_decomposition_sums_to_the_residual(model):
    tower, tokens = _inputs(model, "text")
    _, cache = tower.run_with_cache(tokens)
    full = cache.get_full_resid_decomposition(expand_neurons=False)
    L = tower.cfg.n_layers
    torch.testing.assert_close(full.sum(0), cache[f"blocks.{L - 1}.hook_resid_post"], atol=1e-4, rtol=1e-4)
    _, vision_cache = model.vision.run_with_cache(_inputs(model, "vision")[1])
    with pytest.raises(NotImplementedError, match="use decompose_resid"):
        vision_cache.get_full_resid_decomposition()


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_incl_bwd_caches_the_gradients_autograd_gives(model, modality):
    tower, inputs = _inputs(model, modality)
    name = "blocks.1.hook_resid_pre"

    def metric(emb):
        return emb[:, 0].sum()

    _, cache = tower.run_with_cache(inputs, incl_bwd=True, metric=metric, names_filter=lambda n: n == name)
    kept = {}

    def keep(act, hook):
        act.retain_grad()
        kept["act"] = act
        return act

    with torch.enable_grad():
        metric(tower.run_with_hooks(inputs, fwd_hooks=[(name, keep)])).backward()
    torch.testing.assert_close(cache[name + "_grad"], kept["act"].grad, atol=1e-6, rtol=1e-5)
    assert not any(h.fwd_hooks or h.bwd_hooks for h in tower.hook_dict.values())
    with pytest.raises(ValueError, match=r"needs metric=f\(output\) -> scalar"):
        tower.run_with_cache(inputs, incl_bwd=True)
    tower.zero_grad(set_to_none=True)
