"""One tokenizer interface over open_clip's tokenizers and Hugging Face's CLIP tokenizer."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor


class Tokenizer:
    """Texts to `[batch, context_length]` token ids, and single ids back to strings.

    Build it with `Tokenizer.default()`, `Tokenizer.from_open_clip(tok)` or
    `Tokenizer.from_huggingface(tok)`; `clip_lens.loading` picks the right one for a model.
    """

    def __init__(self, encode: Callable[[list[str]], Tensor], decode_token: Callable[[int], str],
                 context_length: int, source: Any = None):
        self._encode = encode
        self._decode_token = decode_token
        self.context_length = context_length
        self.source = source  # the wrapped tokenizer, for callers who need more of it

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

    @classmethod
    def from_open_clip(cls, tokenizer: Any) -> "Tokenizer":
        """Wrap an open_clip tokenizer (`open_clip.get_tokenizer(name)`)."""
        context_length = getattr(tokenizer, "context_length", 77)
        if hasattr(tokenizer, "tokenizer") and hasattr(tokenizer.tokenizer, "convert_ids_to_tokens"):
            # open_clip's HFTokenizer wrapper
            decode = lambda i: tokenizer.tokenizer.convert_ids_to_tokens(i)  # noqa: E731
        else:
            decode = lambda i: tokenizer.decode([i])  # noqa: E731
        return cls(lambda texts: tokenizer(texts), decode, context_length, source=tokenizer)

    @classmethod
    def from_huggingface(cls, tokenizer: Any, context_length: int = 77) -> "Tokenizer":
        """Wrap a `transformers` CLIP tokenizer; pads to `context_length` like open_clip."""
        def encode(texts: list[str]) -> Tensor:
            out = tokenizer(texts, padding="max_length", max_length=context_length,
                            truncation=True, return_tensors="pt")
            return out["input_ids"]

        return cls(encode, lambda i: tokenizer.convert_ids_to_tokens(i), context_length, source=tokenizer)

    @classmethod
    def default(cls, context_length: int = 77) -> "Tokenizer":
        """open_clip's BPE tokenizer (the OpenAI CLIP vocabulary), shipped inside open_clip."""
        from open_clip.tokenizer import SimpleTokenizer

        return cls.from_open_clip(SimpleTokenizer(context_length=context_length))
