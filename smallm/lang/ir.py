"""The program's expressions: what ``s += ...`` accepts.

Expressions are plain data; the interpreter (``interpreter.py``) gives them meaning. ``+`` between
expressions (or an expression and a ``str``) builds an :class:`ExprList`, so SGLang-style
``"Q: " + q + "\\nA:" + gen("a")`` works.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class Expr:
    """Base of every program expression."""

    def __add__(self, other: Any) -> ExprList:
        return ExprList([self, to_expr(other)])

    def __radd__(self, other: Any) -> ExprList:
        return ExprList([to_expr(other), self])


@dataclasses.dataclass(eq=False)
class ConstantText(Expr):
    """Literal text appended to the prompt."""

    value: str


@dataclasses.dataclass(eq=False)
class ExprList(Expr):
    """A sequence of expressions executed in order."""

    exprs: list[Expr]

    def __add__(self, other: Any) -> ExprList:
        # Flatten so long `a + b + c + ...` chains stay one level deep.
        return ExprList([*self.exprs, to_expr(other)])


@dataclasses.dataclass(eq=False)
class Gen(Expr):
    """Generate text into variable ``name``; ``params`` holds only the arguments the user set,
    which override the program-level defaults from ``run(...)``."""

    name: str | None
    params: dict[str, Any]
    # gen_tool_call: the tools the call may name (smallm.lang.tools.Tool), for reading it back.
    tools: list[Any] | None = None


@dataclasses.dataclass(eq=False)
class Select(Expr):
    """Choose one of ``choices`` by scoring each continuation with the model."""

    name: str | None
    choices: list[str]
    temperature: float
    choices_method: Any


@dataclasses.dataclass(eq=False)
class RoleBegin(Expr):
    """Open a chat turn: appends the role's prefix from the chat template."""

    role: str


@dataclasses.dataclass(eq=False)
class RoleEnd(Expr):
    """Close a chat turn: appends the role's suffix and records the message."""

    role: str


@dataclasses.dataclass(eq=False)
class VarScopeBegin(Expr):
    """Start capturing the text appended from here into variable ``name``."""

    name: str


@dataclasses.dataclass(eq=False)
class VarScopeEnd(Expr):
    """Stop capturing: ``name`` becomes the text appended since its begin."""

    name: str


@dataclasses.dataclass(eq=False)
class Media(Expr):
    """An image or video input. smallm's models are text-only, so executing one fails with a
    clear error instead of silently dropping it."""

    kind: str  # "image" or "video"
    path: str


def to_expr(value: Any) -> Expr:
    """Coerce what users write after ``s +=`` into an expression."""
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return ConstantText(value)
    if isinstance(value, (list, tuple)):
        return ExprList([to_expr(v) for v in value])
    if value is None:
        raise ValueError("tried to append None to a program state")
    # SGLang appends str(value) for other constants (numbers, ...).
    return ConstantText(str(value))


def named_exprs(expr: Expr) -> list[str]:
    """Names of the variables ``expr`` will set, in order (used to pre-register them)."""
    if isinstance(expr, (Gen, Select)) and expr.name is not None:
        return [expr.name]
    if isinstance(expr, VarScopeBegin):
        return [expr.name]
    if isinstance(expr, ExprList):
        return [n for e in expr.exprs for n in named_exprs(e)]
    return []
