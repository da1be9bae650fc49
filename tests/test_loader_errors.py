"""Loaders that name every problem (issue 27): sizes in a file's metadata checked against the file
before anything is allocated, pairs files read without guessing, malformed captioner and Hugging
Face directories refused by name, `EdgeScores.top` bounded by the graph, and `hooks()` entered
so that an interrupt at any step leaves the context level as it was."""

from __future__ import annotations

import sys

import pytest


# hooks(): an interrupt at every step of entering ----------------------------------------------------
def _entry_lines(model) -> int:
    """How many line events the `hooks()` generator runs until it yields."""
    code, count = type(model).hooks.__wrapped__.__code__, [0]

    def trace(frame, event, arg):
        if frame.f_code is not code:
            return None

        def local(frame, event, arg):
            if event == "line":
                count[0] += 1
            return local
        return local

    sys.settrace(trace)
    try:
        with model.hooks():
            sys.settrace(None)
    finally:
        sys.settrace(None)
    return count[0]


def _enter_interrupted_at(model, k: int, fwd_hooks) -> None:
    """Enter `model.hooks(fwd_hooks)` with a KeyboardInterrupt raised at its k-th line event."""
    code, count = type(model).hooks.__wrapped__.__code__, [0]

    def trace(frame, event, arg):
        if frame.f_code is not code:
            return None

        def local(frame, event, arg):
            if event == "line":
                count[0] += 1
                if count[0] == k:
                    raise KeyboardInterrupt
            return local
        return local

    sys.settrace(trace)
    try:
        with model.hooks(fwd_hooks=fwd_hooks):
            sys.settrace(None)
            raise AssertionError("the block was entered: no interrupt was injected")
    finally:
        sys.settrace(None)


def test_an_interrupt_at_every_step_of_entering_hooks_leaves_the_level_and_no_hook(tiny_model):
    tower = tiny_model.vision
    fwd_hooks = [("blocks.0.hook_resid_post", lambda x, hook: x)]
    n = _entry_lines(tower)
    assert n >= 3
    for k in range(1, n + 1):
        with pytest.raises(KeyboardInterrupt):
            _enter_interrupted_at(tower, k, fwd_hooks)
        assert tower.context_level == 0, f"interrupt at line event {k} of {n} left the level at {tower.context_level}"
        assert not any(m._forward_hooks for m in tower.modules()), f"interrupt at line event {k} left a hook"
    with tower.hooks(fwd_hooks=fwd_hooks):  # still usable, and levels still nest
        assert tower.context_level == 1
    assert tower.context_level == 0


# EdgeScores.top: never an edge off the graph --------------------------------------------------------
def _edge_scores(graph):
    import torch

    from clip_lens.circuits import EdgeScores

    scores = torch.where(graph.valid, torch.rand(graph.valid.shape, generator=torch.Generator().manual_seed(0)),
                         torch.tensor(float("nan")))
    return EdgeScores(graph, scores, "eap", 1, None, baseline=torch.zeros(2), corrupted=torch.ones(2))


@pytest.mark.parametrize("signed", [False, True])
def test_edge_scores_top_returns_at_most_the_graphs_edges(signed):
    from clip_lens.circuits.graph import Graph

    graph = Graph(2, 2)
    scores = _edge_scores(graph)
    for n in (graph.n_edges, graph.n_edges + 1, graph.n_edges * 10):
        top = scores.top(n, signed=signed)
        assert len(top) == graph.n_edges
        assert all(bool(graph.valid[s, r]) for s, r in top)
        assert len(set(top)) == len(top)
    assert scores.top(0, signed=signed) == []


@pytest.mark.parametrize("n", [-1, 1.5, "3", None])
def test_edge_scores_top_refuses_a_count_that_is_not_a_non_negative_integer(n):
    from clip_lens.circuits.graph import Graph

    with pytest.raises(ValueError, match=r"n="):
        _edge_scores(Graph(1, 1)).top(n)


