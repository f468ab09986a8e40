"""Bare JSON: the whole completion is ``{"name": ..., "arguments": {...}}`` or a list of them
(the shape the constrained ``required`` mode produces, for models with no tool format)."""

from __future__ import annotations

import json

from smallm.runtime.server.http.tool_parsers.base import (
    LeadingParser,
    ParsedCall,
    ParseResult,
    calls_from_json,
)


class JsonParser(LeadingParser):
    name = "json"
    # No structural tag (structural_tag() returns None): the call is the whole output, with
    # no trigger string before it (named/required choices constrain it as JSON instead).
    leads = ("{", "[")

    def parse(self, text: str) -> ParseResult:
        body = text.strip()
        if not body.startswith(self.leads):
            return ParseResult(text)
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return ParseResult(text)
        calls = calls_from_json(value)
        return ParseResult(text) if calls is None else ParseResult("", calls)

    def format_calls(self, calls: list[ParsedCall]) -> str:
        items = [f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}' for c in calls]
        return items[0] if len(items) == 1 else "[" + ", ".join(items) + "]"
