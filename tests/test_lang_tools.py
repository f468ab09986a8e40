"""Tools in the language: gen_tool_call enforces a call to one of the declared tools, and
state.tool_call reads it back as a name and validated arguments (default model, over HTTP)."""

from __future__ import annotations

from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel

import smallm as sl
from smallm.lang.tools import as_tool, call_schema, parse_tool_call


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Get the current weather for a city."""
    return f"18 degrees {unit} in {city}"


def get_time(city: str) -> str:
    """Get the local time in a city."""
    return f"12:00 in {city}"


class Search(BaseModel):
    """Search the web."""

    query: str


def test_tool_specs():
    t = as_tool(get_weather)
    assert t.name == "get_weather" and t.description.startswith("Get the current weather")
    assert t.parameters["required"] == ["city"]
    assert t.parameters["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert as_tool(Search).parameters["required"] == ["query"]
    d = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert as_tool(d).name == "f"
    schema = call_schema([as_tool(get_weather), as_tool(get_time)])
    jsonschema.validate({"name": "get_time", "arguments": {"city": "Oslo"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "arguments": {}}, schema)
    call = parse_tool_call('{"name": "get_time", "arguments": {"city": "Oslo"}}', [get_time])
    assert call.name == "get_time" and call() == "12:00 in Oslo"
    with pytest.raises(ValueError):
        parse_tool_call('{"name": "get_ti', [get_time])
    with pytest.raises(ValueError):
        sl.gen_tool_call("c", [get_time, get_time])


@sl.function
def agent(s, question):
    s += sl.system(sl.tools_prompt([get_weather, get_time, Search]))
    s += sl.user(question)
    s += sl.assistant(sl.gen_tool_call("call", [get_weather, get_time, Search], max_tokens=60))


def test_program_generates_and_reads_a_call(default_server):
    backend = sl.RuntimeEndpoint(default_server.url)
    state = agent.run(question="What's the weather in Oslo?", backend=backend, temperature=0)
    call = state.tool_call("call")
    assert call.name in ("get_weather", "get_time", "Search")
    jsonschema.validate(call.arguments, as_tool(call.tool).parameters)
    if call.tool.fn is not None:
        assert isinstance(call(), str)
    with pytest.raises(sl.VariableError):
        state.tool_call("missing")
