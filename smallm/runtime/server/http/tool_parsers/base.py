"""What every tool-call parser shares: the parsed call, the parse result, and the base class.

A parser knows one model family's way of writing tool calls in plain text (Hermes'
``<tool_call>{...}</tool_call>``, Llama 3's bare JSON, Mistral's ``[TOOL_CALLS] [...]``, ...).
It does three jobs: split a finished completion into content and calls (`parse`), say how much
of a completion that is still streaming can safely be sent as content (`safe_content_len`),
and write calls, results and instructions back as text for chat templates that know nothing of
tools (the system-prompt fallback).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ParsedCall:
    """One tool call read from model output: the tool's name and its arguments as JSON text."""

    name: str
    arguments: str  # a JSON object, serialised (OpenAI sends arguments as a string)


@dataclass
class ParseResult:
    """A completion split into the text meant for the user and the tool calls it made."""

    content: str
    calls: list[ParsedCall] = field(default_factory=list)


def arguments_text(value: Any) -> str | None:
    """``value`` as the JSON text of an arguments object, or None if it is not an object.

    A model sometimes writes the arguments as a JSON string holding the object; accept that.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def call_from_object(obj: Any) -> ParsedCall | None:
    """A call from ``{"name": ..., "arguments"|"parameters": {...}}`` (None if not that shape)."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI's own shape, sometimes echoed back
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args = arguments_text(obj.get("arguments", obj.get("parameters")))
    return None if args is None else ParsedCall(name, args)


def calls_from_json(value: Any) -> list[ParsedCall] | None:
    """Calls from one JSON object or a list of them; None if any item is not a call."""
    items = value if isinstance(value, list) else [value]
    calls = [call_from_object(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def marker_hold(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolCallParser:
    """Base class; subclasses set ``name`` and implement `parse` and `format_calls`."""

    name = ""
    # Tokens such as ``<|python_tag|>`` or ``[TOOL_CALLS]`` are special tokens: the output must
    # keep them for the parser to see them.
    needs_special_tokens = False

    def parse(self, text: str) -> ParseResult:
        """Split a finished completion; text that is not a well-formed call stays content."""
        raise NotImplementedError

    def safe_content_len(self, text: str) -> int:
        """How much of a partial completion can be streamed as content now (the rest might
        belong to a tool call and is held back until the parser can tell)."""
        raise NotImplementedError

    def format_calls(self, calls: list[ParsedCall]) -> str:
        """The calls written as this model family writes them (for earlier assistant turns)."""
        raise NotImplementedError

    def structural_tag(self, tools: list[tuple[str, dict]]) -> dict | None:
        """The structural tag that constrains this format's calls, for ``tool_choice: auto``
        (see ``smallm.runtime.constrained.structural_tag``): ``{"structures": [...],
        "triggers": [...]}`` with one structure per tool, given as (name, arguments schema).
        None when the format has no text trigger that opens a call (the default)."""
        return None

    def format_result(self, name: str | None, content: str) -> str:
        """A tool's result as a user-turn message, for templates without a ``tool`` role."""
        return f"<tool_response>\n{content}\n</tool_response>"

    def instructions(self, tools: list[dict]) -> str:
        """The system-prompt text that describes the tools and the call format."""
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        example = self.format_calls([ParsedCall("<function-name>", '{"<arg>": "<value>"}')])
        return (
            "You may call one or more functions to assist with the user query.\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n"
            "For each function call, answer with the call in this format, and nothing else:\n"
            f"{example}"
        )


class MarkerParser(ToolCallParser):
    """Parsers whose calls begin with a fixed marker (held back while it may be forming)."""

    marker = ""

    def safe_content_len(self, text: str) -> int:
        at = text.find(self.marker)
        if at >= 0:
            return at
        return len(text) - marker_hold(text, self.marker)


class LeadingParser(ToolCallParser):
    """Parsers whose calls are the whole output, recognised by how it starts (``{``, ``[``)."""

    leads: tuple[str, ...] = ()

    def safe_content_len(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or stripped.startswith(self.leads):
            return 0
        return len(text)
