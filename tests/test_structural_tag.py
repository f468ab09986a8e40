"""Structural tags: the grammar (llguidance on SmolLM2's tokenizer), the spec checks, and the
server paths (native ``/generate``, ``response_format``, ``tool_choice: auto`` on the default
model, which writes Hermes calls when the fallback prompt teaches it to). The servers run the
exact float32 path: the free text before a trigger is the model's own greedy choice, and on the
default path a near-tie could go either way with the cache and batch state other tests leave."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests

from smallm.runtime.constrained import GrammarError, backend_for, create_grammar_backend
from smallm.runtime.constrained.structural_tag import parse_structural_tag, structural_tag_lark
from smallm.runtime.server.http.tool_parsers import get_parser

from conftest import EXACT_FLAGS

MODEL_VOCAB = 49152
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
HERMES_TAG = get_parser("hermes").structural_tag(list(SCHEMAS.items()))
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>'


@pytest.fixture(scope="module")
def backend(default_tokenizer):
    return create_grammar_backend("llguidance", default_tokenizer, MODEL_VOCAB)


@pytest.fixture(scope="module")
def hermes_grammar(backend):
    return backend.compile("structural_tag", json.dumps(HERMES_TAG))


def feed(grammar, tokenizer, text: str) -> tuple[bool, str]:
    """Feed ``text`` token by token (the model's own tokenization); (all accepted, the text
    accepted before the first rejected token)."""
    g = grammar.copy()
    ids = tokenizer.encode(text, add_special_tokens=False)
    for k, t in enumerate(ids):
        if not g.accept_token(t):
            return False, tokenizer.decode(ids[:k])
    return True, text


def accepts(grammar, tokenizer, text: str) -> bool:
    ok, _ = feed(grammar, tokenizer, text)
    if not ok:
        return False
    g = grammar.copy()
    assert g.accept_string(text)
    return g.is_accepting()


# ---- the grammar ----------------------------------------------------------------------------


def test_hermes_parser_gives_the_tag_it_parses():
    (w, t) = HERMES_TAG["structures"]
    assert HERMES_TAG["triggers"] == ["<tool_call>"]
    assert w["begin"] == '<tool_call>\n{"name": "get_weather", "arguments": '
    assert w["end"] == "}\n</tool_call>" and w["schema"] == WEATHER_SCHEMA
    assert t["schema"] == TIME_SCHEMA
    # What the tag admits is exactly what the parser reads back.
    calls = get_parser("hermes").parse("Hi.\n" + CALL).calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})
    ]
    assert get_parser("qwen25").structural_tag([("f", {})])["triggers"] == ["<tool_call>"]
    for name in ("mistral", "llama3", "pythonic", "json"):
        assert get_parser(name).structural_tag([("f", {})]) is None


def test_plain_text_is_accepted(hermes_grammar, default_tokenizer):
    for text in ["", "Hello! It is sunny in Paris today.", "a < b and <tool> and <tool_cal"]:
        assert accepts(hermes_grammar, default_tokenizer, text), text


def test_text_then_calls_then_text(hermes_grammar, default_tokenizer):
    assert accepts(hermes_grammar, default_tokenizer, CALL)
    assert accepts(hermes_grammar, default_tokenizer, "Let me check.\n" + CALL)
    two = f"Checking both.\n{CALL}\n{TIME_CALL}\nDone."
    assert accepts(hermes_grammar, default_tokenizer, two)


def test_a_bad_argument_is_rejected_where_it_starts(hermes_grammar, default_tokenizer):
    bad = CALL.replace('"city"', '"town"')
    ok, before = feed(hermes_grammar, default_tokenizer, "Sure. " + bad)
    assert not ok
    # Everything up to the argument object's opening is fine; the first key's bytes are not.
    assert before.startswith('Sure. <tool_call>\n{"name": "get_weather", "arguments": {')
    assert "town" not in before and len(before) <= len("Sure. " + CALL.split('"city"')[0]) + 1
    # A wrong value type, an unknown tool and an unfinished call are rejected too.
    assert not accepts(hermes_grammar, default_tokenizer, CALL.replace('"celsius"', "5"))
    assert not accepts(hermes_grammar, default_tokenizer, CALL.replace("get_weather", "nope"))
    assert not accepts(hermes_grammar, default_tokenizer, CALL[:-5])


def test_a_trigger_cannot_be_written_without_a_valid_call(hermes_grammar, default_tokenizer):
    # After the trigger only the begin of some structure may follow: text is not allowed.
    ok, before = feed(hermes_grammar, default_tokenizer, "text <tool_call> and more text")
    assert not ok and before.endswith("<tool_call>")
    g = hermes_grammar.copy()
    assert g.accept_string("Hi <tool_call>")
    assert not g.is_accepting()  # EOS is not allowed inside a call
    assert g.jump_forward() == '\n{"name": "get_'  # forced: the shared begin of both tools
    # No EOS before the end tag either.
    g = hermes_grammar.copy()
    assert g.accept_string(CALL[:-3]) and not g.is_accepting()


def test_json_inside_a_call_follows_the_server_whitespace_rule(backend, default_tokenizer):
    g = backend.compile("structural_tag", json.dumps(HERMES_TAG))
    spaced = CALL.replace('{"city": "Paris"', '{"city":   "Paris"')
    assert not accepts(g, default_tokenizer, spaced)
    compact = create_grammar_backend(
        "llguidance", default_tokenizer, MODEL_VOCAB, whitespace_pattern=""
    ).compile("structural_tag", json.dumps(HERMES_TAG))
    assert not accepts(compact, default_tokenizer, CALL)  # a space after ':' is not compact
    args = CALL[len(HERMES_TAG["structures"][0]["begin"]) : -len("}\n</tool_call>")]
    tight = CALL.replace(args, args.replace('": "', '":"').replace(", ", ","))
    assert accepts(compact, default_tokenizer, tight)


def test_several_triggers_and_at_least_one(backend, default_tokenizer):
    tag = {
        "structures": [
            {"begin": "<a>", "schema": {"type": "integer"}, "end": "</a>"},
            {"begin": "[[b]]", "schema": {"type": "boolean"}, "end": "]]"},
        ],
        "triggers": ["<a>", "[[b"],
    }
    g = backend.compile("structural_tag", json.dumps(tag))
    assert accepts(g, default_tokenizer, "x <a>12</a> y [[b]]true]] z")
    assert not accepts(g, default_tokenizer, "x <a>true</a>")
    assert not accepts(g, default_tokenizer, "x [[b]]12]]")
    assert accepts(g, default_tokenizer, "no structures")
    g1 = backend.compile("structural_tag", json.dumps({**tag, "at_least_one": True}))
    assert not accepts(g1, default_tokenizer, "no structures")
    assert accepts(g1, default_tokenizer, "one: <a>3</a>")


def test_lark_escapes_odd_characters():
    tag = parse_structural_tag(
        {"structures": [{"begin": '/*"\\é', "schema": {}, "end": "~/"}], "triggers": ['/*"']}
    )
    lark = structural_tag_lark(tag, {"lenient": False})
    assert "\\x{2F}\\x{2A}\\x{22}" in lark and '"\\\\é"' in lark
    assert parse_structural_tag(tag.to_json()) == tag


# ---- spec checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{nope", "not valid JSON"),
        ("[]", "must be an object"),
        ({"structures": [], "triggers": ["<a>"]}, "structures must be a non-empty list"),
        ({"structures": [{"begin": "<a>", "end": ""}]}, "triggers must be a non-empty list"),
        ({"structures": [{"begin": "<a>", "end": ""}], "triggers": [""]}, "non-empty strings"),
        ({"structures": [{"begin": "<a>"}], "triggers": ["<a>"]}, "structures[0].end"),
        ({"structures": [{"begin": "<b>", "end": ""}], "triggers": ["<a>"]}, "does not start"),
        ({"structures": [{"begin": "<a>", "end": "", "schema": 3}], "triggers": ["<a>"]}, "schema"),
        ({"structures": [{"begin": "<a>", "end": ""}], "triggers": ["<a", "<a>"]}, "contain one another"),
        ({"type": "structural_tag", "format": {"type": "any_text"}}, "not xgrammar's newer"),
        ({"type": "json_schema", "structures": [], "triggers": []}, "type must be"),
    ],
)  # fmt: skip
def test_bad_specs_raise_grammar_error(backend, spec, message):
    with pytest.raises(GrammarError, match=message.replace("[", r"\[")):
        parse_structural_tag(spec)
    with pytest.raises(GrammarError):
        backend.compile("structural_tag", spec if isinstance(spec, str) else json.dumps(spec))


def test_routing_and_outlines(default_tokenizer):
    assert backend_for("structural_tag") == "llguidance"
    assert backend_for("structural_tag", "outlines") == "llguidance"
    outlines = create_grammar_backend("outlines", default_tokenizer, MODEL_VOCAB)
    with pytest.raises(GrammarError, match="outlines backend does not support structural_tag"):
        outlines.compile("structural_tag", json.dumps(HERMES_TAG))
    bad_schema = {"structures": [{"begin": "<a>", "schema": {"type": "object", "not": {}}, "end": "</a>"}], "triggers": ["<a>"]}  # fmt: skip
    llg = create_grammar_backend("llguidance", default_tokenizer, MODEL_VOCAB)
    with pytest.raises(GrammarError):
        llg.compile("structural_tag", json.dumps(bad_schema))


# ---- when tool_choice auto gets a tag --------------------------------------------------------


def test_auto_structural_tag_modes():
    from smallm.runtime.config import ServerArgs
    from smallm.runtime.server.http.tool_calls import auto_structural_tag, tool_request

    def req(strict: bool, choice="auto"):
        tools = [
            {"type": "function", "function": {"name": n, "parameters": s, "strict": strict}}
            for n, s in SCHEMAS.items()
        ]
        return tool_request({"tools": tools, "tool_choice": choice})

    hermes, mistral = get_parser("hermes"), get_parser("mistral")
    assert auto_structural_tag(req(True), hermes, "strict") == HERMES_TAG
    assert auto_structural_tag(req(False), hermes, "strict") is None  # SGLang's rule
    assert auto_structural_tag(req(False), hermes, "always") == HERMES_TAG
    assert auto_structural_tag(req(True), hermes, "off") is None
    assert auto_structural_tag(req(True), mistral, "always") is None  # no text trigger
    assert auto_structural_tag(req(True, "required"), hermes, "always") is None
    assert ServerArgs().tool_call_structural_tag == "strict"
    with pytest.raises(ValueError, match="--tool-call-structural-tag"):
        ServerArgs(tool_call_structural_tag="sometimes")


# ---- the server (default model) --------------------------------------------------------------

CALL_ASK = [{"role": "user", "content": "Call get_weather for Paris in celsius."}]
PLAIN_ASK = [{"role": "user", "content": "What is 2+2?"}]
GREEDY = {"temperature": 0, "max_tokens": 80}


def weather_tool(strict: bool) -> dict:
    fn = {"name": "get_weather", "description": "Get the current weather for a city"}
    return {"type": "function", "function": {**fn, "parameters": WEATHER_SCHEMA, "strict": strict}}


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def off_server(default_model_dir):
    from server_process import ServerProcess

    flags = ("--max-total-tokens", "16384", "--tool-call-structural-tag", "off", *EXACT_FLAGS)
    with ServerProcess(None, *flags) as server:
        yield server


def valid_calls(message) -> list[tuple[str, dict]]:
    out = []
    for call in message.tool_calls:
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


def test_auto_with_a_strict_tool_gives_valid_calls_and_free_text(exact_server):
    client = client_for(exact_server)
    resp = client.chat.completions.create(
        model="m", messages=CALL_ASK, tools=[weather_tool(True)], **GREEDY
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert valid_calls(choice.message) == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    # A prompt that needs no tool is still answered as text under the same tag.
    plain = client.chat.completions.create(
        model="m", messages=PLAIN_ASK, tools=[weather_tool(True)], **GREEDY
    ).choices[0]
    assert plain.message.content and "4" in plain.message.content
    assert not plain.message.tool_calls and plain.finish_reason == "stop"


def test_streamed_auto_with_the_tag_reassembles(exact_server):
    client = client_for(exact_server)
    kw = dict(model="m", messages=CALL_ASK, tools=[weather_tool(True)], **GREEDY)
    whole = client.chat.completions.create(**kw).choices[0].message
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            reason = ch.finish_reason or reason
    assert reason == "tool_calls" and not content.strip()
    got = [(c["name"], json.loads(c["arguments"])) for c in calls.values()]
    assert got == valid_calls(whole)


def test_flag_off_leaves_auto_unconstrained(exact_server, off_server):
    def message(server, strict: bool):
        return (
            client_for(server)
            .chat.completions.create(
                model="m", messages=CALL_ASK, tools=[weather_tool(strict)], **GREEDY
            )
            .choices[0]
            .message
        )

    free = message(exact_server, False)  # no strict tool: no tag under the default flag
    off = message(off_server, True)  # a strict tool, but --tool-call-structural-tag off
    tagged = message(exact_server, True)
    assert off.model_dump(exclude={"tool_calls"}) == free.model_dump(exclude={"tool_calls"})
    args = [[c.function.arguments for c in m.tool_calls or []] for m in (off, free, tagged)]
    assert args[0] == args[1]  # the same text as the run with no constraint at all
    assert args[0] != args[2]  # (on this prompt the free run adds schema keys to the arguments)


def test_native_generate_with_a_structural_tag(exact_server):
    body = {
        "messages": CALL_ASK,
        "tools": [weather_tool(False)],
    }
    ids = requests.post(exact_server.url + "/tokenize", json=body, timeout=60).json()["tokens"]
    tag = get_parser("hermes").structural_tag([("get_weather", WEATHER_SCHEMA)])
    sp = {"temperature": 0, "max_new_tokens": 80, "structural_tag": json.dumps(tag)}
    r = requests.post(
        exact_server.url + "/generate",
        json={"input_ids": ids, "sampling_params": sp},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    text = r.json()["text"]
    (call,) = get_parser("hermes").parse(text).calls
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
    bad = {**sp, "structural_tag": json.dumps({"structures": [], "triggers": ["<a>"]})}
    r = requests.post(
        exact_server.url + "/generate", json={"text": "x", "sampling_params": bad}, timeout=60
    )
    assert r.status_code == 400 and "invalid structural_tag" in r.json()["error"]["message"]
    both = {**sp, "regex": "a+"}
    r = requests.post(
        exact_server.url + "/generate", json={"text": "x", "sampling_params": both}, timeout=60
    )
    assert r.status_code == 400 and "at most one" in r.json()["error"]["message"]


CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


def test_response_format_structural_tag(exact_server):
    client = client_for(exact_server)
    tag = {
        "type": "structural_tag",
        "structures": [{"begin": "```json\n", "schema": CITY, "end": "\n```"}],
        "triggers": ["```json"],
    }
    ask = [{"role": "user", "content": "Give me a JSON object describing Paris, in a ```json code block."}]  # fmt: skip
    text = (
        client.chat.completions.create(model="m", messages=ask, response_format=tag, **GREEDY)
        .choices[0]
        .message.content
    )
    assert text.startswith("```json\n")
    block = text[len("```json\n") :].split("\n```")[0]
    jsonschema.validate(json.loads(block), CITY)
    assert "\n```" in text  # the end tag was written, then free text went on
    for rf, message in [
        ({**tag, "triggers": []}, "response_format triggers must be a non-empty list"),
        ({**tag, "triggers": ["<x>"]}, "does not start with any trigger"),
    ]:
        with pytest.raises(openai.BadRequestError, match=message) as e:
            client.chat.completions.create(model="m", messages=ask, response_format=rf)
        assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError, match="give one output constraint"):
        client.chat.completions.create(
            model="m", messages=ask, response_format=tag, extra_body={"regex": "a"}
        )
