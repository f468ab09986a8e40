"""Hermes / Qwen 2.5 style: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

The format of NousResearch's Hermes models and Qwen 2.5's chat template, and the one the
system-prompt fallback teaches ChatML models such as SmolLM2.
"""

from __future__ import annotations

import json
import re

from smallm.runtime.server.http.tool_parsers.base import (
    MarkerParser,
    ParsedCall,
    ParseResult,
    call_from_object,
)

_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class HermesParser(MarkerParser):
    name = "hermes"
    marker = "<tool_call>"

    def parse(self, text: str) -> ParseResult:
        at = text.find(self.marker)
        if at < 0:
            return ParseResult(text)
        calls = []
        for body in _BLOCK.findall(text[at:]):
            try:
                call = call_from_object(json.loads(body.strip()))
            except json.JSONDecodeError:
                call = None
            if call is None:
                # A malformed block: give the text back unchanged rather than half of it.
                return ParseResult(text)
            calls.append(call)
        return ParseResult(text[:at].rstrip(), calls)

    def structural_tag(self, tools: list[tuple[str, dict]]) -> dict | None:
        # The call is written exactly as format_calls (and the fallback prompt) spell it, so
        # the constrained text is what the model was taught: after the trigger, the name is
        # fixed per structure and only the arguments object is left to the schema.
        structures = [
            {
                "begin": f'{self.marker}\n{{"name": {json.dumps(name)}, "arguments": ',
                "schema": schema,
                "end": "}\n</tool_call>",
            }
            for name, schema in tools
        ]
        return {"structures": structures, "triggers": [self.marker]}

    def format_calls(self, calls: list[ParsedCall]) -> str:
        return "\n".join(
            f'<tool_call>\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}\n</tool_call>'
            for c in calls
        )


class Qwen25Parser(HermesParser):
    """Qwen 2.5 writes Hermes' tags; a separate name so ``--tool-call-parser qwen25`` works."""

    name = "qwen25"
