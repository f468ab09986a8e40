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


class TextAssembler:
    """One request's text: incremental while streaming, trimmed at stop strings when done.

    While streaming, the last ``len(longest stop string) - 1`` characters are held back: a stop
    string may still complete there, and text once sent cannot be taken back.
    """

    def __init__(self, tokenizer: Any, params: Any | None, stream: bool):
        self.tokenizer = tokenizer
        self.skip_special = params.skip_special_tokens if params is not None else True
        self.spaces_between = params.spaces_between_special_tokens if params is not None else True
        self.stop: list[str] = list(params.stop) if params is not None else []
        self.no_stop_trim = params.no_stop_trim if params is not None else False
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.stream = stream
        self.decoder = (
            IncrementalDecoder(tokenizer, self.skip_special, self.spaces_between)
            if stream
            else None
        )
        self.output_ids: list[int] = []

    def push(self, new_ids: list[int]) -> None:
        self.output_ids.extend(new_ids)
        if self.decoder is not None and new_ids:
            self.decoder.push(new_ids)

    def stream_text(self) -> str:
        """The cumulative text that is safe to show now."""
        text = self.decoder.text if self.decoder is not None else ""
        return text[: max(len(text) - self.holdback, 0)] if self.stop else text

    def final_text(self, finish_reason: dict | None) -> str:
        """The whole completion, with the matched stop token or stop string cut off (unless
        ``no_stop_trim``)."""
        reason = finish_reason or {}
        ids = self.output_ids
        matched = reason.get("matched")
        trim = reason.get("type") == "stop" and not self.no_stop_trim
        if trim and isinstance(matched, int) and ids and ids[-1] == matched:
            ids = ids[:-1]
        text = self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special,
            spaces_between_special_tokens=self.spaces_between,
        )
        if trim and isinstance(matched, str):
            at = text.find(matched)
            if at >= 0:
                text = text[:at]
        return text
