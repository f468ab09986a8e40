"""Tool calling for ``/v1/chat/completions``: the request's tools, how they reach the prompt,
how a call is enforced or parsed, and the ``tool_calls`` the response carries.

- ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (and the legacy ``functions`` /
  ``function_call``) are checked into a `ToolRequest`.
- Tools reach the model through the chat template's ``tools`` argument when the template uses
  one; otherwise (e.g. SmolLM2's plain ChatML template) through a system-prompt fallback that
  lists them and teaches the parser's call format (`render_tool_prompt`).
- A named or ``required`` choice is *enforced*: the constrained decoder generates JSON that
  matches `constraint_schema` (the tool's parameters, or an array of ``{name, arguments}``),
  so the arguments always parse and validate. ``auto`` lets the model choose, and its output
  is split by the ``--tool-call-parser`` (see ``tool_parsers/``); with a structural tag
  (`auto_structural_tag`, ``--tool-call-structural-tag``) the text stays free but every call
  the model opens is constrained to its tool's parameters until the call's end tag.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from smallm.runtime.server.http.errors import ApiError
from smallm.runtime.server.http.tool_parsers import ParsedCall, ToolCallParser

_CHOICES = ("none", "auto", "required")


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


@dataclass
class Tool:
    """One function the model may call."""

    name: str
    description: str | None
    parameters: dict  # a JSON schema of the arguments object
    strict: bool = False

    def as_openai(self) -> dict:
        """The tool as OpenAI writes it (what chat templates that take ``tools`` expect)."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass
class ToolRequest:
    """The request's tools and what it allows the model to do with them."""

    tools: list[Tool]
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None = None  # the tool a named choice forces
    parallel: bool = True
    legacy: bool = False  # sent as functions/function_call: answer with message.function_call

    @property
    def enforced(self) -> bool:
        """The constrained decoder writes the call (named or required)."""
        return self.choice in ("named", "required")

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


def _function_spec(fn: Any, where: str, param: str) -> Tool:
    if not isinstance(fn, dict):
        raise _bad(param, f"{where} must be an object with a name")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(param, f"{where}.name is required: a non-empty string")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise _bad(param, f"{where}.parameters must be a JSON schema object")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise _bad(param, f"{where}.description must be a string")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad(param, f"{where}.strict must be true or false")
    return Tool(name, desc, params, bool(strict))


def _tools(body: dict) -> tuple[list[Tool], bool]:
    tools, functions = body.get("tools"), body.get("functions")
    if tools is not None and functions is not None:
        raise _bad("functions", "give tools or the legacy functions, not both")
    if functions is not None:
        if not isinstance(functions, list):
            raise _bad("functions", "functions must be a list of function objects")
        specs = [_function_spec(f, f"functions[{i}]", "functions") for i, f in enumerate(functions)]
        return specs, True
    if tools is None:
        return [], False
    if not isinstance(tools, list):
        raise _bad("tools", "tools must be a list of {'type': 'function', 'function': {...}}")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise _bad(
                "tools", f"tools[{i}]: only type 'function' tools are supported, got {kind!r}"
            )
        out.append(_function_spec(t.get("function"), f"tools[{i}].function", "tools"))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise _bad("tools", "tool names must be distinct")
    return out, False


def _choice(value: Any, param: str, legacy: bool) -> tuple[str | None, str | None]:
    """(choice, named tool) from ``tool_choice`` or the legacy ``function_call``."""
    if value is None:
        return None, None
    if isinstance(value, str):
        if value in _CHOICES and not (legacy and value == "required"):
            return value, None
        allowed = "'none', 'auto'" + ("" if legacy else ", 'required'")
        raise _bad(param, f"{param} must be {allowed} or a named function, got {value!r}")
    if isinstance(value, dict):
        fn = value if legacy else value.get("function")
        if (legacy or value.get("type") == "function") and isinstance(fn, dict):
            name = fn.get("name")
            if isinstance(name, str) and name:
                return "named", name
    shape = "{'name': ...}" if legacy else "{'type': 'function', 'function': {'name': ...}}"
    raise _bad(param, f"a named {param} must be {shape}, got {value!r}")


def tool_request(body: dict) -> ToolRequest | None:
    """The request's tool settings, checked; None when it has no tools (or tool_choice none
    with no tools). Raises ApiError 400 naming the field."""
    tools, legacy = _tools(body)
    param = "function_call" if legacy else "tool_choice"
    if legacy and body.get("tool_choice") is not None:
        raise _bad("tool_choice", "tool_choice goes with tools, function_call with functions")
    choice, named = _choice(body.get(param), param, legacy)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad(
            "parallel_tool_calls", f"parallel_tool_calls must be true or false, got {parallel!r}"
        )
    if not tools:
        # An empty list with auto/none is "no tools" (some clients always send the field).
        if choice in ("required", "named"):
            raise _bad(param, f"{param} {named or choice!r} needs tools")
        return None
    req = ToolRequest(tools, choice or "auto", named, parallel is not False and not legacy, legacy)
    if named is not None and req.tool(named) is None:
        known = ", ".join(t.name for t in tools)
        raise _bad(param, f"{param} names {named!r}, which is not among the tools ({known})")
    return req


# ---- the constrained decoder's schema ----------------------------------------------------


def _arguments_schema(tool: Tool) -> dict:
    # An empty schema would let the model write any JSON value; arguments are an object.
    schema = dict(tool.parameters) or {"type": "object"}
    schema.setdefault("type", "object")
    return schema


