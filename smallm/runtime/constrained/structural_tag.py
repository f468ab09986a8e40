"""SGLang's structural tag: free text, with constrained structures opened by trigger strings.

The spec (what SGLang's ``/generate`` takes as ``sampling_params.structural_tag``, a JSON string,
and its chat route as ``response_format: {"type": "structural_tag", ...}``)::

    {"structures": [{"begin": "<tool_call>\\n{\\"name\\": \\"f\\", \\"arguments\\": ",
                     "schema": {...}, "end": "}\\n</tool_call>"}],
     "triggers": ["<tool_call>"]}

The model writes free text until it writes a trigger; from there the output must continue as
one of the structures whose ``begin`` starts with that trigger (the rest of ``begin``, a JSON
value matching ``schema``, then ``end``), after which free text resumes. Free text can never
contain a trigger, so a trigger always opens a structure that is checked to its end.

`parse_structural_tag` validates a spec (``GrammarError`` with a message naming the field);
`structural_tag_lark` writes the llguidance Lark grammar for it. Only llguidance compiles it:
the free-text lexeme is "any text & not containing a trigger", which needs llguidance's lexeme
intersection and negation (outlines' regex index has neither).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from smallm.runtime.constrained.base import GrammarError

__all__ = ["StructuralTag", "Structure", "parse_structural_tag", "structural_tag_lark"]


@dataclass(frozen=True)
class Structure:
    """One constrained region: ``begin``, then a JSON value matching ``schema``, then ``end``."""

    begin: str
    schema: dict
    end: str


@dataclass(frozen=True)
class StructuralTag:
    """A checked structural tag. ``at_least_one``: the output must hold at least one structure
    (xgrammar's legacy flag, which SGLang sets for required tool choices)."""

    structures: tuple[Structure, ...]
    triggers: tuple[str, ...]
    at_least_one: bool = False

    def to_json(self) -> str:
        """The spec as SGLang's JSON (``parse_structural_tag`` round-trips it)."""
        return json.dumps(
            {
                "type": "structural_tag",
                "structures": [
                    {"begin": s.begin, "schema": s.schema, "end": s.end} for s in self.structures
                ],
                "triggers": list(self.triggers),
                **({"at_least_one": True} if self.at_least_one else {}),
            },
            ensure_ascii=False,
        )


def _structure(item: Any, i: int) -> Structure:
    where = f"structures[{i}]"
    if not isinstance(item, dict):
        raise GrammarError(f"structural_tag {where} must be an object with begin, schema, end")
    for key in ("begin", "end"):
        if not isinstance(item.get(key), str):
            raise GrammarError(f"structural_tag {where}.{key} must be a string")
    if not item["begin"]:
        raise GrammarError(f"structural_tag {where}.begin must not be empty")
    # SGLang's pydantic model calls the field "schema" (alias of schema_); take either.
    schema = item.get("schema", item.get("schema_", {}))
    if schema is True or schema is None:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"structural_tag {where}.schema must be a JSON schema object")
    return Structure(item["begin"], schema, item["end"])


def parse_structural_tag(spec: str | dict) -> StructuralTag:
    """Check a structural tag (a JSON string or the decoded object).

    Rules: ``structures`` and ``triggers`` are non-empty lists; every trigger is a non-empty
    string and none contains another (a trigger inside another would end the free text at two
    places for the same bytes); every structure's ``begin`` starts with one of the triggers.
    Raises ``GrammarError`` naming the field.
    """
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise GrammarError(f"structural_tag is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise GrammarError("structural_tag must be an object with structures and triggers")
    kind = spec.get("type", "structural_tag")
    if kind != "structural_tag":
        raise GrammarError(f"structural_tag type must be 'structural_tag', got {kind!r}")
    if "format" in spec and "structures" not in spec:
        raise GrammarError(
            "structural_tag: only the {structures, triggers} form is supported, "
            "not xgrammar's newer {format: ...} form"
        )
    structures, triggers = spec.get("structures"), spec.get("triggers")
    if not isinstance(structures, list) or not structures:
        raise GrammarError("structural_tag structures must be a non-empty list")
    if not isinstance(triggers, list) or not triggers:
        raise GrammarError("structural_tag triggers must be a non-empty list of strings")
    if not all(isinstance(t, str) and t for t in triggers):
        raise GrammarError("structural_tag triggers must be non-empty strings")
    triggers = list(dict.fromkeys(triggers))
    for a in triggers:
        for b in triggers:
            if a != b and a in b:
                raise GrammarError(
                    f"structural_tag triggers must not contain one another: {a!r} is in {b!r}"
                )
    parsed = tuple(_structure(s, i) for i, s in enumerate(structures))
    for i, s in enumerate(parsed):
        if not any(s.begin.startswith(t) for t in triggers):
            raise GrammarError(
                f"structural_tag structures[{i}].begin {s.begin!r} does not start with any "
                f"trigger ({', '.join(map(repr, triggers))})"
            )
    at_least_one = spec.get("at_least_one", False)
    if not isinstance(at_least_one, bool):
        raise GrammarError("structural_tag at_least_one must be true or false")
    return StructuralTag(parsed, tuple(triggers), at_least_one)


def _regex_literal(text: str) -> str:
    # Every non-alphanumeric character as \x{..}: safe inside /.../ (no delimiter, no regex
    # metacharacter, and none of Rust regex's \< \> word-boundary escapes).
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):X}}}" for c in text)


def _string_literal(text: str) -> str:
    # Lark string literals take JSON's escapes; non-ASCII stays as it is.
    return json.dumps(text, ensure_ascii=False)


def structural_tag_lark(tag: StructuralTag, json_options: dict[str, Any] | None = None) -> str:
    """The llguidance Lark grammar for ``tag``.

    ``json_options`` (llguidance's JSON compile options: whitespace, strictness) are passed to
    every schema through its ``x-guidance`` key, so JSON inside a structure follows the same
    rules as a ``json_schema`` request.
    """
    any_text = "/(?s:.*)/"
    banned = "|".join(_regex_literal(t) for t in tag.triggers)
    free = f"({any_text} & ~/(?s:.*({banned}).*)/)"
    lines = []
    calls = []
    for k, trigger in enumerate(tag.triggers):
        alts = []
        for i, s in enumerate(tag.structures):
            if not s.begin.startswith(trigger):
                continue
            schema = dict(s.schema)
            if json_options:
                schema["x-guidance"] = {**json_options, **schema.get("x-guidance", {})}
            rest = s.begin[len(trigger) :]
            parts = [_string_literal(rest)] if rest else []
            parts.append(f"value_{i}")
            if s.end:
                parts.append(_string_literal(s.end))
            alts.append(" ".join(parts))
            lines.append(f"value_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
        if not alts:
            continue  # a trigger no structure begins with: it only bans text
        lines.append(f"TRIGGER_{k}: {free} {_string_literal(trigger)}")
        lines.append(f"call_{k}: " + " | ".join(alts))
        calls.append(f"TRIGGER_{k} call_{k}")
    lines.append(f"TAIL: {free}")
    call = calls[0] if len(calls) == 1 else "(" + " | ".join(calls) + ")"
    repeat = "+" if tag.at_least_one else "*"
    return "\n".join([f"start: ({call}){repeat} TAIL", *lines]) + "\n"
