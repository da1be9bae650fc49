"""clip_lens.captioning: decoding on planted next-token functions, the Hugging Face
vision-encoder-decoder adapter against transformers itself, and the prefix captioner's files."""

import pytest
import torch
from transformers import CLIPVisionConfig, GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

from clip_lens import UnsupportedArchitecture, value_only_attention
from clip_lens.captioning import HuggingFaceCaptioner, PrefixCaptioner, PrefixConfig, Special, WordVocabulary, beam_search, greedy, load_captioner

SPECIAL = Special(start=1, end=2, pad=0)


def table_step(table: dict, vocab: int = 5):
    """A next-token function from {prefix (tuple of ids after the start token): {token: p}}."""
    def step(tokens, rows, parents):
        out = torch.full((len(tokens), vocab), -1e9)
        for r, row in enumerate(tokens.tolist()):
            for token, p in table.get(tuple(row[1:]), {SPECIAL.end: 1.0}).items():
                out[r, token] = torch.tensor(p).log()
        return out
    return step


# --- decoding --------------------------------------------------------------------------------------
def test_greedy_pads_after_the_end_and_stops_when_every_row_has_ended():
    # row 0 says 3 then ends; row 1 says 4, 4 then ends: one step function, rows told apart by `rows`
    def step(tokens, rows, parents):
        out = torch.zeros(len(tokens), 5)
        for r, (row, item) in enumerate(zip(tokens.tolist(), rows.tolist())):
            said = len(row) - 1
            out[r, (3 if said < 1 else 2) if item == 0 else (4 if said < 2 else 2)] = 1.0
        return out

    ids = greedy(step, 2, SPECIAL, max_new_tokens=10)
    assert ids.tolist() == [[1, 3, 2, 0], [1, 4, 4, 2]]
    assert greedy(step, 2, SPECIAL, max_new_tokens=2).tolist() == [[1, 3, 2], [1, 4, 4]]


def test_beam_search_finds_the_likelier_caption_that_greedy_misses():
    # greedy takes A (0.6) and then ends (p 0.24); B then end has p 0.4 * 0.99 = 0.396
    table = {(): {3: 0.6, 4: 0.4}, (3,): {2: 0.4, 3: 0.3, 4: 0.3}, (4,): {2: 0.99, 3: 0.01}}
    assert greedy(table_step(table), 1, SPECIAL, 5).tolist() == [[1, 3, 2]]
    assert beam_search(table_step(table), 1, SPECIAL, 5, beams=2).tolist() == [[1, 4, 2]]
    assert beam_search(table_step(table), 1, SPECIAL, 5, beams=1).tolist() == [[1, 3, 2]]


def test_one_beam_is_greedy_on_random_logits():
    weights = torch.randn(7, 9, generator=torch.Generator().manual_seed(0))

    def step(tokens, rows, parents):  # depends on the item and on the last token
        return weights[tokens[:, -1] % 7] + rows[:, None].float().sin() * 3

    assert torch.equal(beam_search(step, 4, SPECIAL, 8, beams=1), greedy(step, 4, SPECIAL, 8))


@pytest.mark.parametrize("kwargs, name", [(dict(max_new_tokens=0), "max_new_tokens"), (dict(beams=0), "beams")])
def test_decoding_limits_are_checked_by_name(kwargs, name):
    args = dict(max_new_tokens=4, beams=2) | kwargs
    with pytest.raises(ValueError, match=name):
        beam_search(table_step({}), 1, SPECIAL, args["max_new_tokens"], args["beams"])


def test_word_vocabulary_round_trip_and_errors():
    vocab = WordVocabulary.from_texts(["There is a red circle."])
    ids = vocab.encode("there is a RED circle.")
    assert ids[-1] == vocab.special.end and vocab.decode(ids) == "There is a red circle."
    assert vocab.decode(vocab.encode("a green circle")) == "A <unk> circle"
    with pytest.raises(ValueError, match="'red'"):
        WordVocabulary(["red", "red"])


# --- the Hugging Face adapter ---------------------------------------------------------------------
def vision_encoder_decoder(seed: int = 1, encoder: str = "clip") -> VisionEncoderDecoderModel:
    """A random CLIP vision encoder with a GPT-2 decoder, widths differing (so enc_to_dec_proj is
    used); the decoder's weights are perturbed so that captions vary between images and end early."""
    torch.manual_seed(seed)
    sizes = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8)
    enc = CLIPVisionConfig(**sizes) if encoder == "clip" else ViTConfig(**sizes)
    dec = GPT2Config(n_embd=40, n_layer=2, n_head=4, vocab_size=12, n_positions=64, bos_token_id=0, eos_token_id=1,
                     pad_token_id=2, add_cross_attention=True, is_decoder=True)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = 0, 1, 2
    model = VisionEncoderDecoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("encoder."):
                p.add_(torch.randn_like(p) * 0.5)
        model.decoder.transformer.wte.weight[1] *= 1.5  # a likelier end token, so that some captions end early
    return model


