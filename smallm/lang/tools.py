"""Tools in a program: declare the functions a model may call, generate a call that is
guaranteed to parse and validate, and read it back as a name and arguments.

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
        "Get the current weather for a city."
        ...

    @sl.function
    def agent(s, question):
        s += sl.system(sl.tools_prompt([get_weather, get_time]))
        s += sl.user(question)
        s += sl.assistant(sl.gen_tool_call("call", [get_weather, get_time]))

    call = agent.run(question="Weather in Oslo?").tool_call("call")
    call.name, call.arguments  # "get_weather", {"city": "Oslo", "unit": "celsius"}
    call()                     # runs get_weather(city="Oslo", unit="celsius")

A tool is a Python function (its signature and docstring become the schema, via pydantic), a
pydantic model class, or an OpenAI tool dict. `gen_tool_call` is a ``gen`` with a JSON schema:
``{"name": <one of the tools>, "arguments": <that tool's parameters>}`` (one ``anyOf`` branch
per tool), so any backend that enforces ``json_schema`` enforces the call, as the server's
``tool_choice: required`` does.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from smallm.lang.ir import Gen

__all__ = ["Tool", "ToolCall", "as_tool", "gen_tool_call", "parse_tool_call", "tools_prompt"]


@dataclass
class Tool:
    """A function the model may call: its name, description and JSON schema of arguments."""

    name: str
    description: str | None
    parameters: dict
    fn: Callable[..., Any] | None = None  # the Python function, when the tool is one

    def as_openai(self) -> dict:
        """The tool as an OpenAI ``tools`` entry."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass
class ToolCall:
    """A generated call: the tool's name and its (schema-valid) arguments."""

    name: str
    arguments: dict[str, Any]
    tool: Tool | None = field(default=None, repr=False)

    def __call__(self) -> Any:
        """Run the tool's Python function with the arguments."""
        if self.tool is None or self.tool.fn is None:
            raise TypeError(f"tool {self.name!r} has no Python function to call")
        return self.tool.fn(**self.arguments)


def _function_schema(fn: Callable[..., Any]) -> dict:
    from pydantic import create_model

    # Resolved hints, not raw annotations: under `from __future__ import annotations` those
    # are strings pydantic cannot resolve from here.
    hints = typing.get_type_hints(fn)
    fields: dict[str, Any] = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{fn.__name__}: *args/**kwargs cannot be described as a tool")
        annotation = hints.get(name, Any)
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[name] = (annotation, default)
    schema = create_model(fn.__name__, **fields).model_json_schema()
    schema.pop("title", None)
    return schema


def as_tool(obj: Any) -> Tool:
    """A `Tool` from a Python function, a pydantic model class, an OpenAI tool dict or a Tool."""
    if isinstance(obj, Tool):
        return obj
    if isinstance(obj, dict):
        fn = obj.get("function", obj)
        if not isinstance(fn.get("name"), str):
            raise ValueError(f"a tool dict needs a name: {obj!r}")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        return Tool(fn["name"], fn.get("description"), params)
    if inspect.isclass(obj) and hasattr(obj, "model_json_schema"):
        schema = obj.model_json_schema()
        schema.pop("title", None)
        return Tool(obj.__name__, inspect.getdoc(obj), schema)
    if callable(obj):
        return Tool(obj.__name__, inspect.getdoc(obj), _function_schema(obj), obj)
    raise TypeError(f"a tool is a function, a pydantic model or a tool dict, not {type(obj)}")


def call_schema(tools: list[Tool]) -> dict:
    """The JSON schema of one call to any of ``tools``."""
    branches = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def gen_tool_call(name: str, tools: list[Any], max_tokens: int | None = None, **kwargs: Any) -> Gen:
    """Generate one call to one of ``tools`` into variable ``name`` (constrained: it parses and
    validates); read it with ``state.tool_call(name)``. Other arguments are ``gen``'s."""
    from smallm.lang.api import gen

    specs = [as_tool(t) for t in tools]
    if not specs:
        raise ValueError("gen_tool_call needs at least one tool")
    if len({t.name for t in specs}) != len(specs):
        raise ValueError("tool names must be distinct")
    g = gen(name, max_tokens, json_schema=call_schema(specs), **kwargs)
    assert isinstance(g, Gen)
    g.tools = specs  # read back by ProgramState.tool_call
    return g


def parse_tool_call(text: str, tools: list[Any]) -> ToolCall:
    """The call in ``text`` (a `gen_tool_call` output); ValueError if it is not one (e.g. the
    generation was cut by max_tokens)."""
    specs = {t.name: t for t in (as_tool(x) for x in tools)}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not a complete tool call (raise max_tokens?): {text!r}") from e
    if not isinstance(value, dict) or value.get("name") not in specs:
        raise ValueError(f"not a call to one of {sorted(specs)}: {text!r}")
    args = value.get("arguments") or {}
    return ToolCall(value["name"], args, specs[value["name"]])


def tools_prompt(tools: list[Any]) -> str:
    """A system-prompt text listing the tools (one JSON per line), as the server's fallback
    for chat templates without tools does."""
    listed = "\n".join(json.dumps(as_tool(t).as_openai(), ensure_ascii=False) for t in tools)
    return (
        "You may call one of these functions to answer the user.\n"
        f"<tools>\n{listed}\n</tools>\n"
        'Answer with {"name": <function-name>, "arguments": <arguments object>}.'
    )