def constraint_schema(req: ToolRequest) -> dict | None:
    """The JSON schema the decoder enforces for an enforced choice (None for auto/none).

    Named: the tool's ``parameters`` (the output *is* the arguments). Required: an array of
    ``{"name": <tool>, "arguments": <its parameters>}`` items, one ``anyOf`` branch per tool so
    each call's arguments match its own tool; ``maxItems: 1`` without parallel calls.
    """
    if req.choice == "named":
        return _arguments_schema(req.tool(req.named))  # type: ignore[arg-type]
    if req.choice != "required":
        return None
    branches = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": _arguments_schema(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in req.tools
    ]
    item = branches[0] if len(branches) == 1 else {"anyOf": branches}
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if not req.parallel:
        schema["maxItems"] = 1
    return schema


STRUCTURAL_TAG_MODES = ("strict", "always", "off")


def auto_structural_tag(req: ToolRequest, parser: ToolCallParser, mode: str) -> dict | None:
    """The structural tag that constrains ``tool_choice: auto`` calls, or None (unconstrained).

    ``mode`` is ``--tool-call-structural-tag``: ``off``; ``always``; or ``strict``, which applies
    the tag only when some tool has ``"strict": true``. That is SGLang's rule: in
    python/sglang/srt/function_call/function_call_parser.py, ``get_structure_constraint``
    constrains auto only when ``any(tool.function.strict for tool in self.tools)`` (or its
    SGLANG_TOOL_STRICT_LEVEL env var says so). Unlike SGLang, which gives non-strict tools an
    empty schema there, every tool's call is checked against its own parameters. None too when
    the parser's format has no trigger (`ToolCallParser.structural_tag`).
    """
    if req.choice != "auto" or mode == "off":
        return None
    if mode == "strict" and not any(t.strict for t in req.tools):
        return None
    return parser.structural_tag([(t.name, _arguments_schema(t)) for t in req.tools])


def enforced_calls(req: ToolRequest, text: str) -> list[ParsedCall] | None:
    """The calls in an enforced completion (None if it is not complete JSON, e.g. cut by
    max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if req.choice == "named":
        if not isinstance(value, dict):
            return None
        return [ParsedCall(req.named, json.dumps(value, ensure_ascii=False))]  # type: ignore[arg-type]
    if not isinstance(value, list):
        return None
    calls = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        calls.append(
            ParsedCall(item["name"], json.dumps(item.get("arguments", {}), ensure_ascii=False))
        )
    return calls


# ---- the conversation ----------------------------------------------------------------------


def _arguments_value(args: Any, where: str) -> Any:
    """A history call's arguments as templates want them: a dict when it is JSON text."""
    if isinstance(args, dict):
        return args
    if not isinstance(args, str):
        raise _bad("messages", f"{where}.function.arguments must be a JSON string")
    try:
        return json.loads(args) if args.strip() else {}
    except json.JSONDecodeError:
        return args  # a template may still print it; the model wrote it this way


def history_calls(message: dict, where: str) -> list[dict] | None:
    """An assistant message's ``tool_calls`` (or legacy ``function_call``), checked, in the
    shape chat templates read: ``[{"id", "type", "function": {"name", "arguments": dict}}]``."""
    raw = message.get("tool_calls")
    if raw is None and message.get("function_call") is not None:
        raw = [{"type": "function", "function": message["function_call"]}]
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _bad("messages", f"{where}.tool_calls must be a list")
    out = []
    for j, call in enumerate(raw):
        w = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(
                "messages",
                f"{w} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}",
            )
        out.append(
            {
                "id": call.get("id") or new_call_id(),
                "type": "function",
                "function": {
                    "name": fn["name"],
                    "arguments": _arguments_value(fn.get("arguments", "{}"), w),
                },
            }
        )
    return out


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders a ``tools`` variable (else the fallback is used)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def fallback_messages(
    messages: list[dict], tools: list[dict] | None, parser: ToolCallParser
) -> list[dict]:
    """The conversation for a template that knows no tools: the tool list and call format in
    the system prompt, earlier calls as the parser's text, tool results as user turns."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [
                ParsedCall(c["function"]["name"], _json_text(c["function"]["arguments"]))
                for c in m["tool_calls"]
            ]
            text = "\n".join(x for x in (m.get("content") or "", parser.format_calls(calls)) if x)
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append(
                {"role": "user", "content": parser.format_result(m.get("name"), m["content"])}
            )
        else:
            out.append({"role": m["role"], "content": m["content"]})
    # Consecutive tool results became consecutive user turns; merge them into one.
    merged: list[dict] = []
    for m in out:
        if merged and m["role"] == "user" and merged[-1]["role"] == "user":
            merged[-1] = {"role": "user", "content": merged[-1]["content"] + "\n" + m["content"]}
        else:
            merged.append(m)
    if tools:
        text = parser.instructions(tools)
        if merged and merged[0]["role"] == "system":
            merged[0] = {"role": "system", "content": merged[0]["content"] + "\n\n" + text}
        else:
            merged.insert(0, {"role": "system", "content": text})
    return merged


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# ---- the response ---------------------------------------------------------------------------


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolOutput:
    """A finished completion as the response message's content and tool calls."""

    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)


def message_fields(out: ToolOutput, legacy: bool) -> dict:
    """The assistant message's fields (``tool_calls``, or ``function_call`` for legacy)."""
    if not out.calls:
        return {"role": "assistant", "content": out.content}
    if legacy:
        c = out.calls[0]
        return {
            "role": "assistant",
            "content": out.content or None,
            "function_call": {"name": c.name, "arguments": c.arguments},
        }
    return {
        "role": "assistant",
        "content": out.content or None,
        "tool_calls": [
            {
                "id": new_call_id(),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in out.calls
        ],
    }