@pytest.fixture(scope="module")
def hf_model():
    return vision_encoder_decoder()


def test_adapter_encoder_states_equal_hugging_face(hf_model):
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captioner = HuggingFaceCaptioner(hf_model)
    with torch.no_grad():
        theirs = hf_model.encoder(pixel_values=pixels).last_hidden_state
    assert captioner.enc_to_dec_proj is not None
    torch.testing.assert_close(captioner.features(pixels), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("beams", [1, 3])
def test_adapter_generates_the_same_token_ids_as_hugging_face(hf_model, beams):
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captioner = HuggingFaceCaptioner(hf_model)
    with torch.no_grad():
        theirs = hf_model.generate(pixel_values=pixels, max_new_tokens=12, do_sample=False, num_beams=beams)
    ours = captioner.generate(captioner.features(pixels), max_new_tokens=12, beams=beams)
    assert torch.equal(ours, theirs)
    assert len({tuple(row) for row in ours.tolist()}) > 1, "captions should differ between images"
    assert (ours[:, 1:] == 1).any(1).sum() >= 1, "some caption should end before the limit"


def test_hooks_on_the_adapters_tower_change_the_generated_ids(hf_model):
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captioner = HuggingFaceCaptioner(hf_model)
    plain = captioner.generate(captioner.features(pixels), max_new_tokens=12)
    with captioner.vision.hooks([(f"blocks.{l}.attn.hook_pattern", value_only_attention) for l in range(2)]):
        cancelled = captioner.generate(captioner.features(pixels), max_new_tokens=12)
    assert not torch.equal(plain, cancelled)
    # with attention cancelled everywhere the class token never reads a patch, but the decoder reads
    # every output token, so captions may still differ between images; the hooks are gone afterwards
    assert torch.equal(captioner.generate(captioner.features(pixels), max_new_tokens=12), plain)


def test_adapter_loads_from_a_directory_and_refuses_other_encoders(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "ved")
    loaded = load_captioner(tmp_path / "ved")
    assert isinstance(loaded, HuggingFaceCaptioner)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    original = HuggingFaceCaptioner(hf_model)
    assert torch.equal(loaded.generate(loaded.features(pixels)), original.generate(original.features(pixels)))
    with pytest.raises(ValueError, match="no tokenizer"):
        loaded.caption(pixels)

    vit = vision_encoder_decoder(encoder="vit")
    with pytest.raises(UnsupportedArchitecture, match="'vit' encoder"):
        HuggingFaceCaptioner(vit)
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(UnsupportedArchitecture, match="'vit' encoder"):
        load_captioner(tmp_path / "vit")
    with pytest.raises(FileNotFoundError, match="no captioner"):
        load_captioner(tmp_path / "nothing-here")


# --- the prefix captioner's files -----------------------------------------------------------------
def test_prefix_captioner_save_load_round_trip_and_refusals(tiny_model, tmp_path):
    torch.manual_seed(0)
    captioner = PrefixCaptioner(PrefixConfig(d_embed=64, words=("there", "is", "a", "red", "circle", "."))).eval()
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    path = captioner.save(tmp_path / "cap.safetensors")
    loaded = load_captioner(path)
    assert loaded.caption(pixels, tiny_model) == captioner.caption(pixels, tiny_model)
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(ValueError, match="not a clip_lens prefix captioner"):
        PrefixCaptioner.load(tiny_model_weights())
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="junk.safetensors is not a safetensors file"):
        PrefixCaptioner.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no captioner file"):
        PrefixCaptioner.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="pass the HookedCLIP"):
        captioner.caption(pixels)
    wide = PrefixCaptioner(PrefixConfig(d_embed=512, words=("a",)))
    with pytest.raises(ValueError, match="512-dimensional"):
        wide.caption(pixels, tiny_model)
    with pytest.raises(ValueError, match="n_heads"):
        PrefixConfig(d_embed=8, d_model=30, n_heads=4)


def tiny_model_weights():
    from clip_lens import zoo

    return zoo.WEIGHTS
