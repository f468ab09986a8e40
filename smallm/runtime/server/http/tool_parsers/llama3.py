"""Llama 3.1/3.2 JSON tool calls: ``{"name": ..., "parameters": {...}}``, optionally after
``<|python_tag|>``, several separated by ``;``."""

from __future__ import annotations

import json

from smallm.runtime.server.http.tool_parsers.base import (
    LeadingParser,
    ParsedCall,
    ParseResult,
    call_from_object,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3Parser(LeadingParser):
    name = "llama3"
    # No structural tag (structural_tag() returns None): a call is the whole output, known by
    # how it starts ("{" or the special token <|python_tag|>); making "{" a trigger would ban
    # it from every plain answer.
    leads = ("{", PYTHON_TAG, "<")
    needs_special_tokens = True

    def parse(self, text: str) -> ParseResult:
        body = text.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG) :].lstrip()
        if not body.startswith("{"):
            return ParseResult(text)
        calls = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return ParseResult(text)
            call = call_from_object(obj)
            if call is None:
                return ParseResult(text)
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return ParseResult("", calls)

    def format_calls(self, calls: list[ParsedCall]) -> str:
        return "; ".join(
            f'{{"name": {json.dumps(c.name)}, "parameters": {c.arguments}}}' for c in calls
        )
