"""Tokenizers: the interface the data pipeline relies on, and the byte-level tokenizer.

The byte tokenizer needs no vocabulary files, so the tiny recipes run anywhere; its vocabulary
(256 bytes + pad, bos, eos = 259) is what recipes/tiny_cpu.yaml sets as model.vocab_size.
"""
from __future__ import annotations

from typing import List, Protocol, Sequence


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then the special tokens pad=256, bos=257, eos=258."""

    _NUM_BYTES = 256

    @property
    def vocab_size(self) -> int:
        return self._NUM_BYTES + 3

    @property
    def pad_id(self) -> int:
        return self._NUM_BYTES

    @property
    def bos_id(self) -> int:
        return self._NUM_BYTES + 1

    @property
    def eos_id(self) -> int:
        return self._NUM_BYTES + 2

    def encode(self, text: str) -> List[int]:
        """UTF-8 bytes of ``text``; UnicodeEncodeError for lone surrogates (no valid bytes)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte tokens in ``ids``: special tokens are skipped and invalid UTF-8 is
        replaced with U+FFFD. Ids outside the vocabulary raise ValueError: they come from a
        model whose padded vocabulary was not masked, which should not pass unnoticed."""
        data = bytearray()
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the byte vocabulary "
                                 f"[0, {self.vocab_size})")
            if token < self._NUM_BYTES:
                data.append(token)
        return data.decode("utf-8", errors="replace")


TOKENIZERS = ("byte",)


def build_tokenizer(name: str) -> Tokenizer:
    """The tokenizer named by data.tokenizer."""
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"data.tokenizer: unknown tokenizer {name!r} "
                     f"(expected one of: {', '.join(TOKENIZERS)})")
