"""Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` (``[TOOL_CALLS]`` is a
special token in Mistral's vocabularies, so the output keeps special tokens)."""

from __future__ import annotations

import json

from smallm.runtime.server.http.tool_parsers.base import (
    MarkerParser,
    ParsedCall,
    ParseResult,
    calls_from_json,
)


class MistralParser(MarkerParser):
    name = "mistral"
    # No structural tag (structural_tag() returns None): the marker [TOOL_CALLS] is a special
    # token, which grammars never allow (they work on text bytes), and all calls share one
    # JSON array instead of a begin/end pair per call.
    marker = "[TOOL_CALLS]"
    needs_special_tokens = True

    def parse(self, text: str) -> ParseResult:
        at = text.find(self.marker)
        if at < 0:
            return ParseResult(text)
        body = text[at + len(self.marker) :].strip()
        try:
            value, _ = json.JSONDecoder().raw_decode(body)
        except json.JSONDecodeError:
            return ParseResult(text)
        calls = calls_from_json(value)
        if calls is None:
            return ParseResult(text)
        return ParseResult(text[:at].rstrip(), calls)

    def format_calls(self, calls: list[ParsedCall]) -> str:
        items = ", ".join(
            f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}' for c in calls
        )
        return f"[TOOL_CALLS] [{items}]"
