"""A real `CLIPTokenizer` over a closed word list.

Nothing can be downloaded here, so tiny test models and the mini world build their own
tokenizer. It is a genuine CLIP BPE tokenizer (same class, same pre-tokenizer, same
bos/eos handling as SDXL's), whose merges spell out exactly the given words; any other
word falls back to its characters.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _word_merges(word: str) -> list[tuple[str, str]]:
    """The left-to-right merge chain that builds `word</w>` from its characters."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    left = pieces[0]
    for right in pieces[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def build_word_tokenizer(words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    """Build a CLIP tokenizer whose vocabulary holds every word of `words` as one token."""
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    chars = string.ascii_lowercase + string.digits + ",.;:!?'-"
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted({w.lower() for w in words}):
        if not word.isalpha():
            raise ValueError(f"tokenizer words must be alphabetic, got {word!r}")
        for left, right in _word_merges(word):
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
                vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=EOS
    )
