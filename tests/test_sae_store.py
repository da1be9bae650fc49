"""The activation store (clip_lens.sae.store): written, resumed after a kill, read back equal to
activations computed directly; its reader covers every vector once per pass; bad input refused by name."""

import argparse
import json

import numpy as np
import pytest
import torch

from clip_lens.sae import store as store_module
from clip_lens.sae.store import ActivationStore, StoreError, fill_store, write_vectors

TEXTS = ["a red circle", "there is no blue square here", "two green triangles", "a yellow star",
         "no circle", "a big purple square next to a small red circle"]
VISION_HOOK, TEXT_HOOK = "vision.blocks.1.hook_resid_post", "text.blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def direct(model, inputs, hook):
    """[n, pos, d] activations of `hook` by run_with_cache, and the tokens (text) or None."""
    if hook.startswith("text."):
        tokens = model.to_tokens(inputs)
        _, cache = model.run_with_cache(text=tokens, names_filter=[hook])
        return cache[hook], tokens
    _, cache = model.run_with_cache(image=inputs, names_filter=[hook])
    return cache[hook], None


def read_all(folder):
    store = ActivationStore(folder, verify=True)
    vectors = torch.cat([torch.from_numpy(store.read_shard(i).astype(np.float32)) for i in range(len(store.records))])
    origins = np.concatenate([store.origins(i) for i in range(len(store.records))])
    return store, vectors, origins


@pytest.mark.parametrize("hook", [VISION_HOOK, TEXT_HOOK])
@pytest.mark.parametrize("positions", ["pooled", "all", 3])
def test_store_equals_run_with_cache(tiny_model, pixels, tmp_path, hook, positions):
    inputs = TEXTS if hook.startswith("text.") else pixels
    per_input = {"pooled": 1, "all": None, 3: 3}[positions]
    shard_size = 64 if per_input is None and hook.startswith("text.") else 2 * (per_input or tiny_model.vision.cfg.n_ctx)
    fill_store(tiny_model, inputs, hook, tmp_path, positions=positions, shard_size=shard_size, batch_size=4,
               progress=False)
    store, vectors, origins = read_all(tmp_path)
    acts, tokens = direct(tiny_model, inputs, hook)
    expected_origins = []
    for i in range(len(inputs)):
        length = acts.shape[1] if tokens is None else int(tiny_model.text.pooled_positions(tokens[i:i + 1])) + 1
        pooled = 0 if tokens is None else length - 1
        wanted = {"pooled": [pooled], "all": list(range(length))}.get(positions)
        chosen = origins[origins[:, 0] == i, 1]
        if wanted is None:
            assert len(chosen) == 3 and len(set(chosen)) == 3 and chosen.max() < length
            wanted = chosen.tolist()
        assert chosen.tolist() == wanted
        expected_origins += [(i, p) for p in wanted]
    assert origins.tolist() == [list(o) for o in expected_origins]
    expected = acts[torch.as_tensor(origins[:, 0]), torch.as_tensor(origins[:, 1])]
    # shards split the inputs into other batches than the direct run: float32 rounding differs, slightly
    torch.testing.assert_close(vectors, expected, rtol=1e-5, atol=1e-5)
    assert len(store) == len(expected) and store.d == acts.shape[-1]
    assert torch.equal(store.vectors(np.arange(len(store))), vectors)


