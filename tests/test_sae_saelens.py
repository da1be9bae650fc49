"""SAELens's on-disk layout (clip_lens.sae.saelens): folders written here from the layout's definition
load and encode as SAELens computes them; clip_lens's SAEs saved in it reload identically; what clip_lens
does not compute is refused by name."""

import json

import pytest
import torch
from safetensors.torch import save_file

import clip_lens.sae as sae_lib
from clip_lens.sae import BatchTopKSAE, JumpReLUSAE, StandardSAE, TopKSAE

D_IN, D_SAE = 8, 12


def _weights(seed=0, jumprelu=False, batchtopk=False, decoder_norm=1.0):
    gen = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(D_IN, D_SAE, generator=gen), "W_dec": torch.randn(D_SAE, D_IN, generator=gen),
               "b_enc": 0.1 * torch.randn(D_SAE, generator=gen), "b_dec": 0.1 * torch.randn(D_IN, generator=gen)}
    weights["W_dec"] = decoder_norm * weights["W_dec"] / weights["W_dec"].norm(dim=-1, keepdim=True) \
        * torch.linspace(0.5, 2.0, D_SAE)[:, None]
    if jumprelu:
        weights["threshold"] = torch.linspace(0.0, 1.0, D_SAE)
    if batchtopk:
        weights["topk_threshold"] = torch.tensor(0.3, dtype=torch.float64)
    return weights


def _write(folder, cfg: dict, weights: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return folder


def _cfg(architecture, **extra):
    return {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.18.0", "model_name": "ViT-B-32", "hook_name": "blocks.2.hook_resid_post",
                         "hook_head_index": None}, **extra}


def _saelens_encode(cfg: dict, w: dict, x: torch.Tensor) -> torch.Tensor:
    """What SAELens 6 computes (its SAE.encode), written from its definition for these tests."""
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    architecture = cfg["architecture"]
    if architecture == "standard":
        return pre.relu()
    if architecture == "jumprelu":
        return pre.relu() * (pre > w["threshold"])
    if architecture == "batchtopk":  # its inference form: one threshold for every latent
        return pre.relu() * (pre > w["topk_threshold"].float())
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * w["W_dec"].norm(dim=-1)
    top = pre.topk(cfg["k"], dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def _saelens_decode(cfg: dict, w: dict, codes: torch.Tensor) -> torch.Tensor:
    if cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        codes = codes / w["W_dec"].norm(dim=-1)
    return codes @ w["W_dec"] + w["b_dec"]


CASES = {
    "standard": (_cfg("standard"), _weights()),
    "topk": (_cfg("topk", k=3, rescale_acts_by_decoder_norm=False), _weights(1)),
    "topk rescaled": (_cfg("topk", k=3, rescale_acts_by_decoder_norm=True), _weights(2)),
    "jumprelu": (_cfg("jumprelu"), _weights(3, jumprelu=True)),
    "batchtopk (training form)": (_cfg("batchtopk", k=3), _weights(4, batchtopk=True)),
    "pre-6 topk": ({"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "hook_point": "blocks.2.hook_resid_post",
                    "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": False,
                    "normalize_activations": False, "model_name": "ViT-B-32"}, _weights(5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_saelens_folder_loads_and_encodes_as_saelens_does(case, tmp_path):
    cfg, weights = CASES[case]
    folder = _write(tmp_path / "sae", cfg, weights)
    sae = sae_lib.load(folder, tower="vision")
    assert sae.hook == "vision.blocks.2.hook_resid_post" and (sae.d_in, sae.n_latents) == (D_IN, D_SAE)
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(9))
    modern = {**cfg, "architecture": cfg.get("architecture", "topk"), "k": cfg.get("k", 4)}
    expected = _saelens_encode(modern, weights, x)
    torch.testing.assert_close(sae.encode(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), _saelens_decode(modern, weights, expected), atol=1e-5,
                               rtol=1e-5)
    assert (expected != 0).any() and (expected == 0).any()


@pytest.mark.parametrize("cls, kwargs", [(StandardSAE, {}), (TopKSAE, {"k": 3}), (JumpReLUSAE, {}),
                                         (BatchTopKSAE, {"k": 3})])
def test_ours_saved_in_saelens_layout_reload_identically(cls, kwargs, tmp_path):
    sae = cls(D_IN, D_SAE, **kwargs, hook="text.blocks.1.hook_resid_pre", seed=3)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(7)))
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.1)
    sae.eval()
    folder = sae_lib.save(sae, tmp_path / "out", layout="saelens", model_name="clip_lens/tiny-shapes")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre" and cfg["metadata"]["clip_lens_tower"] == "text"
    assert cfg["d_sae"] == D_SAE and cfg["architecture"] == ("jumprelu" if cls is BatchTopKSAE else sae.architecture)
    loaded = sae_lib.load(folder)                       # the tower comes back from the metadata
    assert loaded.hook == sae.hook
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded.decode(loaded.encode(x)), sae(x)[0])
    # and what was written is what SAELens computes from it
    from safetensors.torch import load_file
    torch.testing.assert_close(_saelens_encode(cfg, load_file(str(folder / "sae_weights.safetensors")), x),
                               sae.encode(x))


def test_load_recognises_either_layout_and_save_names_a_bad_one(tmp_path):
    sae = TopKSAE(D_IN, D_SAE, k=2, hook="vision.blocks.0.hook_resid_post")
    sae_lib.save(sae, tmp_path / "ours")
    assert isinstance(sae_lib.load(tmp_path / "ours"), TopKSAE)
    assert isinstance(sae_lib.load(tmp_path / "ours.json"), TopKSAE)
    with pytest.raises(ValueError, match="layout='hf'"):
        sae_lib.save(sae, tmp_path / "x", layout="hf")
    with pytest.raises(FileNotFoundError, match="no SAE at"):
        sae_lib.load(tmp_path / "nothing")


@pytest.mark.parametrize("change, message", [
    ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm' is not supported"),
    ({"reshape_activations": "hook_z"}, "reshape_activations='hook_z' is not supported"),
    ({"architecture": "gated"}, "architecture 'gated' is not one clip_lens computes"),
    ({"d_sae": 13}, r"d_in and n_latents imply W_enc of shape \[8, 13\]"),
    ({"d_in": "8"}, "d_in must be a positive integer, got '8'"),
    ({"dtype": "int8"}, "dtype 'int8' is not one of"),
    ({"finetuning_scaling_factor": True}, "finetuning_scaling_factor is set"),
    ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input must be true or false"),
])
def test_what_clip_lens_does_not_compute_is_refused_by_name(change, message, tmp_path):
    folder = _write(tmp_path / "sae", {**_cfg("standard"), **change}, _weights())
    with pytest.raises(ValueError, match=message):
        sae_lib.load(folder, tower="vision")


def test_a_hook_without_a_tower_needs_one(tmp_path):
    folder = _write(tmp_path / "sae", _cfg("standard"), _weights())
    with pytest.raises(ValueError, match="does not say which tower it reads; pass tower='vision'"):
        sae_lib.load(folder)
    with pytest.raises(ValueError, match="tower='image': use 'text' or 'vision'"):
        sae_lib.load(folder, tower="image")
    ours = sae_lib.save(TopKSAE(D_IN, D_SAE, k=2, hook="vision.blocks.0.hook_resid_post"), tmp_path / "o", layout="saelens")
    with pytest.raises(ValueError, match="trained on the vision tower"):
        sae_lib.load(ours, tower="text")
