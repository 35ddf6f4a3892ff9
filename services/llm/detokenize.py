"""Incremental detokenisation: each new token costs a decode of a few tokens, not of the whole reply.

A token's text depends on its neighbours (SentencePiece's leading-space marker, bytes of one character split over
several tokens), so the new text is read as the difference between decoding a short window that ends with the new
token and the same window without it; the window's start moves forward once its text is settled.
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class TextStream:
    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens whose text was already returned

    def push(self, token: int) -> str:
        """Add a token; returns the text it completes ('' while a multi-byte character is still partial)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""
