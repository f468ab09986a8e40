"""JSON schema -> regex for the outlines backend, without silently dropping constraints.

outlines-core's ``build_regex_from_schema`` handles the structure (objects, arrays, strings,
anyOf) but, measured on 0.2.14, ignores or mistranslates many value constraints: numeric
bounds and ``multipleOf``, ``uniqueItems``, ``pattern``/``format`` next to a length, ``allOf``
(concatenated, producing two JSON values), ``oneOf`` exclusivity, ``type`` next to ``anyOf`` or
``$ref``, recursive ``$ref`` (a required property is dropped at the depth limit); its
``date``/``uri`` formats use Unicode ``\\d``/``\\s``, ``date-time`` omits the mandatory offset,
``time`` has an escaping bug, and ``pattern`` is pasted raw between quotes (so ``.`` can emit a
bare quote).

So the schema is first *normalized* here into the subset outlines translates correctly:
``$ref`` inlined (recursion rejected), ``allOf`` merged, ``type`` lists and sibling keywords of
``anyOf``/``oneOf`` distributed into branches, ``oneOf`` accepted only when its branches are
provably disjoint. Leaves whose regex we build ourselves (formats, patterns, numeric ranges,
enum/const, empty objects/arrays) are replaced by a placeholder ``const`` that is swapped for our
regex in outlines' output. Every keyword that constrains values and cannot be enforced raises
``GrammarError`` naming it; outputs may be a strict subset of the valid documents (e.g.
properties in schema order, no optional whitespace beyond the whitespace pattern).
"""

from __future__ import annotations

import json
import math
from functools import reduce
from typing import Any

from smallm.runtime.constrained.base import GrammarError
from smallm.runtime.constrained.regex_utils import (
    FORMAT_REGEXES,
    ascii_digit_classes,
    escape_literal,
    integer_range_regex,
    json_string_pattern,
    number_range_regex,
)

__all__ = ["schema_to_regex"]

# Keywords that never constrain values.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "$schema",
        "$id",
        "$comment",
        "$anchor",
        "$defs",
        "definitions",
        "examples",
        "default",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
    }
)

