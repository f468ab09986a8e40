"""Constrained-output fields of the OpenAI routes, mapped to the one native grammar field.

Clients spell "constrain the output" many ways: OpenAI's ``response_format``; SGLang's native
extras ``regex`` / ``json_schema`` / ``ebnf``; vLLM's ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar`` (sent by guidance and LangChain's vLLM client); vLLM's
newer ``structured_outputs: {json, regex, choice, grammar}``; and a named or ``required``
``tool_choice``; SGLang's ``response_format: {"type": "structural_tag", "structures": [...],
"triggers": [...]}``. Each becomes one native ``regex``, ``json_schema`` (a JSON string),
``ebnf`` (Lark, or GBNF converted to Lark, compiled by llguidance) or ``structural_tag`` (JSON,
compiled by llguidance). A request may use only one of them; two is a 400 naming both, never a
silent pick. (``tool_choice: auto`` may add a structural tag of its own: ``tool_calls.py``.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from smallm.runtime.constrained.base import GrammarError
from smallm.runtime.constrained.regex_utils import choices_regex
from smallm.runtime.constrained.structural_tag import parse_structural_tag
from smallm.runtime.server.http.errors import ApiError


@dataclass
class Constraint:
    """One native grammar field and the client field it came from (for error messages)."""

    native: str  # "regex" | "json_schema" | "ebnf" | "structural_tag"
    spec: str
    source: str  # the client's field name, e.g. "guided_json" or "structured_outputs.choice"


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


def _schema_text(value: Any, source: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _bad(source.split(".")[0], f"{source} is not valid JSON: {e}") from None
    if not isinstance(value, (dict, bool)):
        raise _bad(source.split(".")[0], f"{source} must be a JSON schema (an object)")
    return json.dumps(value)


def _string(value: Any, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(source.split(".")[0], f"{source} must be a non-empty string")
    return value


def _choice(value: Any, source: str) -> str:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise _bad(source.split(".")[0], f"{source} must be a non-empty list of strings")
    return choices_regex(value)


def structural_tag_text(value: Any, source: str) -> str:
    """A structural tag (JSON text or object), checked, as the native field's JSON string."""
    try:
        return parse_structural_tag(value).to_json()
    except GrammarError as e:
        text = str(e)
        if source != "structural_tag":
            text = text.replace("structural_tag", source, 1)
        raise _bad(source.split(".")[0], text) from None


# (client field, native field, converter)
_GUIDED = (
    ("json", "json_schema", _schema_text),
    ("regex", "regex", _string),
    ("choice", "regex", _choice),
    ("grammar", "ebnf", _string),
)


# SGLang's native extras on the OpenAI routes: (field, converter)
_NATIVE = (
    ("regex", _string),
    ("json_schema", _schema_text),
    ("ebnf", _string),
    ("structural_tag", structural_tag_text),
)
NATIVE_GRAMMAR_FIELDS = tuple(name for name, _ in _NATIVE)


def response_format_constraint(rf: Any) -> Constraint | None:
    """The constraint of a chat ``response_format`` (None for text or absent)."""
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_schema", json.dumps({"type": "object"}), "response_format")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema", spec.get("schema_")) if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise _bad(
                "response_format",
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
            )
        strict = spec.get("strict")  # type: ignore[union-attr]
        if strict is not None and not isinstance(strict, bool):
            raise _bad(
                "response_format", "response_format.json_schema.strict must be true or false"
            )
        # strict or not, the schema is enforced by the constrained decoder.
        return Constraint("json_schema", json.dumps(schema), "response_format")
    if kind == "structural_tag":
        # SGLang's shape: the tag's fields sit beside "type" in response_format itself.
        spec = structural_tag_text(rf, "response_format")
        return Constraint("structural_tag", spec, "response_format")
    raise _bad(
        "response_format",
        "response_format must be {'type': 'text'}, {'type': 'json_object'}, "
        "{'type': 'json_schema', 'json_schema': {...}} or "
        f"{{'type': 'structural_tag', 'structures': [...], 'triggers': [...]}}, got {rf!r}",
    )


def request_constraints(body: dict) -> list[Constraint]:
    """Every constraint the body asks for, in any of the spellings (checked, not yet merged)."""
    found: list[Constraint] = []
    for native, convert in _NATIVE:
        value = body.get(native)
        if value is not None:
            found.append(Constraint(native, convert(value, native), native))
    for name, native, convert in _GUIDED:
        value = body.get(f"guided_{name}")
        if value is not None:
            found.append(Constraint(native, convert(value, f"guided_{name}"), f"guided_{name}"))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("structured_outputs", "structured_outputs must be an object")
        for name, native, convert in _GUIDED:
            value = so.get(name)
            if value is not None:
                source = f"structured_outputs.{name}"
                found.append(Constraint(native, convert(value, source), source))
        if so.get("json_object"):
            found.append(
                Constraint("json_schema", '{"type": "object"}', "structured_outputs.json_object")
            )
    rf = response_format_constraint(body.get("response_format"))
    if rf is not None:
        found.append(rf)
    return found


def single_constraint(found: list[Constraint]) -> Constraint | None:
    """The one constraint of a request; 400 naming the fields when there are several."""
    # The same constraint in several spellings is one constraint: guidance's vLLM client sends
    # guided_grammar and structured_outputs.grammar together, for old and new vLLM alike.
    found = list({(c.native, c.spec): c for c in found}.values())
    if len(found) > 1:
        names = ", ".join(c.source for c in found)
        raise _bad(found[1].source.split(".")[0], f"give one output constraint, got {names}")
    return found[0] if found else None


def apply_constraint(body: dict, c: Constraint | None) -> dict:
    """``body`` with the constraint as its native field (and the other spellings removed)."""
    out = {k: v for k, v in body.items() if k not in NATIVE_GRAMMAR_FIELDS}
    if c is not None:
        out[c.native] = c.spec
    return out