def test_sampled_positions_are_seeded(tiny_model, pixels, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        fill_store(tiny_model, pixels, VISION_HOOK, tmp_path / name, positions=4, shard_size=8, seed=seed,
                   progress=False)
    a, b, c = (read_all(tmp_path / n)[2] for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


class Killed(Exception):
    pass


def test_killed_fill_resumes_and_equals_an_uninterrupted_fill(tiny_model, pixels, tmp_path, monkeypatch):
    kwargs = dict(positions="all", shard_size=tiny_model.vision.cfg.n_ctx, batch_size=2, progress=False)
    full = fill_store(tiny_model, pixels, VISION_HOOK, tmp_path / "full", **kwargs)
    assert full.complete and full.written == list(range(6))

    real, calls = store_module.Inputs.tensor, []

    def dies_after_three_shards(self, model, start, stop):
        calls.append(start)
        if len(calls) > 4:  # the probe's forward, then one batch per shard: dies while computing shard 3
            raise Killed
        return real(self, model, start, stop)

    monkeypatch.setattr(store_module.Inputs, "tensor", dies_after_three_shards)
    with pytest.raises(Killed):
        fill_store(tiny_model, pixels, VISION_HOOK, tmp_path / "killed", **kwargs)
    monkeypatch.setattr(store_module.Inputs, "tensor", real)
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert manifest["shards_written"] == 3 and not manifest["complete"]
    with pytest.raises(StoreError, match="incomplete store"):
        ActivationStore(tmp_path / "killed")

    seen = []
    monkeypatch.setattr(store_module.Inputs, "tensor", lambda self, m, a, b: seen.append(a) or real(self, m, a, b))
    resumed = fill_store(tiny_model, pixels, VISION_HOOK, tmp_path / "killed", **kwargs)
    assert resumed.kept == [0, 1, 2] and resumed.written == [3, 4, 5] and resumed.complete
    assert seen == [0, 3, 4, 5]  # the probe, then only the missing shards' inputs
    for name in sorted(p.name for p in (tmp_path / "full").iterdir() if p.suffix == ".npy"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
    assert not list((tmp_path / "killed").glob(".*.tmp"))


def test_shard_ranges_filled_separately_make_one_store(tiny_model, pixels, tmp_path):
    kwargs = dict(positions="pooled", shard_size=2, progress=False)
    first = fill_store(tiny_model, pixels, VISION_HOOK, tmp_path, shards=range(0, 2), **kwargs)
    assert first.written == [0, 1] and not first.complete
    second = fill_store(tiny_model, pixels, VISION_HOOK, tmp_path, shards=range(2, 3), **kwargs)
    assert second.written == [2] and second.complete
    acts, _ = direct(tiny_model, pixels, VISION_HOOK)
    torch.testing.assert_close(read_all(tmp_path)[1], acts[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_cover_each_vector_once_per_pass(tmp_path, shuffle):
    vectors = torch.arange(1000 * 3, dtype=torch.float32).reshape(1000, 3)
    write_vectors(vectors.split(77), tmp_path, shard_size=64)
    store = ActivationStore(tmp_path)
    assert len(store) == 1000 and len(store.records) == 16
    for seed in (0, 1):
        batches = list(store.batches(50, shuffle=shuffle, seed=seed, buffer_shards=3))
        assert all(b.dtype == torch.float32 and b.shape[1] == 3 for b in batches)
        assert [len(b) for b in batches] == [50] * 20
        seen = torch.cat(batches)
        assert torch.equal(seen[seen[:, 0].argsort()], vectors)
        if not shuffle:
            assert torch.equal(seen, vectors)
    orders = [torch.cat(list(store.batches(50, seed=s)))[:, 0] for s in (0, 0, 1)]
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])
    assert [len(b) for b in store.batches(300, shuffle=shuffle)] == [300, 300, 300, 100]
    assert torch.equal(store.vectors([999, 0, 64]), vectors[[999, 0, 64]])


def test_float16_store_reads_back_as_float32(tmp_path):
    vectors = torch.randn(100, 8)
    write_vectors([vectors], tmp_path, shard_size=30, dtype="float16")
    batch = torch.cat(list(ActivationStore(tmp_path).batches(100, shuffle=False)))
    assert batch.dtype == torch.float32 and torch.equal(batch, vectors.half().float())


@pytest.mark.parametrize("hook, kwargs, message", [
    ("blocks.1.hook_resid_post", {}, "no tower prefix"),
    ("vision.blocks.9.hook_resid_post", {}, "unknown hook 'vision.blocks.9.hook_resid_post'"),
    ("text.blocks.1.hook_resid_post", {}, "in the text tower, but the inputs are vision"),
    ("vision.blocks.1.attn.hook_pattern", {}, "a store holds vectors"),
    (VISION_HOOK, {"positions": "all", "shard_size": 100}, "shard_size=100 is not a multiple of the 65 vectors"),
    (VISION_HOOK, {"positions": 3, "shard_size": 10}, "shard_size=10 is not a multiple of the 3 vectors"),
    (VISION_HOOK, {"positions": 0}, "positions must be"),
    (VISION_HOOK, {"positions": 66}, "has 65 positions"),
    (VISION_HOOK, {"dtype": "int8"}, "dtype must be"),
    (VISION_HOOK, {"shards": [7]}, "shard 7 is outside"),
])
def test_bad_input_is_refused_by_name(tiny_model, pixels, tmp_path, hook, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        fill_store(tiny_model, pixels, hook, tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "manifest.json").exists()


def test_bad_text_inputs_are_refused_by_line(tiny_model, tmp_path):
    (tmp_path / "texts.txt").write_text("a red circle\n\na blue square\n")
    with pytest.raises(ValueError, match="texts.txt line 2 is blank"):
        fill_store(tiny_model, tmp_path / "texts.txt", TEXT_HOOK, tmp_path / "s", progress=False)
    (tmp_path / "texts.txt").write_text("a red circle\nno\n")
    with pytest.raises(ValueError, match=r"texts.txt line 2 \('no'\) has 3 positions"):
        fill_store(tiny_model, tmp_path / "texts.txt", TEXT_HOOK, tmp_path / "s", positions=4, shard_size=4,
                   progress=False)
    with pytest.raises(FileNotFoundError, match="inputs not found"):
        fill_store(tiny_model, tmp_path / "missing.txt", TEXT_HOOK, tmp_path / "s", progress=False)


def test_a_folder_of_another_store_is_refused_naming_what_differs(tiny_model, pixels, tmp_path):
    fill_store(tiny_model, pixels, VISION_HOOK, tmp_path, shard_size=2, progress=False)
    with pytest.raises(StoreError, match=r"hook: the store has 'vision.blocks.1.hook_resid_post', this fill "
                                         r"'vision.blocks.0.hook_resid_post'"):
        fill_store(tiny_model, pixels, "vision.blocks.0.hook_resid_post", tmp_path, shard_size=2, progress=False)
    with pytest.raises(StoreError, match="seed: the store has 0, this fill 1"):
        fill_store(tiny_model, pixels, VISION_HOOK, tmp_path, shard_size=2, seed=1, progress=False)
    with pytest.raises(StoreError, match="source: "):
        fill_store(tiny_model, pixels + 1, VISION_HOOK, tmp_path, shard_size=2, progress=False)
    with pytest.raises(StoreError, match="already holds an activation store"):
        write_vectors([torch.zeros(4, 64)], tmp_path, shard_size=2)


def test_a_corrupted_shard_is_refused_by_the_reader_and_recomputed_by_a_fill(tiny_model, pixels, tmp_path):
    fill_store(tiny_model, pixels, VISION_HOOK, tmp_path, shard_size=2, progress=False)
    good = (tmp_path / "shard_00001.npy").read_bytes()
    damaged = bytearray(good)
    damaged[-1] ^= 0xFF
    (tmp_path / "shard_00001.npy").write_bytes(bytes(damaged))
    with pytest.raises(StoreError, match="shard 1: .*shard_00001.npy does not match its SHA-256"):
        ActivationStore(tmp_path, verify=True)
    with pytest.warns(UserWarning, match="shard 1 is recomputed"):
        result = fill_store(tiny_model, pixels, VISION_HOOK, tmp_path, shard_size=2, progress=False)
    assert result.written == [1] and result.kept == [0, 2]
    assert (tmp_path / "shard_00001.npy").read_bytes() == good
    (tmp_path / "shard_00002.npy").write_bytes(good[:-4])
    with pytest.raises(StoreError, match="shard 2: .*shard_00002.npy holds|shard 2: .*truncated"):
        ActivationStore(tmp_path)


def test_cache_activations_command(tiny_model, tmp_path, capsys):
    from clip_lens.cli import sae as sae_cli

    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    parser = argparse.ArgumentParser()
    sae_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cache-activations", "--texts", str(tmp_path / "texts.txt"), "--hook", TEXT_HOOK,
                              "--model", "clip_lens/tiny-shapes", "--out", str(tmp_path / "store"), "--quiet"])
    assert args.func(args) == 0
    assert "6 vectors of width 64" in capsys.readouterr().out
    acts, _ = direct(tiny_model, TEXTS, TEXT_HOOK)
    tokens = tiny_model.to_tokens(TEXTS)
    expected = acts[torch.arange(len(TEXTS)), tiny_model.text.pooled_positions(tokens)]
    torch.testing.assert_close(read_all(tmp_path / "store")[1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_fill_on_ray_workers_equals_one_in_a_single_process(tmp_path, tiny_model):
    """Two Ray workers, each its own range of shards, write the store a single process writes."""
    pytest.importorskip("ray")
    from clip_lens.model_sources import ModelSource
    from clip_lens.sae.store import fill_store
    from clip_lens.sweep.activation_store import fill_store_on_ray

    texts = [f"there is {'no' if i % 3 else 'a'} red circle number {i}" for i in range(24)]
    hook = "text.blocks.1.hook_resid_post"
    fill_store(tiny_model, texts, hook, tmp_path / "one", positions="pooled", shard_size=4, progress=False)
    result = fill_store_on_ray(ModelSource("clip_lens/tiny-shapes"), texts, hook, tmp_path / "ray", workers=2,
                               positions="pooled", shard_size=4, progress=False)
    assert result.complete and result.written == list(range(6)) and result.kept == []
    for shard in sorted((tmp_path / "one").glob("shard_*.npy")):
        assert shard.read_bytes() == (tmp_path / "ray" / shard.name).read_bytes(), shard.name