TYPE_KEYWORDS = {
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "number": frozenset(
        {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
    ),
    "object": frozenset(
        {
            "properties",
            "required",
            "additionalProperties",
            "minProperties",
            "maxProperties",
            "patternProperties",
            "propertyNames",
            "dependentRequired",
            "dependentSchemas",
            "dependencies",
            "unevaluatedProperties",
        }
    ),
    "array": frozenset(
        {
            "items",
            "prefixItems",
            "additionalItems",
            "minItems",
            "maxItems",
            "uniqueItems",
            "contains",
            "minContains",
            "maxContains",
            "unevaluatedItems",
        }
    ),
}
TYPE_KEYWORDS["integer"] = TYPE_KEYWORDS["number"]
JSON_TYPES = ("string", "number", "integer", "object", "array", "boolean", "null")

# Applicators we cannot express as a regex at all.
UNSUPPORTED = ("not", "if", "then", "else", "$dynamicRef", "$recursiveRef")

# Objects: keywords that add constraints our generated objects might violate.
OBJECT_UNSUPPORTED = (
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
)
ARRAY_UNSUPPORTED = ("contains", "minContains", "maxContains", "unevaluatedItems")

_PLACEHOLDER = "SMLMPH"
_MAX_DEPTH = 64

# Free-form JSON is not a regular language: outlines nests free-form containers to a fixed
# depth (2 by default), but the index for any-value at depth 2 took 67 s to build with a 49k
# vocabulary (depth 1: 1.7 s, depth 0: 0.15 s). We generate free-form objects/arrays with one
# level of free-form nesting and "any value" with primitive-only containers: a strict subset.
_FREE_DEPTH = 1
ANY_VALUE: dict[str, Any] = {
    "anyOf": [
        {"type": "boolean"},
        {"type": "null"},
        {"type": "number"},
        {"type": "string"},
        {"type": "array", "depth": 0},
        {"type": "object", "depth": 0},
    ]
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise GrammarError(f"not a JSON value: {value!r}")


def _has_type(value: Any, t: str) -> bool:
    vt = _json_type(value)
    return vt == t or (t == "number" and vt == "integer")


def _value_key(value: Any) -> str:
    """Canonical form for JSON equality (1 == 1.0, but true != 1)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _compact(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # avoid "1.0" vs "1" surprises: both are the same JSON number
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _types_of(node: Any) -> set[str] | None:
    """The JSON types a schema can produce (integer kept distinct), None when unknown/any."""
    if not isinstance(node, dict):
        return None
    if "const" in node:
        return {_json_type(node["const"])}
    if "enum" in node and isinstance(node["enum"], list):
        return {_json_type(v) for v in node["enum"]}
    t = node.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return set(t)
    if "anyOf" in node and isinstance(node["anyOf"], list):
        out: set[str] = set()
        for branch in node["anyOf"]:
            sub = _types_of(branch)
            if sub is None:
                return None
            out |= sub
        return out
    inferred = {name for name, kws in TYPE_KEYWORDS.items() if kws & set(node)}
    return inferred or None


def _overlap(a: set[str], b: set[str]) -> bool:
    if a & b:
        return True
    return ("integer" in a and "number" in b) or ("number" in a and "integer" in b)


def _values_of(node: Any) -> set[str] | None:
    if isinstance(node, dict):
        if "const" in node:
            return {_value_key(node["const"])}
        if isinstance(node.get("enum"), list):
            return {_value_key(v) for v in node["enum"]}
    return None


class _Normalizer:
    def __init__(self, root: Any, whitespace: str) -> None:
        self.root = root
        self.ws = whitespace
        self.regexes: list[str] = []
        self.stack: list[str] = []
        text = json.dumps(root)
        self.token = _PLACEHOLDER
        while self.token in text:  # never collide with the user's own strings
            self.token += "Q"

    # -- helpers ---------------------------------------------------------------------------

    def placeholder(self, regex: str) -> dict[str, Any]:
        self.regexes.append(regex)
        return {"const": f"{self.token}{len(self.regexes) - 1}X"}

    def substitute(self, regex: str) -> str:
        # Highest index first so "...1X" is never a prefix problem (the X terminator already
        # prevents it; the order is just belt and braces).
        for i in range(len(self.regexes) - 1, -1, -1):
            regex = regex.replace(f'"{self.token}{i}X"', f"(?:{self.regexes[i]})")
        return regex

    def resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str):
            raise GrammarError("$ref must be a string")
        if not ref.startswith("#"):
            raise GrammarError(f"$ref {ref!r}: only local references ('#/...') are supported")
        node = self.root
        for raw in ref[1:].split("/"):
            if raw == "":
                continue
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise GrammarError(f"$ref {ref!r} does not resolve")
        return node

    def deref(self, node: Any, seen: tuple[str, ...] = ()) -> Any:
        """``node`` with a top-level $ref replaced by its target merged with the siblings."""
        if not isinstance(node, dict) or "$ref" not in node:
            return node
        ref = node["$ref"]
        if ref in seen or ref in self.stack:
            raise GrammarError(f"recursive $ref {ref!r} is not supported by this backend")
        target = self.deref(self.resolve(ref), (*seen, ref))
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        return self.merge(target, siblings)

    def merge(self, a: Any, b: Any) -> Any:
        """The conjunction of two schemas as one schema (for allOf and sibling keywords)."""
        if a is True or a == {}:
            return b
        if b is True or b == {}:
            return a
        if a is False or b is False:
            raise GrammarError("a false schema (no value is valid)")
        if not isinstance(a, dict) or not isinstance(b, dict):
            raise GrammarError("a schema must be an object or a boolean")
        for x, y in ((a, b), (b, a)):
            if x.get("additionalProperties") is False:
                extra = set(y.get("properties", {})) - set(x.get("properties", {}))
                if extra:
                    raise GrammarError(
                        "allOf: additionalProperties false excludes properties "
                        f"{sorted(extra)} of another branch"
                    )
        out = dict(a)
        for k, v in b.items():
            if k in ANNOTATIONS or k not in out:
                out.setdefault(k, v)
                continue
            cur = out[k]
            if _value_key(cur) == _value_key(v):
                continue
            if k == "type":
                ta = {cur} if isinstance(cur, str) else set(cur)
                tb = {v} if isinstance(v, str) else set(v)
                both = ta & tb
                if ("number" in ta and "integer" in tb) or ("integer" in ta and "number" in tb):
                    both.add("integer")
                if not both:
                    raise GrammarError(f"allOf: incompatible types {cur!r} and {v!r}")
                out[k] = sorted(both)
            elif k == "required":
                out[k] = list(dict.fromkeys([*cur, *v]))
            elif k == "properties":
                props = dict(cur)
                for name, sub in v.items():
                    props[name] = {"allOf": [props[name], sub]} if name in props else sub
                out[k] = props
            elif k == "enum":
                keep = {_value_key(x) for x in v}
                out[k] = [x for x in cur if _value_key(x) in keep]
            elif k in ("minimum", "minLength", "minItems", "minProperties", "exclusiveMinimum"):
                out[k] = max(cur, v)
            elif k in ("maximum", "maxLength", "maxItems", "maxProperties", "exclusiveMaximum"):
                out[k] = min(cur, v)
            elif k == "allOf":
                out[k] = [*cur, *v]
            else:
                raise GrammarError(f"allOf: conflicting values for keyword {k!r}")
        return out

    # -- the normalization -------------------------------------------------------------------

    def norm(self, node: Any, depth: int = 0) -> dict[str, Any]:
        if depth > _MAX_DEPTH:
            raise GrammarError("schema nesting is too deep")
        if node is True or node == {}:
            return ANY_VALUE
        if node is False:
            raise GrammarError("a false schema (no value is valid) cannot be generated")
        if not isinstance(node, dict):
            raise GrammarError(f"a schema must be an object or a boolean, got {node!r}")
        for k in UNSUPPORTED:
            if k in node:
                raise GrammarError(f"JSON schema keyword {k!r} is not supported by this backend")
        if "$ref" in node:
            ref = node["$ref"]
            if ref in self.stack:
                raise GrammarError(f"recursive $ref {ref!r} is not supported by this backend")
            target = self.deref(node)
            self.stack.append(ref)
            try:
                return self.norm(target, depth + 1)
            finally:
                self.stack.pop()
        if "allOf" in node:
            parts = node["allOf"]
            if not isinstance(parts, list) or not parts:
                raise GrammarError("allOf must be a non-empty array")
            rest = {k: v for k, v in node.items() if k != "allOf"}
            merged = reduce(self.merge, [self.deref(p) for p in parts], self.deref(rest))
            return self.norm(merged, depth + 1)
        if "anyOf" in node and "oneOf" in node:
            raise GrammarError("anyOf together with oneOf is not supported by this backend")
        for comb in ("anyOf", "oneOf"):
            if comb in node:
                return self.norm_union(node, comb, depth)
        if "enum" in node or "const" in node:
            return self.norm_values(node)
        return self.norm_typed(node, depth)

    def norm_union(self, node: dict[str, Any], comb: str, depth: int) -> dict[str, Any]:
        branches = node[comb]
        if not isinstance(branches, list) or not branches:
            raise GrammarError(f"{comb} must be a non-empty array")
        siblings = {k: v for k, v in node.items() if k != comb and k not in ANNOTATIONS}
        merged = [self.merge(self.deref(b), siblings) for b in branches]
        if comb == "oneOf":
            for i in range(len(merged)):
                for j in range(i + 1, len(merged)):
                    if not self.disjoint(merged[i], merged[j]):
                        raise GrammarError(
                            "oneOf: branches that may overlap cannot be enforced by this "
                            f"backend (branches {i} and {j})"
                        )
        out = [self.norm(b, depth + 1) for b in merged]
        return out[0] if len(out) == 1 else {"anyOf": out}

    def disjoint(self, a: Any, b: Any) -> bool:
        """Provably no value satisfies both schemas (type, const/enum, or a discriminator)."""
        a, b = self.deref(a), self.deref(b)
        ta, tb = _types_of(a), _types_of(b)
        if ta is not None and tb is not None and not _overlap(ta, tb):
            return True
        va, vb = _values_of(a), _values_of(b)
        if va is not None and vb is not None:
            return not (va & vb)
        if isinstance(a, dict) and isinstance(b, dict):
            req = set(a.get("required", [])) & set(b.get("required", []))
            pa, pb = a.get("properties", {}), b.get("properties", {})
            for name in req:
                if name in pa and name in pb:
                    xa, xb = _values_of(self.deref(pa[name])), _values_of(self.deref(pb[name]))
                    if xa is not None and xb is not None and not (xa & xb):
                        return True
        return False

    def norm_values(self, node: dict[str, Any]) -> dict[str, Any]:
        values: list[Any]
        if "enum" in node:
            if not isinstance(node["enum"], list) or not node["enum"]:
                raise GrammarError("enum must be a non-empty array")
            values = list(node["enum"])
            if "const" in node:
                values = [v for v in values if _value_key(v) == _value_key(node["const"])]
        else:
            values = [node["const"]]
        for k in node:
            if k not in ANNOTATIONS and k not in ("enum", "const", "type"):
                raise GrammarError(
                    f"JSON schema keyword {k!r} next to enum/const is not supported by this backend"
                )
        t = node.get("type")
        if t is not None:
            types = [t] if isinstance(t, str) else list(t)
            values = [v for v in values if any(_has_type(v, x) for x in types)]
        if not values:
            raise GrammarError("enum/const: no value satisfies the schema")
        return self.placeholder("|".join(escape_literal(_compact(v)) for v in values))

    def norm_typed(self, node: dict[str, Any], depth: int) -> dict[str, Any]:
        t = node.get("type")
        if t is None:
            # Keywords only apply to their type; generating only the types they describe is a
            # valid subset. With none at all, any JSON value.
            types = [name for name in JSON_TYPES if TYPE_KEYWORDS.get(name, set()) & set(node)]
            if "integer" in types:
                types.remove("integer")  # number covers it
            if not types:
                return ANY_VALUE
        elif isinstance(t, str):
            types = [t]
        elif isinstance(t, list) and t and all(isinstance(x, str) for x in t):
            types = list(dict.fromkeys(t))
        else:
            raise GrammarError("type must be a string or a non-empty array of strings")
        out = [self.norm_type(x, node, depth) for x in types]
        return out[0] if len(out) == 1 else {"anyOf": out}

    def norm_type(self, t: str, node: dict[str, Any], depth: int) -> dict[str, Any]:
        if t == "string":
            return self.norm_string(node)
        if t in ("integer", "number"):
            return self.norm_number(t, node)
        if t == "object":
            return self.norm_object(node, depth)
        if t == "array":
            return self.norm_array(node, depth)
        if t in ("boolean", "null"):
            return {"type": t}
        raise GrammarError(f"unknown JSON schema type {t!r}")

    def norm_string(self, node: dict[str, Any]) -> dict[str, Any]:
        fmt, pattern = node.get("format"), node.get("pattern")
        min_len, max_len = node.get("minLength", 0), node.get("maxLength")
        for name, val in (("minLength", min_len), ("maxLength", max_len)):
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
                raise GrammarError(f"{name} must be a non-negative integer")
        has_length = bool(min_len) or max_len is not None
        used = [
            k for k, on in (("format", fmt), ("pattern", pattern), ("length", has_length)) if on
        ]
        if len(used) > 1:
            names = {"length": "minLength/maxLength"}
            raise GrammarError(
                "JSON schema keywords "
                + " and ".join(repr(names.get(k, k)) for k in used)
                + " on the same string cannot be enforced together by this backend"
            )
        if fmt is not None:
            if fmt not in FORMAT_REGEXES:
                raise GrammarError(
                    f"JSON schema keyword 'format' with value {fmt!r} is not supported by this "
                    f"backend (supported: {', '.join(sorted(FORMAT_REGEXES))})"
                )
            return self.placeholder('"' + FORMAT_REGEXES[fmt] + '"')
        if pattern is not None:
            if not isinstance(pattern, str):
                raise GrammarError("pattern must be a string")
            return self.placeholder(json_string_pattern(pattern))
        if has_length:
            if max_len is not None and max_len < min_len:
                raise GrammarError(f"minLength {min_len} > maxLength {max_len}")
            out: dict[str, Any] = {"type": "string", "minLength": min_len}
            if max_len is not None:
                out["maxLength"] = max_len
            return out
        return {"type": "string"}

    def norm_number(self, t: str, node: dict[str, Any]) -> dict[str, Any]:
        step = node.get("multipleOf")
        if step is not None and not (t == "integer" and step == 1):
            raise GrammarError("JSON schema keyword 'multipleOf' is not supported by this backend")
        lo, hi = node.get("minimum"), node.get("maximum")
        ex_lo, ex_hi = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
        lo_excl = hi_excl = False
        # Draft 4 spelled exclusive bounds as booleans next to minimum/maximum.
        if isinstance(ex_lo, bool):
            lo_excl, ex_lo = ex_lo and lo is not None, None
        if isinstance(ex_hi, bool):
            hi_excl, ex_hi = ex_hi and hi is not None, None
        for name, val in (
            ("minimum", lo),
            ("maximum", hi),
            ("exclusiveMinimum", ex_lo),
            ("exclusiveMaximum", ex_hi),
        ):
            if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float))):
                raise GrammarError(f"{name} must be a number")
        if ex_lo is not None and (lo is None or ex_lo >= lo):
            lo, lo_excl = ex_lo, True
        if ex_hi is not None and (hi is None or ex_hi <= hi):
            hi, hi_excl = ex_hi, True
        if lo is None and hi is None:
            return {"type": t}
        if t == "integer":
            ilo = None if lo is None else (math.floor(lo) + 1 if lo_excl else math.ceil(lo))
            ihi = None if hi is None else (math.ceil(hi) - 1 if hi_excl else math.floor(hi))
            return self.placeholder(integer_range_regex(ilo, ihi))
        regex = number_range_regex(lo, hi, lo_excl, hi_excl)
        if regex is None:
            names = [k for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")]
            present = [k for k in names if node.get(k) is not None] or names[:1]
            raise GrammarError(
                f"JSON schema keyword {present[0]!r} on a number is only supported by this "
                "backend with integral bounds >= 0"
            )
        return self.placeholder(regex)

    def norm_object(self, node: dict[str, Any], depth: int) -> dict[str, Any]:
        for k in OBJECT_UNSUPPORTED:
            if k in node:
                raise GrammarError(f"JSON schema keyword {k!r} is not supported by this backend")
        props = node.get("properties", {})
        required = node.get("required", [])
        addl = node.get("additionalProperties", True)
        if not isinstance(props, dict) or not isinstance(required, list):
            raise GrammarError("properties must be an object and required an array")
        props = dict(props)
        for name in required:
            if name not in props:
                if addl is False:
                    raise GrammarError(
                        f"required property {name!r} is excluded by additionalProperties false"
                    )
                props[name] = addl if isinstance(addl, dict) else {}
        min_p, max_p = node.get("minProperties", 0), node.get("maxProperties")
        if props:
            for name in props:
                if any(c in name for c in '"\\') or any(ord(c) < 0x20 for c in name):
                    raise GrammarError(f"property name {name!r} needs JSON escaping")
            # Our objects hold every required property and some optional ones, nothing else.
            if min_p > len(required):
                raise GrammarError(
                    "JSON schema keyword 'minProperties' above the number of required "
                    "properties is not supported by this backend"
                )
            if max_p is not None and max_p < len(props):
                raise GrammarError(
                    "JSON schema keyword 'maxProperties' below the number of properties is "
                    "not supported by this backend"
                )
            return {
                "type": "object",
                "properties": {k: self.norm(v, depth + 1) for k, v in props.items()},
                "required": list(required),
            }
        if addl is False or max_p == 0:
            if min_p:
                raise GrammarError("minProperties > 0 but no property is allowed")
            return self.placeholder(r"\{" + self.ws + r"\}")
        out: dict[str, Any] = {"type": "object", "depth": _FREE_DEPTH}
        if isinstance(addl, dict) and addl:
            out["additionalProperties"] = self.norm(addl, depth + 1)
        if min_p:
            out["minProperties"] = min_p
        if max_p is not None:
            out["maxProperties"] = max_p
        return out

    def norm_array(self, node: dict[str, Any], depth: int) -> dict[str, Any]:
        for k in ARRAY_UNSUPPORTED:
            if k in node:
                raise GrammarError(f"JSON schema keyword {k!r} is not supported by this backend")
        min_i, max_i = node.get("minItems", 0), node.get("maxItems")
        if max_i is not None and max_i < min_i:
            raise GrammarError(f"minItems {min_i} > maxItems {max_i}")
        if node.get("uniqueItems") is True and (max_i is None or max_i > 1):
            raise GrammarError("JSON schema keyword 'uniqueItems' is not supported by this backend")
        items = node.get("items", True)
        if isinstance(items, list):  # draft 4-2019 tuple form
            prefix, rest = items, node.get("additionalItems", True)
        else:
            prefix, rest = node.get("prefixItems"), items
        if prefix:
            n = len(prefix)
            if min_i > n:
                raise GrammarError(
                    "JSON schema keyword 'minItems' beyond prefixItems is not supported by "
                    "this backend"
                )
            if max_i is not None and max_i < n:
                raise GrammarError(
                    "JSON schema keyword 'maxItems' below the number of prefixItems is not "
                    "supported by this backend"
                )
            return {"prefixItems": [self.norm(p, depth + 1) for p in prefix]}
        if rest is False or max_i == 0:
            if min_i:
                raise GrammarError("minItems > 0 but no item is allowed")
            return self.placeholder(r"\[" + self.ws + r"\]")
        out: dict[str, Any] = {"type": "array", "depth": _FREE_DEPTH}
        if rest is not True and rest != {}:
            out["items"] = self.norm(rest, depth + 1)
        if min_i:
            out["minItems"] = min_i
        if max_i is not None:
            out["maxItems"] = max_i
        return out


def schema_to_regex(schema_text: str, whitespace: str) -> str:
    """The regex (ASCII classes) for JSON documents valid under ``schema_text``.

    ``whitespace`` is the regex allowed between tokens (``[ ]?``; ``""`` for compact JSON).
    Raises GrammarError for invalid JSON, invalid schemas and unenforceable keywords.
    """
    from outlines_core.json_schema import build_regex_from_schema

    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError as e:
        raise GrammarError(f"json_schema is not valid JSON: {e}") from None
    norm = _Normalizer(schema, whitespace)
    normalized = norm.norm(schema)
    try:
        regex = build_regex_from_schema(json.dumps(normalized), whitespace)
    except ValueError as e:
        raise GrammarError(f"outlines could not translate the schema: {e}") from None
    return ascii_digit_classes(norm.substitute(regex))
