"""Incremental detokenization that never emits half of a multi-byte character."""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas.

    Decoding token by token breaks characters that span tokens and loses spaces that depend on
    the previous token. So each step decodes a short window: tokens from ``prefix_offset`` (text
    already emitted, kept for context) to the end, and emits what the window adds beyond the
    already-emitted part, holding back while the tail is an incomplete character.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, spaces_between=True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between = spaces_between
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between,
        )

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the newly completed text (possibly empty)."""
        self.ids.extend(new_ids)
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        if len(window) <= len(emitted) or window.endswith(_REPLACEMENT):
            return ""
        delta = window[len(emitted) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end, emit whatever is held back, replacement characters included."""
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        delta = window[len(emitted) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
