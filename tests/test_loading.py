"""Acceptance 4 and 5 of the hooked-CLIP issue: checkpoints the tests write load through the real
`from_pretrained` paths with parity; hub tags fail fast offline; unsupported towers are named."""

import time

import open_clip
import pytest
import torch
from conftest import SENTENCES, random_pixels, shared_pair
from safetensors.torch import save_file

import clip_lens
from clip_lens.loading import UnsupportedArchitecture, hub_reachable


def assert_same_outputs(reference: clip_lens.HookedCLIP, loaded: clip_lens.HookedCLIP):
    tokens, pixels = reference.to_tokens(SENTENCES), random_pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(text=tokens, image=pixels), reference(text=tokens, image=pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_file_loads_with_parity(tmp_path, suffix):
    oc, hooked = shared_pair("ViT-B-32")
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in oc.state_dict().items()}
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    loaded = clip_lens.HookedCLIP.from_pretrained("ViT-B-32", pretrained=path)
    assert loaded.name == "ViT-B-32"
    assert_same_outputs(hooked, loaded)


def _fake_hub_cache(cache_dir, repo_id: str, filename: str, state: dict) -> None:
    """A Hugging Face hub cache holding one file, laid out as huggingface_hub writes it."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.save(state, snapshot / filename)


def test_pretrained_tag_loads_from_local_cache_offline(tmp_path, monkeypatch):
    oc, hooked = shared_pair("ViT-B-32")
    _fake_hub_cache(tmp_path, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_pytorch_model.bin", oc.state_dict())
    monkeypatch.setattr("clip_lens.loading.hub_reachable", lambda *a, **k: pytest.fail("must not probe the hub"))
    loaded = clip_lens.HookedCLIP.from_pretrained("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert_same_outputs(hooked, loaded)


def test_uncached_tag_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"(?s)not in the local cache.*checkpoint file.*cache_dir.*from_huggingface"):
        clip_lens.HookedCLIP.from_pretrained("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5


def test_unknown_tags_and_names_are_named():
    with pytest.raises(ValueError, match=r"'no-such-tag'.*Known tags: \[.*'openai'"):
        clip_lens.HookedCLIP.from_pretrained("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(ValueError, match="ViT-Q-99"):
        clip_lens.HookedCLIP.from_pretrained("ViT-Q-99")


def test_random_weights_by_name():
    model = clip_lens.HookedCLIP.from_pretrained("ViT-B-32")
    assert model.text.cfg.n_layers == 12 and model.vision.cfg.patch_size == (32, 32)
    assert not model.training


def test_resnet_image_tower_is_rejected():
    with pytest.raises(UnsupportedArchitecture, match="ResNet image towers"):
        clip_lens.HookedCLIP.from_open_clip(open_clip.create_model("RN50"))


def test_attentional_pooler_is_rejected():
    with pytest.raises(UnsupportedArchitecture, match="attentional poolers"):
        clip_lens.HookedCLIP.from_open_clip(open_clip.create_model("coca_ViT-B-32"))


def test_custom_attention_blocks_are_rejected():
    oc = open_clip.model.CLIP(
        embed_dim=16, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16, qk_norm=True),
        text_cfg=dict(width=32, heads=2, layers=1),
    )
    with pytest.raises(UnsupportedArchitecture, match="Image tower: custom attention blocks"):
        clip_lens.HookedCLIP.from_open_clip(oc)


def test_huggingface_text_tower_is_rejected():
    from open_clip.hf_model import HFTextEncoder

    oc = open_clip.model.CustomTextCLIP(
        embed_dim=16, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=dict(width=32, heads=2, layers=1),
    )
    hf_text = HFTextEncoder.__new__(HFTextEncoder)  # an HF tower needs hub files to build; its type is what matters
    torch.nn.Module.__init__(hf_text)
    oc.text = hf_text
    with pytest.raises(UnsupportedArchitecture, match="Hugging Face text towers"):
        clip_lens.HookedCLIP.from_open_clip(oc)


def test_missing_huggingface_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        clip_lens.HookedCLIP.from_huggingface(tmp_path / "nowhere")


def test_from_pretrained_reads_open_clip_on_the_host_and_moves_the_hooked_model_once(monkeypatch):
    """open_clip's model is only read: it stays on the host, and the hooked model alone goes to the
    device (before, open_clip was built on the device, copied back to the host, and then moved again)."""
    from clip_lens import loading, tiny

    asked = []
    real = loading.create_open_clip
    monkeypatch.setattr(loading, "create_open_clip", lambda *a, **k: asked.append(a[3]) or real(*a, **k))
    model = clip_lens.HookedCLIP.from_pretrained(tiny.NAME, device="meta")
    assert asked == ["cpu"]
    assert {p.device.type for p in model.parameters()} == {"meta"}
