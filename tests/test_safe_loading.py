"""Loaded files never run code, and data files cannot point outside their image folder."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_hf_config, write_noise_images

import clip_lens
from clip_lens import tiny
from clip_lens.data.image_sets import load_image_folder
from clip_lens.data.valse import load_valse, prepare_existence, resolve_images
from clip_lens.sae import train_sae


class Planted:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path, **extra) -> Path:
    torch.save({"payload": Planted(marker), **extra}, path)
    return path


def test_the_planted_file_does_run_code_when_unpickled_unsafely(tmp_path):
    """The control: without weights_only the payload runs (so the tests below can fail)."""
    marker = tmp_path / "ran"
    torch.load(_plant(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


def test_sae_resume_refuses_a_planted_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "ckpt").mkdir()
    _plant(tmp_path / "ckpt" / "checkpoint.pt", marker)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        train_sae(torch.randn(64, 8), n_latents=4, k=2, steps=2, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert not marker.exists()


def test_a_checkpoint_file_for_open_clip_is_loaded_without_pickle_code(tmp_path):
    marker = tmp_path / "ran"
    _plant(tmp_path / "weights.pt", marker)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        clip_lens.HookedCLIP.from_pretrained(tiny.register(), pretrained=tmp_path / "weights.pt")
    assert not marker.exists()


def test_a_huggingface_folder_with_a_planted_bin_runs_no_code(tmp_path):
    pytest.importorskip("transformers")
    config = tiny_hf_config()
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    marker = tmp_path / "ran"
    _plant(folder / "pytorch_model.bin", marker)
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; what matters is that no code ran
        clip_lens.HookedCLIP.from_huggingface(folder)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "sub/../../outside.png"])
def test_valse_image_files_stay_in_the_image_folder(tmp_path, name, tiny_model):
    images = write_noise_images(["v7w_1.jpg"], tmp_path / "images")
    write_noise_images(["outside.png"], tmp_path)
    valse = tmp_path / "existence.json"
    entry = {"caption": "There is a cat.", "foil": "There is no cat.", "image_file": name,
             "mturk": {"caption": 3}}
    valse.write_text(json.dumps({"7": entry}))
    pairs = prepare_existence(load_valse(valse), tiny_model.to_tokens).pairs
    with pytest.raises(ValueError, match=f"VALSE instance 7: image file '{name}' lies outside the image folder"):
        resolve_images(pairs, images)


def test_labels_files_stay_in_the_image_folder(tmp_path):
    folder = write_noise_images(["a.png"], tmp_path / "images")
    write_noise_images(["secret.png"], tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\na.png,cat\n../secret.png,dog\n")
    with pytest.raises(ValueError, match=r"labels.csv, row 2: image file '../secret.png' lies outside"):
        load_image_folder(folder, labels)


def test_a_corrupt_image_is_named(tmp_path, tiny_model):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="Cannot read .*broken.jpg as an image"):
        tiny_model.to_pixels([bad])
