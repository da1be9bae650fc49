"""One tokenizer interface over open_clip's tokenizers and Hugging Face's CLIP tokenizer."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor


class Tokenizer:
    """Texts to `[batch, context_length]` token ids, and ids back to strings.

    Build it with `Tokenizer.default()`, `Tokenizer.from_open_clip(tok)` or
    `Tokenizer.from_huggingface(tok)`; `clip_lens.loading` picks the right one for a model.

    Attributes:
        context_length: the length every row is padded to.
        eot_token_id: the end-of-text id the text tower pools at (None when the wrapped
            tokenizer does not say).
        source: the wrapped tokenizer, for callers who need more of it.
    """

    def __init__(self, encode: Callable[[list[str]], Tensor], decode_token: Callable[[int], str],
                 context_length: int, source: Any = None, *,
                 decode: Optional[Callable[[list[int]], str]] = None,
                 encode_plain: Optional[Callable[[str], list[int]]] = None,
                 eot_token_id: Optional[int] = None):
        self._encode = encode
        self._decode_token = decode_token
        self._decode = decode
        self._encode_plain = encode_plain
        self.context_length = context_length
        self.source = source
        self.eot_token_id = eot_token_id

    def __call__(self, texts: Sequence[str]) -> Int[Tensor, "batch context_length"]:
        if isinstance(texts, str):
            texts = [texts]
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts must be strings; got {bad[0]!r}")
        with torch.device("cpu"):  # tokenizing is CPU work, whatever the default device; callers move the ids
            return self._encode(list(texts)).long()

    def decode_token(self, token_id: int) -> str:
        return self._decode_token(token_id)

    def decode(self, token_ids: Union[Sequence[int], Tensor]) -> Union[str, list[str]]:
        """The text of token ids, special tokens included: one string for [pos] ids, a list of
        strings for [batch, pos] (the wrapped tokenizer's own `decode`)."""
        ids = token_ids.tolist() if isinstance(token_ids, Tensor) else list(token_ids)
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row) for row in ids]
        if self._decode is None:
            return "".join(self._decode_token(int(i)) for i in ids)
        return self._decode([int(i) for i in ids])

    def encode_plain(self, text: str) -> list[int]:
        """The ids of `text` alone: no start or end token, no padding."""
        if self._encode_plain is None:
            raise NotImplementedError("this tokenizer cannot encode a text without its special tokens")
        return list(self._encode_plain(text))

    @classmethod
    def from_open_clip(cls, tokenizer: Any) -> "Tokenizer":
        """Wrap an open_clip tokenizer (`open_clip.get_tokenizer(name)`)."""
        context_length = getattr(tokenizer, "context_length", 77)
        if hasattr(tokenizer, "tokenizer") and hasattr(tokenizer.tokenizer, "convert_ids_to_tokens"):
            # open_clip's HFTokenizer wrapper
            inner = tokenizer.tokenizer
            return cls(lambda texts: tokenizer(texts), inner.convert_ids_to_tokens, context_length, source=tokenizer,
                       decode=inner.decode, encode_plain=lambda text: inner.encode(text, add_special_tokens=False),
                       eot_token_id=inner.eos_token_id)
        return cls(lambda texts: tokenizer(texts), lambda i: tokenizer.decode([i]), context_length, source=tokenizer,
                   decode=getattr(tokenizer, "decode", None), encode_plain=getattr(tokenizer, "encode", None),
                   eot_token_id=getattr(tokenizer, "eot_token_id", None))

    @classmethod
    def from_huggingface(cls, tokenizer: Any, context_length: int = 77) -> "Tokenizer":
        """Wrap a `transformers` CLIP tokenizer; pads to `context_length` like open_clip."""
        def encode(texts: list[str]) -> Tensor:
            out = tokenizer(texts, padding="max_length", max_length=context_length,
                            truncation=True, return_tensors="pt")
            return out["input_ids"]

        return cls(encode, tokenizer.convert_ids_to_tokens, context_length, source=tokenizer, decode=tokenizer.decode,
                   encode_plain=lambda text: tokenizer.encode(text, add_special_tokens=False),
                   eot_token_id=tokenizer.eos_token_id)

    @classmethod
    def default(cls, context_length: int = 77) -> "Tokenizer":
        """open_clip's BPE tokenizer (the OpenAI CLIP vocabulary), shipped inside open_clip."""
        from open_clip.tokenizer import SimpleTokenizer

        return cls.from_open_clip(SimpleTokenizer(context_length=context_length))