# pairs files: read without guessing, every problem named by file and line ---------------------------
def _tokenize(texts):
    """A word tokenizer (ids from each word's characters, EOT the largest id), padded to 40."""
    import torch

    ids = torch.zeros(len(texts), 40, dtype=torch.long)
    for i, text in enumerate(texts):
        codes = [1 + sum(map(ord, word)) % 900 for word in text.split()[:38]]
        ids[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        ids[i, len(codes)] = 1000
    return ids


def _read(path):
    from clip_lens.data import read_pairs_file

    return read_pairs_file(path, _tokenize)


BAD_PAIRS = {  # file name, bytes, what the error must say
    "unquoted comma": ("p.csv", b"caption,foil\nthe red dog.,the blue dog.\na dog, big.,a cat.\n", r"p\.csv, line 3: 3 fields"),
    "unquoted comma on every row": ("p.csv", b"caption,foil\na dog, big.,a cat.\na cat, big.,a dog.\n",
                                    r"p\.csv, line 2: 3 fields.*must be quoted"),
    "unterminated quote": ("p.csv", b'caption,foil\n"a dog.,a cat.\n', r"p\.csv, line \d+: not valid CSV"),
    "latin-1 csv": ("p.csv", "caption,foil\na caf\u00e9.,a bar.\n".encode("latin-1"), r"p\.csv, line 2: not UTF-8.*UTF-8"),
    "empty csv": ("p.csv", b"", r"p\.csv holds no pairs"),
    "header only csv": ("p.csv", b"caption,foil\n", r"p\.csv holds no pairs"),
    "repeated column": ("p.csv", b"caption,foil,foil\na,b,c\n", r"p\.csv, line 1: .*'foil' more than once"),
    "bad jsonl line": ("p.jsonl", b'{"caption": "a dog.", "foil": "a cat."}\n{"caption": "a dog.", \n',
                       r"p\.jsonl, line 2: not valid JSON"),
    "jsonl line not an object": ("p.jsonl", b'{"caption": "a dog.", "foil": "a cat."}\n["a", "b"]\n',
                                 r"p\.jsonl, line 2: expected a JSON object"),
    "empty jsonl": ("p.jsonl", b"\n\n", r"p\.jsonl holds no pairs"),
}


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_a_malformed_pairs_file_is_named_with_its_line(tmp_path, case):
    name, content, message = BAD_PAIRS[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        _read(tmp_path / name)


def test_a_folder_given_as_a_pairs_file_is_named(tmp_path):
    (tmp_path / "p.csv").mkdir()
    with pytest.raises(ValueError, match=r"p\.csv is a folder, not a pairs file"):
        _read(tmp_path / "p.csv")


@pytest.mark.parametrize("name, content", [
    ("bom.jsonl", b'\xef\xbb\xbf{"caption": "the red dog.", "foil": "the blue dog."}\n'),
    ("bom.csv", b"\xef\xbb\xbfcaption,foil\nthe red dog.,the blue dog.\n"),
    ("utf16.csv", "caption,foil\nthe red dog.,the blue dog.\n".encode("utf-16")),
    ("quoted.csv", b'caption,foil\n"the red dog, big.","the blue dog, big."\n'),
    ("crlf.csv", b"caption,foil\r\nthe red dog.,the blue dog.\r\n\r\n"),
    ("line_separator.jsonl", '{"caption": "the red\u2028dog.", "foil": "the blue\u2028dog."}\n'.encode()),
])
def test_a_pairs_file_with_a_bom_utf16_or_quoted_commas_is_read(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    pairs = _read(tmp_path / name)
    assert len(pairs.pairs) == 1 and pairs.pairs["a"].iloc[0].startswith("the red")
    assert pairs.pairs["b"].iloc[0].startswith("the blue")


def test_csv_values_are_kept_as_written(tmp_path):
    (tmp_path / "p.csv").write_text("id,caption,foil\n007,the red dog.,the blue dog.\n")
    assert _read(tmp_path / "p.csv").pairs["id"].tolist() == ["007"]


def test_the_cli_reports_a_malformed_pairs_file_in_one_line(tmp_path, capsys):
    from clip_lens.cli import main

    (tmp_path / "p.csv").write_bytes(BAD_PAIRS["unquoted comma"][1])
    assert main(["pairs", "heads", "--model", "clip_lens/tiny-shapes", "--pairs", str(tmp_path / "p.csv"),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "p.csv, line 3: 3 fields" in err and "Traceback" not in err


# sizes in a file's metadata checked against the file before anything is allocated -------------------
BIG = 10_000_000  # elements: more than any weight of the tiny files below


class _NoBigTensors:
    """Within it, creating tensors of more than BIG elements in all anywhere but on the meta device
    is an AssertionError, raised before the memory is taken (each size is found on the meta device)."""

    def __enter__(self):
        import torch
        from torch.overrides import TorchFunctionMode

        factories = {torch.empty, torch.zeros, torch.ones, torch.randn, torch.rand, torch.full}
        total = [0]

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in factories and str(kwargs.get("device", "cpu")) != "meta":
                    probe = {k: v for k, v in kwargs.items() if k != "generator"}
                    total[0] += func(*args, **{**probe, "device": "meta"}).numel()
                    assert total[0] <= BIG, f"{func.__name__}: {total[0]:,} elements in all"
                return func(*args, **kwargs)

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_the_allocation_guard_catches_a_big_tensor_and_lets_small_ones_through():
    import torch

    with _NoBigTensors():
        assert torch.zeros(3).sum() == 0
        with torch.device("meta"):
            torch.nn.Linear(10_000, 10_000)
            torch.empty(BIG * 10)
        with pytest.raises(AssertionError, match="elements"):
            torch.nn.Linear(10_000, 10_000)


def _captioner_file(path, config: dict, tensors=None):
    """A safetensors file with a prefix captioner's metadata holding `config` (a dict, or a text
    written as is) and `tensors` (default: the weights of a tiny captioner)."""
    import json

    import torch
    from safetensors.torch import save_file

    from clip_lens.captioning import PrefixCaptioner, PrefixConfig
    from clip_lens.captioning.prefix import FORMAT

    if tensors is None:
        tiny = PrefixCaptioner(PrefixConfig(**TINY_CAPTIONER))
        tensors = {k: v.detach().contiguous() for k, v in tiny.state_dict().items()}
    text = config if isinstance(config, str) else json.dumps(config)
    save_file(tensors or {"x": torch.zeros(1)}, str(path), metadata={"format": FORMAT, "config": text})
    return path


TINY_CAPTIONER = dict(d_embed=8, words=["a", "red", "dog"], prefix_length=2, d_model=16, n_layers=1, n_heads=2,
                      max_new_tokens=3, clip="")


def test_a_tiny_captioner_file_round_trips_under_the_guard(tmp_path):
    from clip_lens.captioning import PrefixCaptioner

    with _NoBigTensors():
        loaded = PrefixCaptioner.load(_captioner_file(tmp_path / "c.safetensors", TINY_CAPTIONER))
    assert loaded.cfg.d_model == 16


@pytest.mark.parametrize("change, tensors, message", [
    (dict(d_model=2048), {}, r"n_layers .* is 1, but the file holds the weights of 0 layers"),
    (dict(d_model=2048), None, r"field d_model in its metadata disagrees with the file: .* is \[64\] in the file"),
    (dict(n_layers=100_000), None, r"n_layers in its metadata is 100000, but the file holds the weights of 1 layers"),
    (dict(max_new_tokens=10**9), None, r"field max_new_tokens in its metadata disagrees"),
    (dict(prefix_length=10**6), None, r"prefix_length.* in its metadata disagrees"),
    (dict(d_embed=10**8), None, r"field d_embed in its metadata disagrees"),
    (dict(words=[f"w{i}" for i in range(100_000)]), None, r"field words in its metadata disagrees"),
])
def test_captioner_sizes_are_checked_against_the_file_before_any_allocation(tmp_path, change, tensors, message):
    from clip_lens.captioning import PrefixCaptioner

    path = _captioner_file(tmp_path / "c.safetensors", {**TINY_CAPTIONER, **change}, tensors)
    with _NoBigTensors(), pytest.raises(ValueError, match=r"c\.safetensors: .*" + message):
        PrefixCaptioner.load(path)


@pytest.mark.parametrize("config, message", [
    ("{not json", r"the config in its metadata is not JSON"),
    ("[1, 2]", r"the config in its metadata is a list, not an object"),
    ({k: v for k, v in TINY_CAPTIONER.items() if k != "d_embed"}, r"lacks d_embed"),
    ({**TINY_CAPTIONER, "dropout": 0.1}, r"has unknown keys dropout"),
    ({**TINY_CAPTIONER, "d_model": "16"}, r"field d_model .* must be a positive integer, got '16'"),
    ({**TINY_CAPTIONER, "n_layers": 1.0}, r"field n_layers .* must be a positive integer, got 1\.0"),
    ({**TINY_CAPTIONER, "n_heads": True}, r"field n_heads .* must be a positive integer, got True"),
    ({**TINY_CAPTIONER, "words": "a red dog"}, r"field words .* must be a list of texts"),
    ({**TINY_CAPTIONER, "words": ["a", 3]}, r"field words .* must be a list of texts"),
    ({**TINY_CAPTIONER, "clip": 5}, r"field clip .* must be a text"),
    ({**TINY_CAPTIONER, "n_heads": 3}, r"not divisible by n_heads 3"),
])
def test_malformed_captioner_metadata_is_named(tmp_path, config, message):
    from clip_lens.captioning import PrefixCaptioner

    path = _captioner_file(tmp_path / "c.safetensors", config)
    with pytest.raises(ValueError, match=r"c\.safetensors: .*" + message):
        PrefixCaptioner.load(path)


def _sae_files(folder, config: str, shapes: dict):
    import torch
    from safetensors.torch import save_file

    (folder / "sae.json").write_text(config)
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(folder / "sae.safetensors"))
    return folder / "sae"


SAE_SHAPES = {"W_dec": (6, 4), "W_enc": (4, 6), "b_enc": (6,), "b_dec": (4,)}


def test_a_tiny_sae_round_trips_under_the_guard(tmp_path):
    from clip_lens.sae import TopKSAE

    with _NoBigTensors():
        sae = TopKSAE.load(_sae_files(tmp_path, '{"d_in": 4, "n_latents": 6, "k": 2, "hook": null}', SAE_SHAPES))
    assert sae.config() == {"d_in": 4, "n_latents": 6, "k": 2, "hook": None}


@pytest.mark.parametrize("config, message", [
    ('{"d_in":100000,"n_latents":100000,"k":1}', r"sae\.json's d_in and n_latents imply W_dec of shape \[100000, 100000\], "
                                               r"but .*sae\.safetensors holds \[6, 4\]"),
    ('{"d_in": 4, "n_latents": 6}', r"sae\.json: the SAE config lacks k"),
    ('{"d_in": 4, "n_latents": 6, "k": 2, "device": "cuda"}', r"sae\.json: the SAE config has unknown keys device"),
    ('{"d_in": "4", "n_latents": 6, "k": 2}', r"sae\.json: d_in must be a positive integer, got '4'"),
    ('{"d_in": 4, "n_latents": 6, "k": 7}', r"sae\.json: k=7 must lie in 1\.\.n_latents=6"),
    ('{"d_in": 4, "n_latents": 6, "k": 2, "hook": 3}', r"sae\.json: hook must be a hook name or null"),
    ('[4, 6, 2]', r"sae\.json: an SAE config is a JSON object, not a list"),
    ('{"d_in": 4,', r"sae\.json is not a JSON SAE config"),
])
def test_sae_config_is_checked_by_key_and_against_the_weights_before_any_allocation(tmp_path, config, message):
    from clip_lens.sae import TopKSAE

    path = _sae_files(tmp_path, config, SAE_SHAPES)
    with _NoBigTensors(), pytest.raises(ValueError, match=message):
        TopKSAE.load(path)


def test_sae_weights_with_other_tensors_are_named(tmp_path):
    from clip_lens.sae import TopKSAE

    path = _sae_files(tmp_path, '{"d_in": 4, "n_latents": 6, "k": 2}', {"W_dec": (6, 4)})
    with pytest.raises(ValueError, match=r"sae\.safetensors holds tensors \['W_dec'\], an SAE has"):
        TopKSAE.load(path)


# Hugging Face directories: what is missing, named ----------------------------------------------------
@pytest.mark.parametrize("files, message", [
    ({}, r"empty has no config\.json: a Hugging Face model directory holds config\.json"),
    ({"model.safetensors": b"x"}, r"empty has no config\.json"),
    ({"config.json": b"{not json"}, r"config\.json is not JSON"),
    ({"config.json": b"[]"}, r"config\.json names no model_type"),
    ({"config.json": b'{"model_type": "clip"}'}, r"empty holds no weights: expected model\.safetensors"),
])
def test_a_hugging_face_directory_missing_its_config_or_weights_is_named(tmp_path, files, message):
    import clip_lens
    from clip_lens.captioning import load_captioner

    folder = tmp_path / "empty"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        clip_lens.HookedCLIP.from_huggingface(folder)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        load_captioner(folder)


def _vision_encoder_decoder_folder(folder, tokens: dict):
    """A tiny CLIP-encoder + GPT-2 captioner saved in `folder`, its special token ids set to
    `tokens` (in config.json, the decoder's config and generation_config.json)."""
    import torch
    from transformers import CLIPVisionConfig, GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    torch.manual_seed(0)
    enc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8)
    dec = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=12, n_positions=16, add_cross_attention=True,
                     is_decoder=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
    for holder in (model.config, model.generation_config):
        for key in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(holder, key, tokens.get(key))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tokens, message", [
    ({}, r"names no decoder start token and no end token"),
    ({"decoder_start_token_id": 0}, r"names no end token"),
    ({"decoder_start_token_id": 0, "eos_token_id": 99}, r"end token eos_token_id in its generation_config\.json is 99: "
                                                        r"give a token id in 0\.\.11"),
    ({"decoder_start_token_id": -1, "eos_token_id": 1}, r"start token decoder_start_token_id .* is -1"),
])
def test_a_captioner_directory_without_valid_start_and_end_tokens_is_named(tmp_path, tokens, message):
    import warnings

    from clip_lens.captioning import load_captioner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = _vision_encoder_decoder_folder(tmp_path / "ved", tokens)
        with pytest.raises(ValueError, match=r"ved:? " + message):
            load_captioner(folder)
