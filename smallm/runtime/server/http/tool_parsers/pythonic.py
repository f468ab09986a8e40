"""Pythonic calls (Llama 3.2/4, ToolACE): ``[get_weather(city="Paris"), add(a=1, b=2)]``.

Read with Python's ``ast``: only a list of calls to plain names with keyword arguments whose
values are literals is accepted, so nothing is ever evaluated.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from smallm.runtime.server.http.tool_parsers.base import LeadingParser, ParsedCall, ParseResult


class PythonicParser(LeadingParser):
    name = "pythonic"
    # No structural tag (structural_tag() returns None): calls are Python syntax
    # ([f(a=1)]), not JSON, so there is no schema to constrain them with, and no trigger.
    leads = ("[",)

    def parse(self, text: str) -> ParseResult:
        body = text.strip()
        if not (body.startswith("[") and body.endswith("]")):
            return ParseResult(text)
        try:
            tree = ast.parse(body, mode="eval").body
        except SyntaxError:
            return ParseResult(text)
        if not isinstance(tree, ast.List) or not tree.elts:
            return ParseResult(text)
        calls = []
        for node in tree.elts:
            call = _call(node)
            if call is None:
                return ParseResult(text)
            calls.append(call)
        return ParseResult("", calls)

    def format_calls(self, calls: list[ParsedCall]) -> str:
        parts = []
        for c in calls:
            args = json.loads(c.arguments) if c.arguments.startswith("{") else {}
            kw = ", ".join(f"{k}={_literal(v)}" for k, v in args.items())
            parts.append(f"{c.name}({kw})")
        return "[" + ", ".join(parts) + "]"


def _call(node: ast.expr) -> ParsedCall | None:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    args: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            return None
        try:
            args[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            return None
    try:
        return ParsedCall(node.func.id, json.dumps(args, ensure_ascii=False))
    except TypeError:  # a tuple, set or bytes literal has no JSON form
        return None


def _literal(value: Any) -> str:
    # JSON's true/false/null are Python's True/False/None; everything else reads the same.
    return repr(value)
