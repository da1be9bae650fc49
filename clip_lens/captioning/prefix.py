"""A prefix captioner: a small mapping network turns a CLIP image embedding into `prefix_length`
vectors, and a small causal transformer continues them with words (the ClipCap recipe, sized for
the tiny CLIP; docs/methods.md#generated-captions).

It reads the studied CLIP's own vision tower, so an intervention on `model.vision` reaches it. The
weights and config are one safetensors file (the config and vocabulary in its metadata), so loading
one never executes code.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from clip_lens.captioning.base import Captioner
from clip_lens.captioning.decoding import NextLogits
from clip_lens.captioning.vocabulary import WordVocabulary
from clip_lens.images import ImageLike
from clip_lens.towers import HookedVisionTower

FORMAT = "clip_lens.prefix_captioner/1"


@dataclass(frozen=True)
class PrefixConfig:
    """d_embed: the CLIP embedding read; prefix_length: vectors it maps to; d_model, n_layers,
    n_heads: the decoder; max_new_tokens: the longest caption (and the position table's size);
    words: the vocabulary; clip: the CLIP it was trained against (informative)."""

    d_embed: int
    words: tuple = field(default_factory=tuple)
    prefix_length: int = 4
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_new_tokens: int = 20
    clip: str = ""

    def __post_init__(self) -> None:
        for name in ("d_embed", "prefix_length", "d_model", "n_layers", "n_heads", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PrefixConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"PrefixConfig: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        object.__setattr__(self, "words", tuple(self.words))


class PrefixCaptioner(Captioner):
    """Captions from a CLIP image embedding (`reads = "embedding"`).

    Sequence layout: [prefix_0 .. prefix_{k-1}, <start>, w_1, ...]; causal attention over all of it;
    the output embedding is tied to the input embedding.
    """

    reads = "embedding"

    def __init__(self, cfg: PrefixConfig):
        super().__init__()
        self.cfg = cfg
        self.name = ""  # where it was loaded from, for reports
        self.vocab = WordVocabulary(cfg.words)
        self.special = self.vocab.special
        self.max_new_tokens = cfg.max_new_tokens
        k, d = cfg.prefix_length, cfg.d_model
        self.mapper = nn.Sequential(nn.Linear(cfg.d_embed, k * d // 2), nn.GELU(), nn.Linear(k * d // 2, k * d))
        self.embed = nn.Embedding(len(self.vocab), d)
        self.pos = nn.Parameter(torch.zeros(k + cfg.max_new_tokens + 1, d))
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(d)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02)

    # --- reading the CLIP -----------------------------------------------------------------------
    def vision_tower(self, model=None) -> HookedVisionTower:
        if model is None:
            raise ValueError("a prefix captioner reads a CLIP's vision tower: pass the HookedCLIP (model=...)")
        tower = model.vision
        if tower.cfg.d_embed != self.cfg.d_embed:
            raise ValueError(f"the captioner reads {self.cfg.d_embed}-dimensional image embeddings, but this CLIP's "
                             f"vision tower gives {tower.cfg.d_embed}")
        return tower

    def to_pixels(self, images: Union[ImageLike, Sequence[ImageLike]], model=None) -> Float[Tensor, "batch 3 height width"]:
        self.vision_tower(model)
        return model.to_pixels(images)

    # --- decoding ---------------------------------------------------------------------------------
    def prefix(self, embedding: Float[Tensor, "batch d_embed"]) -> Float[Tensor, "batch prefix d_model"]:
        """The unit-normalised embedding mapped to prefix vectors."""
        if embedding.ndim != 2 or embedding.shape[-1] != self.cfg.d_embed:
            raise ValueError(f"expected image embeddings [batch, {self.cfg.d_embed}], got {tuple(embedding.shape)}")
        mapped = self.mapper(F.normalize(embedding.to(self.pos.dtype), dim=-1))
        return mapped.view(embedding.shape[0], self.cfg.prefix_length, self.cfg.d_model)  # shape = [batch, k, d_model]

    def logits(self, prefix: Float[Tensor, "batch prefix d_model"], tokens: Int[Tensor, "batch t"]) -> Float[Tensor, "batch t vocab"]:
        """Next-token logits at every token position (teacher forcing), given the prefix."""
        if tokens.shape[1] > self.cfg.max_new_tokens + 1:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the captioner's {self.cfg.max_new_tokens + 1} positions")
        x = torch.cat([prefix, self.embed(tokens)], dim=1)  # shape = [batch, k + t, d_model]
        x = x + self.pos[: x.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
        x = self.ln_final(self.blocks(x, mask=mask, is_causal=True))
        return x[:, self.cfg.prefix_length :] @ self.embed.weight.T

    def next_logits(self, features: Float[Tensor, "batch d_embed"]) -> NextLogits:
        prefix = self.prefix(features)
        # no key/value cache: the decoder is small and captions short, so each step reads all tokens
        return lambda tokens, rows, parents: self.logits(prefix[rows], tokens)[:, -1]

    def decode(self, tokens: Int[Tensor, "batch length"]) -> list[str]:
        return [self.vocab.decode(row[1:].tolist()) for row in tokens]

    def loss(self, embedding: Float[Tensor, "batch d_embed"], captions: Sequence[str]) -> Tensor:
        """Mean cross-entropy of each caption's words and end token (teacher forcing)."""
        ids = [self.vocab.encode(c)[: self.cfg.max_new_tokens] for c in captions]
        length = max(len(i) for i in ids)
        target = torch.full((len(ids), length), -100, dtype=torch.long, device=embedding.device)
        for row, i in enumerate(ids):
            target[row, : len(i)] = torch.tensor(i)
        inputs = torch.cat([torch.full_like(target[:, :1], self.special.start), target[:, :-1].clamp(min=0)], dim=1)
        logits = self.logits(self.prefix(embedding), inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)

    # --- files ------------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """One safetensors file, the config in its metadata, written under a temporary name and
        renamed into place."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        state = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(tmp), metadata={"format": FORMAT, "config": json.dumps(asdict(self.cfg))})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None) -> "PrefixCaptioner":
        """A captioner saved by `save` (safetensors only: nothing in the file is executed). Its
        metadata is checked by key and type, and the weights its config implies against the
        tensors the file holds, before anything is allocated; each problem names the file."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no captioner file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
        metadata, shapes = _safetensors_header(path)
        if metadata.get("format") != FORMAT or "config" not in metadata:
            raise ValueError(f"{path} is not a clip_lens prefix captioner (its metadata has no {FORMAT!r} config)")
        cfg = _config_from_metadata(path, metadata["config"])
        _check_weights_fit(path, cfg, shapes)
        captioner = cls(cfg)
        missing, unexpected = captioner.load_state_dict(load_file(str(path)), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        captioner.name = str(path)
        return captioner.eval().to(device or "cpu")


SIZE_FIELDS = ("d_embed", "prefix_length", "d_model", "n_layers", "n_heads", "max_new_tokens")


def _safetensors_header(path: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """A safetensors file's metadata and the shape of each tensor it holds, read from its header
    (no tensor is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}, {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"{path} is not a safetensors file: {error}") from None


def _config_from_metadata(path: Path, text: str) -> PrefixConfig:
    """The PrefixConfig in a captioner file's metadata, each key checked by name and type."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the config in its metadata is not JSON ({error.msg})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: the config in its metadata is a {type(values).__name__}, not an object")
    missing = [key for key in SIZE_FIELDS + ("words",) if key not in values]
    unknown = sorted(set(values) - set(SIZE_FIELDS) - {"words", "clip"})
    if missing or unknown:
        what = "lacks " + ", ".join(missing) if missing else "has unknown keys " + ", ".join(unknown)
        raise ValueError(f"{path}: the config in its metadata {what} (a prefix captioner's config has "
                         f"{', '.join(SIZE_FIELDS)}, words and clip)")
    for key in SIZE_FIELDS:
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: config field {key} in its metadata must be a positive integer, got {value!r}")
    if not isinstance(values["words"], list) or not all(isinstance(w, str) for w in values["words"]):
        raise ValueError(f"{path}: config field words in its metadata must be a list of texts")
    if not isinstance(values.get("clip", ""), str):
        raise ValueError(f"{path}: config field clip in its metadata must be a text, got {values['clip']!r}")
    try:
        cfg = PrefixConfig(**values)
        WordVocabulary(cfg.words)
        return cfg
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _check_weights_fit(path: Path, cfg: PrefixConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a config whose weights differ from the tensors in the file, before any is allocated:
    the layer count first (from the tensors' names), then every shape of a captioner built on the
    meta device (shapes without memory)."""
    layers = {key.split(".")[2] for key in shapes if key.startswith("blocks.layers.")}
    if cfg.n_layers != len(layers):
        raise ValueError(f"{path}: config field n_layers in its metadata is {cfg.n_layers}, but the file holds the "
                         f"weights of {len(layers)} layers")
    expected = _weight_shapes(cfg)
    if set(expected) != set(shapes):
        names = sorted(set(expected) ^ set(shapes))
        raise ValueError(f"{path}: its tensors do not match its config (first of {len(names)} differing names: {names[0]!r})")
    wrong = {key for key in expected if expected[key] != shapes[key]}
    if wrong:
        key = min(wrong)
        sizes = {name: getattr(cfg, name) for name in SIZE_FIELDS}
        sizes["words"] = len(cfg.words)
        raise ValueError(f"{path}: config field {' or '.join(_fields_sizing_only(cfg, wrong)) or 'sizes'} in its metadata "
                         f"disagrees with the file: {key} is {list(shapes[key])} in the file, the config ("
                         f"{', '.join(f'{f}={v}' for f, v in sizes.items())}) implies {list(expected[key])}")


def _weight_shapes(cfg: PrefixConfig) -> dict[str, tuple[int, ...]]:
    """The shape of each weight of a captioner of this config, from one built on the meta device."""
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in PrefixCaptioner(cfg).state_dict().items()}


def _fields_sizing_only(cfg: PrefixConfig, wrong: set[str]) -> list[str]:
    """The config fields that size exactly the weights in `wrong` (else those that size only weights
    in `wrong`): the fields a file's shapes contradict. A field's weights are those whose shapes
    change when it grows."""
    base = _weight_shapes(cfg)
    grown = {"d_embed": cfg.d_embed + 1, "prefix_length": cfg.prefix_length + 1, "d_model": cfg.d_model + cfg.n_heads,
             "max_new_tokens": cfg.max_new_tokens + 1, "words": cfg.words + ("an unseen word",)}
    sized = {}
    for name, value in grown.items():  # n_heads sizes no weight; n_layers adds weights (checked before)
        other = _weight_shapes(replace(cfg, **{name: value}))
        sized[name] = {key for key in base if other[key] != base[key]}
    exact = [name for name, keys in sized.items() if keys == wrong]
    return exact or [name for name, keys in sized.items() if keys and keys <= wrong]
