"""Tool calling without a server: parsers, the request checks, the enforced schema, the
system-prompt fallback and the streaming deltas."""

from __future__ import annotations

import json

import jsonschema
import pytest

from smallm.runtime.server.http import tool_calls as tc
from smallm.runtime.server.http.errors import ApiError
from smallm.runtime.server.http.tool_parsers import PARSER_NAMES, ParsedCall, get_parser
from smallm.runtime.server.http.tool_stream import ToolStream

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALLS = [ParsedCall("get_weather", '{"city": "Paris", "days": 2}'), ParsedCall("get_time", "{}")]


@pytest.mark.parametrize("name", PARSER_NAMES)
def test_parsers_read_what_they_write(name):
    parser = get_parser(name)
    for calls in (CALLS[:1], CALLS):
        text = parser.format_calls(calls)
        result = parser.parse(text)
        assert [(c.name, json.loads(c.arguments)) for c in result.calls] == [
            (c.name, json.loads(c.arguments)) for c in calls
        ], text
        # Everything that may be a call is held back while streaming.
        assert parser.safe_content_len(text[: len(text) // 2]) <= len(text) // 2
    plain = "The weather is fine."
    assert parser.parse(plain).calls == [] and parser.parse(plain).content == plain
    assert parser.safe_content_len(plain) == len(plain)


@pytest.mark.parametrize(
    "name,text,content,calls",
    [
        (
            "hermes",
            'Let me see.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
            "Let me see.",
            [("f", {"a": 1})],
        ),
        ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}', "", [("f", {"a": 1})]),
        ("hermes", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
        ("qwen25", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', "", [("f", {})]),
        (
            "llama3",
            '<|python_tag|>{"name": "f", "parameters": {"a": "x"}}',
            "",
            [("f", {"a": "x"})],
        ),
        (
            "llama3",
            '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"b": 2}}',
            "",
            [("f", {}), ("g", {"b": 2})],
        ),
        ("llama3", '{"not": "a call"}', '{"not": "a call"}', []),
        (
            "mistral",
            'ok [TOOL_CALLS] [{"name": "f", "arguments": {"a": true}}]',
            "ok",
            [("f", {"a": True})],
        ),
        ("pythonic", '[f(a=1, b="x"), g()]', "", [("f", {"a": 1, "b": "x"}), ("g", {})]),
        ("pythonic", "[__import__('os').system('x')]", "[__import__('os').system('x')]", []),
        ("pythonic", "[f(a=g())]", "[f(a=g())]", []),
        ("json", '[{"name": "f", "arguments": {"a": null}}]', "", [("f", {"a": None})]),
        ("json", '{"name": "f"}', "", [("f", {})]),
    ],
)
def test_parse_cases(name, text, content, calls):
    result = get_parser(name).parse(text)
    assert result.content == content
    assert [(c.name, json.loads(c.arguments)) for c in result.calls] == calls


def test_hermes_streaming_hold_back():
    p = get_parser("hermes")
    assert p.safe_content_len("Hello <tool") == len("Hello ")
    assert p.safe_content_len("Hello <tool_call>{") == len("Hello ")
    assert p.safe_content_len("a < b") == len("a < b")


def bad(body) -> ApiError:
    with pytest.raises(ApiError) as e:
        tc.tool_request(body)
    return e.value


def test_tool_request_forms():
    assert tc.tool_request({}) is None
    assert tc.tool_request({"tool_choice": "none"}) is None
    req = tc.tool_request({"tools": [WEATHER, TIME]})
    assert req.choice == "auto" and req.parallel and not req.enforced
    req = tc.tool_request(
        {
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
    )
    assert req.choice == "named" and req.named == "get_weather" and req.enforced
    req = tc.tool_request(
        {"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}}
    )
    assert req.legacy and req.choice == "named" and not req.parallel
    req = tc.tool_request(
        {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    )
    assert req.choice == "required" and not req.parallel


@pytest.mark.parametrize(
    "body,param",
    [
        ({"tools": {"a": 1}}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "tool_choice": {"name": "get_weather"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "functions"),
        ({"functions": [WEATHER["function"]], "function_call": "required"}, "function_call"),
    ],
)
def test_tool_request_errors(body, param):
    assert bad(body).param == param


def test_required_schema_accepts_only_valid_calls():
    req = tc.tool_request({"tools": [WEATHER, TIME], "tool_choice": "required"})
    schema = tc.constraint_schema(req)
    ok = [
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
        {"name": "get_time", "arguments": {}},
    ]
    jsonschema.validate(ok, schema)
    for wrong in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "x", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    req.parallel = False
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ok, tc.constraint_schema(req))
    calls = tc.enforced_calls(req, json.dumps(ok))
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert tc.enforced_calls(req, '[{"name": "get_weather", "argu') is None


def test_fallback_messages():
    parser = get_parser("hermes")
    history = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                }
            ],
        },
        {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "c1"},
        {"role": "tool", "content": '{"temp": 4}', "tool_call_id": "c2"},
    ]
    out = tc.fallback_messages(history, [WEATHER], parser)
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert "<tool_call>" in out[2]["content"] and json.loads(out[2]["content"].split("\n")[1]) == {
        "name": "get_weather",
        "arguments": {"city": "Oslo"},
    }
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[3]["content"].count("<tool_response>") == 2


def test_stream_auto_holds_back_the_call():
    req = tc.tool_request({"tools": [WEATHER]})
    s = ToolStream(req, get_parser("hermes"))
    text = (
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    deltas = []
    for k in range(1, len(text)):
        deltas += s.update(text[:k], False)
    deltas += s.update(text, True)
    content = "".join(d.get("content", "") for d in deltas)
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert content.rstrip() == "Sure." and s.called  # a newline before the call may go out
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"})
    ]


def test_stream_named_sends_arguments_as_they_come():
    req = tc.tool_request(
        {
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
    )
    s = ToolStream(req, None)
    text = '{"city": "Oslo"}'
    deltas = s.update(text[:5], False) + s.update(text, False) + s.update(text, True)
    assert deltas[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    args = "".join(d["tool_calls"][0]["function"].get("arguments", "") for d in deltas)
    assert args == text and s.called


# A Qwen-2.5-style template that reads `tools` and renders tool calls and results itself.
TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}</{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_template_with_tools_gets_them_directly(default_tokenizer):
    import copy

    from smallm.runtime.server.http import openai_protocol as proto

    tok = copy.deepcopy(default_tokenizer)
    tok.chat_template = TOOLS_TEMPLATE
    body = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "3C"},
        ],
        "tools": [WEATHER, TIME],
    }  # fmt: skip
    oc = proto.chat_call(body, tok, 4096, get_parser("hermes"))
    assert oc.prompt_text == (
        "<tools>get_weather;get_time;</tools>\n<user>weather?</user>\n"
        '<assistant>CALL get_weather {"city": "Oslo"}</assistant>\n<tool>3C</tool>\n<assistant>'
    )
    # tool_choice none: the tools are not listed, the history still renders.
    oc = proto.chat_call({**body, "tool_choice": "none"}, tok, 4096, get_parser("hermes"))
    assert oc.prompt_text.startswith("<user>weather?</user>") and oc.tools is None
    # The fallback (SmolLM2's ChatML template takes no tools).
    oc = proto.chat_call(body, default_tokenizer, 4096, get_parser("hermes"))
    assert "<tools>" in oc.prompt_text and "<tool_call>" in oc.prompt_text
    assert "<tool_response>\n3C\n</tool_response>" in oc.prompt_text


def test_empty_tools_list_means_no_tools():
    assert tc.tool_request({"tools": [], "tool_choice": "auto"}) is None
    assert bad({"tools": [], "tool_choice": "required"}).param == "tool_choice"
