"""A word-level vocabulary for small captioners: lower-cased words and punctuation marks, with
four special tokens. It is stored as a plain list of words next to the weights."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from clip_lens.captioning.decoding import Special

SPECIAL_WORDS = ("<pad>", "<start>", "<end>", "<unk>")
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """'There is a red circle.' -> ['there', 'is', 'a', 'red', 'circle', '.']"""
    return _WORD.findall(text.lower())


class WordVocabulary:
    """Ids 0..3 are <pad>, <start>, <end>, <unk>; the words follow in the order given."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if list(words[: len(SPECIAL_WORDS)]) != list(SPECIAL_WORDS):
            words = list(SPECIAL_WORDS) + [w for w in words if w not in SPECIAL_WORDS]
        if len(set(words)) != len(words):
            repeated = next(w for w in words if words.count(w) > 1)
            raise ValueError(f"vocabulary lists {repeated!r} more than once")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.special = Special(start=1, end=2, pad=0)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordVocabulary":
        """Every word of `texts`, in order of first appearance."""
        seen: dict[str, None] = {}
        for text in texts:
            seen.update(dict.fromkeys(split_words(text)))
        return cls(list(seen))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """Word ids followed by the end token (no start token); unknown words map to <unk>."""
        return [self.index.get(w, 3) for w in split_words(text)] + [self.special.end]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> a sentence: stops at the end token, skips the other special tokens, attaches
        punctuation to the word before it and capitalises the first letter."""
        text = ""
        for i in ids:
            i = int(i)
            if i == self.special.end:
                break
            if i < len(SPECIAL_WORDS) and i != 3:
                continue
            word = self.words[i] if 0 <= i < len(self.words) else "<unk>"
            text += word if (not text or not word[0].isalnum() and word != "<unk>") else " " + word
        return text[:1].upper() + text[1:]
