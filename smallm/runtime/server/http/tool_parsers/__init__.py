"""Tool-call parsers, one per model family's output format; `get_parser` picks by name.

``--tool-call-parser`` names one of `PARSER_NAMES`. See ``base.py`` for what a parser does.
"""

from __future__ import annotations

from smallm.runtime.server.http.tool_parsers.base import ParsedCall, ParseResult, ToolCallParser
from smallm.runtime.server.http.tool_parsers.hermes import HermesParser, Qwen25Parser
from smallm.runtime.server.http.tool_parsers.json_parser import JsonParser
from smallm.runtime.server.http.tool_parsers.llama3 import Llama3Parser
from smallm.runtime.server.http.tool_parsers.mistral import MistralParser
from smallm.runtime.server.http.tool_parsers.pythonic import PythonicParser

__all__ = ["PARSER_NAMES", "ParseResult", "ParsedCall", "ToolCallParser", "get_parser"]

_PARSERS: dict[str, type[ToolCallParser]] = {
    cls.name: cls
    for cls in (HermesParser, Qwen25Parser, Llama3Parser, MistralParser, PythonicParser, JsonParser)
}
PARSER_NAMES = tuple(_PARSERS)


def get_parser(name: str) -> ToolCallParser:
    """The parser called ``name``; ValueError listing the names if there is none."""
    try:
        return _PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool-call parser {name!r}; choose one of {', '.join(PARSER_NAMES)}"
        ) from None
