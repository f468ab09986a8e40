"""Regex building blocks for the regex-based (outlines) backend.

Everything here emits regexes that both engines we feed them to understand: the Rust ``regex``
crate (outlines-core builds its DFA with it) and interegular (the jump-forward FSM). So only
plain syntax is used: ``(?:...)``, classes with backslash-escaped specials, ``{m,n}``, and
literal non-ASCII characters (neither ``\\u`` nor ``\\x{...}``).

Classes are ASCII wherever we generate them: in Rust ``\\d`` is Unicode-aware (177 DFA states
instead of 9 for ``\\d{3}-\\d{4}``), which multiplies the index's build time and lets a model
write Arabic-Indic digits into a JSON number.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from smallm.runtime.constrained.base import GrammarError

__all__ = [
    "FORMAT_REGEXES",
    "ascii_digit_classes",
    "choices_regex",
    "escape_literal",
    "integer_range_regex",
    "json_string_pattern",
    "number_range_regex",
    "parse_choices",
    "strip_anchors",
]

_META = set("\\.+*?()|[]{}^$")
_CLASS_META = set("\\]-[^&~")
_SIMPLE_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_char(c: str, in_class: bool = False) -> str:
    if c in (_CLASS_META if in_class else _META):
        return "\\" + c
    if c in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[c]
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\x{ord(c):02x}"
    return c


def escape_literal(text: str) -> str:
    """A regex matching exactly ``text`` (Rust- and interegular-compatible escaping)."""
    return "".join(_escape_char(c) for c in text)


def ascii_digit_classes(regex: str) -> str:
    """Rewrite ``\\d`` to ``[0-9]`` (``0-9`` inside a class) and ``\\D`` to ``[^0-9]`` outside
    classes. Other escapes, and ``\\\\d`` (an escaped backslash before ``d``), are untouched."""
    out: list[str] = []
    i, depth = 0, 0
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            if nxt == "d":
                out.append("0-9" if depth else "[0-9]")
            elif nxt == "D" and not depth:
                out.append("[^0-9]")
            else:
                out.append(regex[i : i + 2])
            i += 2
            continue
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
        out.append(c)
        i += 1
    return "".join(out)


def parse_choices(spec: str) -> list[str]:
    """The choice list of a ``choices`` spec (a JSON list of strings)."""
    try:
        choices = json.loads(spec)
    except json.JSONDecodeError as e:
        raise GrammarError(f"choices must be a JSON list of strings: {e}") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarError("choices must be a non-empty JSON list of strings")
    return choices


def choices_regex(choices: list[str]) -> str:
    """An alternation matching exactly one of the choices."""
    return "|".join(escape_literal(c) for c in dict.fromkeys(choices))


def strip_anchors(regex: str) -> str:
    """Drop one leading ``^`` and one trailing unescaped ``$``: the whole output always has to
    match, and an anchor before our sentinel would make the language empty."""
    if regex.startswith("^"):
        regex = regex[1:]
    if regex.endswith("$"):
        slashes = len(regex[:-1]) - len(regex[:-1].rstrip("\\"))
        if slashes % 2 == 0:
            regex = regex[:-1]
    return regex


# --------------------------------------------------------------------------- integer ranges


def _group(alternatives: list[str]) -> str:
    return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"


def _same_length_range(a: str, b: str) -> list[str]:
    """Alternatives matching the decimal strings from ``a`` to ``b`` (equal lengths, a <= b)."""
    if a == b:
        return [a]
    n = len(a)
    if n == 1:
        return [f"[{a}-{b}]"]
    if a[1:] == "0" * (n - 1) and b[1:] == "9" * (n - 1):
        head = a[0] if a[0] == b[0] else f"[{a[0]}-{b[0]}]"
        return [f"{head}[0-9]{{{n - 1}}}"]
    if a[0] == b[0]:
        return [a[0] + _group(_same_length_range(a[1:], b[1:]))]
    parts = [a[0] + _group(_same_length_range(a[1:], "9" * (n - 1)))]
    lo, hi = int(a[0]) + 1, int(b[0]) - 1
    if lo <= hi:
        head = str(lo) if lo == hi else f"[{lo}-{hi}]"
        parts.append(f"{head}[0-9]{{{n - 1}}}")
    parts.append(b[0] + _group(_same_length_range("0" * (n - 1), b[1:])))
    return parts


def _nonneg_range(lo: int, hi: int | None) -> list[str]:
    """Alternatives for the canonical decimals of ``lo..hi`` (``hi`` None: unbounded)."""
    parts: list[str] = []
    length = len(str(lo))
    while True:
        first = lo if length == len(str(lo)) else 10 ** (length - 1)
        last = 10**length - 1
        if hi is not None and hi <= last:
            parts += _same_length_range(str(first), str(hi))
            return parts
        parts += _same_length_range(str(first), str(last))
        if hi is None:
            # Every number with more digits is in range.
            parts.append(f"[1-9][0-9]{{{length},}}")
            return parts
        length += 1


def integer_range_regex(lo: int | None, hi: int | None) -> str:
    """A regex for the JSON integers (no leading zeros, no ``-0``) in ``[lo, hi]``; None is an
    open end. Raises GrammarError for an empty range."""
    if lo is not None and hi is not None and lo > hi:
        raise GrammarError(f"empty integer range: minimum {lo} > maximum {hi}")
    parts: list[str] = []
    if lo is None or lo < 0:
        # Negative part: -(|hi'| .. |lo|), where hi' = min(hi, -1).
        neg_hi = -1 if hi is None or hi >= 0 else hi
        parts.append("-" + _group(_nonneg_range(-neg_hi, None if lo is None else -lo)))
    if hi is None or hi >= 0:
        parts += _nonneg_range(max(lo or 0, 0), hi)
    return _group(parts)


def number_range_regex(
    lo: float | None, hi: float | None, lo_exclusive: bool, hi_exclusive: bool
) -> str | None:
    """A regex for JSON numbers (plain decimals, no exponent) in the interval, or None when the
    bounds are outside what is supported: integral bounds with ``lo >= 0`` (the common
    "non-negative", "percentage", "price" cases). The caller rejects the schema on None."""
    for bound in (lo, hi):
        if bound is not None and (bound != int(bound) or bound < 0):
            return None
    if lo is None:
        return None  # negative numbers unbounded below: not supported
    a, b = int(lo), None if hi is None else int(hi)
    frac = r"(?:\.[0-9]+)?"
    nonzero_frac = r"\.[0-9]*[1-9][0-9]*"
    parts: list[str] = []
    # Integer part strictly inside the interval (or at an end) with any fraction.
    first = a + 1 if lo_exclusive else a
    last = None if b is None else b - 1
    if last is None or first <= last:
        parts.append(integer_range_regex(first, last) + frac)
    if lo_exclusive and (b is None or a < b):
        parts.append(str(a) + nonzero_frac)  # just above an exclusive lower bound
    if b is not None and not hi_exclusive and (a < b or not lo_exclusive):
        parts.append(str(b) + r"(?:\.0+)?")  # exactly the upper bound
    if not parts:
        raise GrammarError(f"empty number range ({lo}, {hi})")
    return _group(parts)


# --------------------------------------------------------------------------- string formats

_DAY_31 = "(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
_DAY_30 = "(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
_DAY_FEB = "02-(?:0[1-9]|1[0-9]|2[0-8])"  # no Feb 29: a regex cannot check leap years
_DATE = f"[1-9][0-9]{{3}}-(?:{_DAY_31}|{_DAY_30}|{_DAY_FEB})"
_TIME = (
    r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
    r"(?:Z|[+\-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
_LABEL = "[a-zA-Z0-9]+(?:-[a-zA-Z0-9]+)*"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"

# Regexes for the *contents* of a JSON string (no quotes; never a quote, backslash or control
# character) for the formats we can enforce exactly or by a strict subset.
FORMAT_REGEXES = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f"{_DATE}T{_TIME}",
    "email": rf"[a-zA-Z0-9_%+\-]+(?:\.[a-zA-Z0-9_%+\-]+)*@(?:{_LABEL}\.)+[a-zA-Z]{{2,12}}",
    "uuid": "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
}


# --------------------------------------------------------------------------- schema patterns

# Characters a JSON string cannot hold raw: they must never be produced by a class or ``.``.
_UNSAFE = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]
_UNSAFE_NEGATED = '"\\\\\\x00-\\x1f'  # appended inside [^...]
_JSON_ESCAPES = {'"': '\\\\"', "\\": "\\\\\\\\", "\n": "\\\\n", "\t": "\\\\t", "\r": "\\\\r"}
_CLASS_ESCAPES = {
    "d": [(0x30, 0x39)],
    "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    "s": [(0x20, 0x20)],  # a space only: the other whitespace needs escaping in JSON
}


def _json_char(c: str) -> str:
    """Regex for how the character ``c`` appears inside a JSON string literal."""
    if c in _JSON_ESCAPES:
        return _JSON_ESCAPES[c]
    if ord(c) < 0x20:
        return f"\\\\u00{ord(c):02x}"
    return _escape_char(c)


def _subtract(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = sorted(ranges)
    for c_lo, c_hi in cut:
        nxt = []
        for lo, hi in out:
            if hi < c_lo or lo > c_hi:
                nxt.append((lo, hi))
                continue
            if lo < c_lo:
                nxt.append((lo, c_lo - 1))
            if hi > c_hi:
                nxt.append((c_hi + 1, hi))
        out = nxt
    return out


def _class_from_ranges(ranges: list[tuple[int, int]]) -> str:
    parts = []
    for lo, hi in sorted(ranges):
        a = _escape_char(chr(lo), in_class=True)
        if lo == hi:
            parts.append(a)
        else:
            parts.append(a + ("-" if hi > lo + 1 else "") + _escape_char(chr(hi), in_class=True))
    return "".join(parts)


@dataclass
class _PatternParser:
    """Translate an ECMA-262 ``pattern`` (JSON Schema) into a regex over the raw JSON string
    text that only matches strings whose decoded value matches the pattern.

    The translation is exact for literals and escapes, and a strict subset where JSON needs
    escaping: classes and ``.`` never produce quotes, backslashes or control characters, and
    ``\\s`` produces only a space. Unanchored patterns are used as full matches (a subset of
    the search semantics JSON Schema specifies).
    """

    src: str
    pos: int = 0

    def error(self, what: str) -> GrammarError:
        return GrammarError(f"pattern {self.src!r}: {what} is not supported by this backend")

    def parse(self) -> str:
        src = self.src
        if src.startswith("^"):
            self.pos = 1
        end = len(src)
        if src.endswith("$") and not _escaped(src, len(src) - 1):
            end -= 1
        out: list[str] = []
        while self.pos < end:
            out.append(self.atom(end))
        return "".join(out)

    def atom(self, end: int) -> str:
        src, i = self.src, self.pos
        c = src[i]
        if c == "\\":
            return self.escape(outside_class=True)
        if c == "[":
            return self.char_class()
        if c == ".":
            self.pos += 1
            return "[^" + _UNSAFE_NEGATED + "\u2028\u2029]"
        if c == "(":
            if src.startswith("(?:", i):
                self.pos += 3
                return "(?:"
            if src.startswith("(?<", i) and not src.startswith(("(?<=", "(?<!"), i):
                close = src.find(">", i)
                if close < 0:
                    raise self.error("an unterminated group name")
                self.pos = close + 1
                return "("
            if src.startswith("(?", i):
                raise self.error("a lookaround or inline flag group")
            self.pos += 1
            return "("
        if c in ")|":
            self.pos += 1
            return c
        if c in "*+?":
            self.pos += 1
            if self.pos < end and src[self.pos] == "?":
                self.pos += 1  # lazy quantifiers mean nothing for a full match
            return c
        if c == "{":
            m = re.compile(r"\{(\d+)(,(\d*))?\}").match(src, i)
            if m:
                self.pos = m.end()
                if self.pos < end and src[self.pos] == "?":
                    self.pos += 1
                return m.group(0)
            self.pos += 1
            return "\\{"
        if c in "^$":
            raise self.error(f"an anchor {c!r} inside the pattern")
        self.pos += 1
        return _json_char(c)

    def escape(self, outside_class: bool) -> str:
        src = self.src
        if self.pos + 1 >= len(src):
            raise GrammarError(f"pattern {src!r}: trailing backslash")
        c = src[self.pos + 1]
        self.pos += 2
        if c in _CLASS_ESCAPES:
            return "[" + _class_from_ranges(_CLASS_ESCAPES[c]) + "]"
        if c in "DWS":
            inner = {"D": "0-9", "W": "0-9A-Za-z_", "S": "\\s"}[c]
            return "[^" + inner + _UNSAFE_NEGATED + "]"
        char = self.escaped_char(c)
        return _json_char(char)

    def escaped_char(self, c: str) -> str:
        src = self.src
        simple = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}
        if c in simple:
            return simple[c]
        if c in "xu":
            width = 2 if c == "x" else 4
            digits = src[self.pos : self.pos + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise GrammarError(f"pattern {src!r}: bad \\{c} escape")
            self.pos += width
            return chr(int(digits, 16))
        if c.isalnum():
            raise self.error(f"the escape \\{c}")
        return c

    def char_class(self) -> str:
        src = self.src
        self.pos += 1
        negated = src.startswith("^", self.pos)
        if negated:
            self.pos += 1
        ranges: list[tuple[int, int]] = []
        extra = ""  # \s kept as itself inside a negated class (it must exclude all whitespace)
        first = True
        while True:
            if self.pos >= len(src):
                raise GrammarError(f"pattern {src!r}: unterminated character class")
            c = src[self.pos]
            if c == "]" and not first:
                self.pos += 1
                break
            first = False
            lo = self.class_atom()
            if isinstance(lo, list):
                if negated and lo is _CLASS_ESCAPES["s"]:
                    extra += "\\s"
                else:
                    ranges += lo
                continue
            if src.startswith("-", self.pos) and not src.startswith("-]", self.pos):
                self.pos += 1
                hi = self.class_atom()
                if isinstance(hi, list) or ord(hi) < ord(lo):
                    raise GrammarError(f"pattern {src!r}: bad range in a character class")
                ranges.append((ord(lo), ord(hi)))
            else:
                ranges.append((ord(lo), ord(lo)))
        if negated:
            return "[^" + _class_from_ranges(ranges) + extra + _UNSAFE_NEGATED + "]"
        safe = _subtract(ranges, _UNSAFE)
        if not safe:
            raise GrammarError(
                f"pattern {src!r}: a character class with no character a JSON string can "
                "hold unescaped is not supported by this backend"
            )
        return "[" + _class_from_ranges(safe) + "]"

    def class_atom(self) -> str | list[tuple[int, int]]:
        src = self.src
        c = src[self.pos]
        if c != "\\":
            self.pos += 1
            return c
        if self.pos + 1 >= len(src):
            raise GrammarError(f"pattern {src!r}: trailing backslash")
        e = src[self.pos + 1]
        if e in _CLASS_ESCAPES:
            self.pos += 2
            return _CLASS_ESCAPES[e]
        if e in "DWSbB" or (e.isdigit() and e != "0"):
            raise self.error(f"the escape \\{e} inside a character class")
        self.pos += 2
        return self.escaped_char(e)


def _escaped(text: str, index: int) -> bool:
    """Whether ``text[index]`` is preceded by an odd number of backslashes."""
    n = 0
    while index - n - 1 >= 0 and text[index - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def json_string_pattern(pattern: str) -> str:
    """Regex for a JSON string literal (with quotes) whose value matches the schema ``pattern``."""
    return '"' + _PatternParser(pattern).parse() + '"'
