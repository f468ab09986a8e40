"""Tool calling and structured outputs with the ``openai`` client against a real server on the
default model (SmolLM2-135M-Instruct: too small to call tools on its own, which is why named
and required choices are enforced by the constrained decoder). Every constrained result is
validated with jsonschema, on the model's output as it came."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel

GREEDY = {"temperature": 0, "max_tokens": 80}
ASK = [{"role": "user", "content": "What's the weather in Paris, in celsius?"}]


class GetWeather(BaseModel):
    """Get the current weather for a city."""

    city: str
    unit: Literal["celsius", "fahrenheit"]


class GetTime(BaseModel):
    """Get the local time in a city."""

    city: str


class City(BaseModel):
    name: str
    country: str


WEATHER = openai.pydantic_function_tool(GetWeather, name="get_weather")
TIME = openai.pydantic_function_tool(GetTime, name="get_time")
SCHEMAS = {
    "get_weather": WEATHER["function"]["parameters"],
    "get_time": TIME["function"]["parameters"],
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(default_server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=default_server.url + "/v1", api_key="x", max_retries=0, timeout=120
    )


def check_calls(message) -> list[tuple[str, dict]]:
    """The message's calls as (name, arguments), each validated against its tool's schema."""
    out = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


def test_parse_with_pydantic_response_format(client):
    resp = client.chat.completions.parse(
        model="m",
        messages=[{"role": "user", "content": "Name a city and its country."}],
        response_format=City,
        **GREEDY,
    )
    message = resp.choices[0].message
    assert isinstance(message.parsed, City) and message.parsed.name
    jsonschema.validate(json.loads(message.content), to_strict_json_schema(City))


def test_named_pydantic_tool_gives_parsed_arguments(client):
    resp = client.chat.completions.parse(
        model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice=NAMED, **GREEDY
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert check_calls(choice.message) == [
        ("get_weather", call.function.parsed_arguments.model_dump())
    ]


def test_required_round_trip_with_tool_reply(client):
    tools = [WEATHER, TIME]
    first = client.chat.completions.create(
        model="m",
        messages=ASK,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        **GREEDY,
    )
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    calls = check_calls(message)
    assert len(calls) == 1  # parallel_tool_calls false: maxItems 1
    history = [
        *ASK,
        message.model_dump(exclude_none=True),
        {
            "role": "tool",
            "tool_call_id": message.tool_calls[0].id,
            "content": '{"temperature": 18}',
        },
    ]
    second = client.chat.completions.create(model="m", messages=history, tools=tools, **GREEDY)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    if answer.message.tool_calls:
        check_calls(answer.message)
    else:
        assert answer.message.content
    # With tool_choice none the same conversation is answered as text.
    third = client.chat.completions.create(
        model="m", messages=history, tools=tools, tool_choice="none", **GREEDY
    )
    assert third.choices[0].message.content and not third.choices[0].message.tool_calls


def test_auto_round_trip(client):
    # The model may or may not call; either way the reply is well formed, and a tool result
    # sent back is accepted. (This 135M model answers in text; see docs/benchmarks.md.)
    resp = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], **GREEDY)
    message = resp.choices[0].message
    if message.tool_calls:
        check_calls(message)
        assert resp.choices[0].finish_reason == "tool_calls"
    else:
        assert message.content and resp.choices[0].finish_reason in ("stop", "length")
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'},
    ]  # fmt: skip
    again = client.chat.completions.create(model="m", messages=history, tools=[WEATHER], **GREEDY)
    assert again.choices[0].message.content or again.choices[0].message.tool_calls


def test_auto_parser_path_end_to_end(client):
    # Make the model write a Hermes call (a regex constraint on top of auto), to drive the
    # parser through the real server, streamed and not.
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    body = {"guided_regex": "Sure[.]\n" + call.replace("{", "\\{").replace("}", "\\}")}
    kw = dict(model="m", messages=ASK, tools=[WEATHER], extra_body=body, **GREEDY)
    resp = client.chat.completions.create(**kw)
    message = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls" and message.content == "Sure."
    assert check_calls(message) == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    content, calls, reason = _collect(client.chat.completions.create(stream=True, **kw))
    assert content.strip() == "Sure." and reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == check_calls(message)


def _collect(stream) -> tuple[str, list[dict], str | None]:
    """Reassemble a streamed chat completion: content, tool calls (by index), finish reason."""
    content, calls, reason = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        content += ch.delta.content or ""
        for tc in ch.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            if tc.function is not None:
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
        reason = ch.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("choice", [NAMED, "required"])
def test_streamed_tool_calls_reassemble_to_the_same_call(client, choice):
    kw = dict(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, **GREEDY)
    whole = client.chat.completions.create(**kw).choices[0].message
    content, calls, reason = _collect(client.chat.completions.create(stream=True, **kw))
    assert reason == "tool_calls" and not content
    assert all(c["id"] and c["id"].startswith("call_") for c in calls)
    got = [(c["name"], json.loads(c["arguments"])) for c in calls]
    assert got == check_calls(whole)


def test_streaming_helper_parses_tool_arguments(client):
    with client.chat.completions.stream(
        model="m", messages=ASK, tools=[WEATHER], tool_choice=NAMED, **GREEDY
    ) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_legacy_functions(client):
    resp = client.chat.completions.create(
        model="m",
        messages=ASK,
        functions=[WEATHER["function"]],
        function_call={"name": "get_weather"},
        **GREEDY,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "function_call" and not choice.message.tool_calls
    jsonschema.validate(json.loads(choice.message.function_call.arguments), SCHEMAS["get_weather"])


def test_tool_errors(client):
    cases = [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "messages"),
    ]  # fmt: skip
    for extra, param in cases:
        body = {"model": "m", "messages": ASK, **extra}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**body)
        err = e.value.body
        assert e.value.status_code == 400 and err["param"] == param, err
        assert err["message"] and err["type"] == "BadRequestError"


def test_responses_api(client):
    resp = client.responses.create(
        model="m", input="What is the capital of France?", max_output_tokens=20, temperature=0
    )
    assert resp.object == "response" and resp.id.startswith("resp_") and "Paris" in resp.output_text
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
    events = list(
        client.responses.create(
            model="m",
            input="What is the capital of France?",
            max_output_tokens=20,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == resp.output_text == events[-1].response.output_text
    tool = {
        "type": "function",
        "name": "get_weather",
        "parameters": WEATHER["function"]["parameters"],
    }
    called = client.responses.create(
        model="m", input=ASK[0]["content"], tools=[tool], tool_choice={"type": "function", "name": "get_weather"},
        temperature=0, max_output_tokens=80,
    )  # fmt: skip
    (item,) = [o for o in called.output if o.type == "function_call"]
    jsonschema.validate(json.loads(item.arguments), SCHEMAS["get_weather"])
    follow = client.responses.create(
        model="m",
        input=[
            {"role": "user", "content": ASK[0]["content"]},
            {
                "type": "function_call",
                "call_id": item.call_id,
                "name": item.name,
                "arguments": item.arguments,
            },
            {
                "type": "function_call_output",
                "call_id": item.call_id,
                "output": '{"temperature": 18}',
            },
        ],
        max_output_tokens=30,
        temperature=0,
    )
    assert follow.output_text
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input="x", previous_response_id="resp_1")
    assert e.value.body["param"] == "previous_response_id"


def test_responses_errors_name_responses_fields(client):
    cases = [
        ({"input": [{"role": "wizard", "content": "x"}]}, "input"),
        ({"input": "x", "max_output_tokens": 10**6}, "max_output_tokens"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": []}, "input"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="m", **extra)
        assert e.value.body["param"] == param, (extra, e.value.body)


def test_responses_stream_with_a_named_tool(client):
    tool = {
        "type": "function",
        "name": "get_weather",
        "parameters": WEATHER["function"]["parameters"],
    }
    events = list(
        client.responses.create(
            model="m", input=ASK[0]["content"], tools=[tool], tool_choice={"type": "function", "name": "get_weather"},
            temperature=0, max_output_tokens=80, stream=True,
        )
    )  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.done" in kinds
    assert "response.output_text.delta" not in kinds  # an enforced call has no text
    (item,) = [o for o in events[-1].response.output if o.type == "function_call"]
    assert item.name == "get_weather" and item.call_id.startswith("call_")
    jsonschema.validate(json.loads(item.arguments), SCHEMAS["get_weather"])
