"""OpenAI <-> native conversions (smallm.runtime.server.http.openai_protocol), without a server."""

from __future__ import annotations

import json

import pytest

from smallm.runtime.request_builder import RequestError
from smallm.runtime.sampling import SamplingParamsError
from smallm.runtime.server.http import guided
from smallm.runtime.server.http import openai_protocol as proto
from smallm.runtime.server.http.errors import ApiError


class FakeTokenizer:
    """Characters are tokens (id = code point); a ChatML-like template."""

    chat_template = "fake"

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **kw):
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        if kw.get("continue_final_message"):
            return text[: -len("</>")]
        return text + ("<assistant>" if add_generation_prompt else "")


TOK = FakeTokenizer()


def bad(fn, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    assert info.value.status == 400
    return info.value


# ---- sampling parameters ----------------------------------------------------------------


def test_sampling_params_mapping():
    body = {
        "max_tokens": 7,  # resolved by the caller and passed as max_tokens
        "min_tokens": 2,
        "temperature": 0,
        "top_p": 0.9,
        "n": 2,
        "stop": ["\n"],
        "seed": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "stop_token_ids": [2],
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "regex": "[a-z]+",
        "user": "ignored",
        "top_logprobs": None,
    }
    sp = proto.native_sampling_params(body, 7, {})
    assert sp == {
        "max_new_tokens": 7,
        "min_new_tokens": 2,
        "temperature": 0,
        "top_p": 0.9,
        "n": 2,
        "stop": ["\n"],
        "seed": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "stop_token_ids": [2],
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "regex": "[a-z]+",
    }
    schema = {"type": "object"}
    assert proto.native_sampling_params({"json_schema": schema}, None, {}) == {
        "json_schema": json.dumps(schema)
    }


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1),
        ("temperature", "hot"),
        ("top_p", 2),
        ("presence_penalty", 3),
        ("top_k", 0),
        ("stop", 5),
        ("seed", "x"),
    ],
)
def test_sampling_param_errors_name_the_field(field, value):
    e = bad(proto.native_sampling_params, {field: value}, 16, {})
    assert e.param == field and field in e.message


def test_min_tokens_error_uses_openai_names():
    names = proto._names("max_tokens", "prompt")
    e = bad(proto.native_sampling_params, {"min_tokens": 9}, 4, names)
    assert e.param == "min_tokens"
    assert "min_tokens" in e.message and "max_tokens" in e.message
    assert "new_tokens" not in e.message


def test_rename_native_errors():
    names = proto._names("max_completion_tokens", "messages")
    e = proto.rename_error(
        RequestError("the prompt (5 tokens) plus max_new_tokens (600) exceeds", "max_new_tokens"),
        names,
    )
    assert e.param == "max_completion_tokens" and "max_completion_tokens (600)" in e.message
    e = proto.rename_error(RequestError("the prompt is empty", "text"), names)
    assert e.param == "messages"
    e = proto.rename_error(SamplingParamsError("top_k must be -1 or >= 1, got 0"), names)
    assert e.param == "top_k"


# ---- completions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt,text,ids,single",
    [
        ("hi", "hi", None, True),
        (["a", "b"], ["a", "b"], None, False),
        ([1, 2, 3], None, [1, 2, 3], True),
        ([[1, 2], [3]], None, [[1, 2], [3]], False),
    ],
)
def test_completion_prompt_forms(prompt, text, ids, single):
    oc = proto.completion_call({"prompt": prompt}, TOK)
    assert oc.call.text == text and oc.call.input_ids == ids
    assert oc.call.is_single is single
    assert oc.call.sampling_params == {"max_new_tokens": 16}
    assert not oc.call.return_logprob and not oc.stream and oc.n == 1


@pytest.mark.parametrize(
    "body,param",
    [
        ({}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "logprobs": -1}, "logprobs"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),
        ({"prompt": "x", "echo": "yes"}, "echo"),
        ({"prompt": "x", "stream": 1}, "stream"),
        ({"prompt": "x", "stream_options": []}, "stream_options"),
        ({"prompt": "x", "logit_bias": {"5": 1000}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": [1]}, "logit_bias"),
        ({"prompt": "x", "regex": "a", "ebnf": "b"}, "ebnf"),
        ({"prompt": ["a", "b"], "rid": "r"}, "rid"),
        ({"prompt": "a", "rid": 5}, "rid"),
    ],
)
def test_completion_bad_inputs(body, param):
    e = bad(proto.completion_call, body, TOK)
    assert e.param == param
    if param:
        assert param in e.message


def test_completion_not_an_object():
    assert "JSON object" in bad(proto.completion_call, [1], TOK).message


def test_completion_options():
    oc = proto.completion_call(
        {
            "prompt": [[104, 105], [106]],
            "max_tokens": 3,
            "n": 2,
            "best_of": 2,
            "logprobs": 2,
            "echo": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "model": "anything",
        },
        TOK,
    )
    c = oc.call
    assert c.return_logprob and c.return_text_in_logprobs and c.top_logprobs_num == 2
    assert c.logprob_start_len == 0  # echo with logprobs scores the prompt too
    assert c.stream and oc.stream and oc.include_usage and oc.n == 2
    assert oc.echo_texts == ["hi", "j"]
    assert c.sampling_params == {"max_new_tokens": 3, "n": 2}
    oc = proto.completion_call({"prompt": "x", "logprobs": 0, "echo": True}, TOK)
    assert oc.call.return_logprob and oc.call.top_logprobs_num == 0 and oc.logprobs == 0
    oc = proto.completion_call({"prompt": "x", "echo": True, "max_tokens": 0}, TOK)
    assert oc.call.logprob_start_len == -1 and oc.echo_texts == ["x"]


# ---- chat -------------------------------------------------------------------------------


def test_chat_messages_normalised():
    msgs = proto.chat_messages(
        [
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None, "name": "x"},
            {"role": "tool", "content": "42", "tool_call_id": "t"},
        ]
    )
    assert msgs == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42", "tool_call_id": "t"},
    ]


@pytest.mark.parametrize(
    "messages,needle",
    [
        (None, "messages"),
        ([], "messages"),
        ("hi", "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "bot", "content": "x"}], "role"),
        ([{"content": "x"}], "role"),
        ([{"role": "user", "content": 5}], "content"),
        ([{"role": "user", "content": [{"type": "text"}]}], "content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "vision/audio"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "vision/audio"),
    ],
)
def test_chat_bad_messages(messages, needle):
    e = bad(proto.chat_messages, messages)
    assert e.param == "messages" and needle in e.message


def _rf_schema(rf):
    c = guided.response_format_constraint(rf)
    return None if c is None else c.spec


def test_response_format():
    assert _rf_schema(None) is None
    assert _rf_schema({"type": "text"}) is None
    assert json.loads(_rf_schema({"type": "json_object"})) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert json.loads(_rf_schema(rf)) == schema
    for rf in (
        "json",
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}},
    ):
        assert bad(guided.response_format_constraint, rf).param == "response_format"


def chat(body, context_length=1000):
    return proto.chat_call(
        {"messages": [{"role": "user", "content": "hi"}], **body}, TOK, context_length
    )


def test_chat_call_defaults():
    oc = chat({})
    prompt = "<user>hi</><assistant>"
    assert oc.prompt_text == prompt and oc.call.input_ids == TOK.encode(prompt)
    # max_tokens defaults to the rest of the context
    assert oc.call.sampling_params == {"max_new_tokens": 1000 - len(prompt)}
    assert not oc.call.return_logprob and oc.logprobs is None and oc.n == 1


def test_chat_call_options():
    oc = chat(
        {
            "max_completion_tokens": 5,
            "max_tokens": 9,
            "n": 2,
            "logprobs": True,
            "top_logprobs": 3,
            "response_format": {"type": "json_object"},
            "tools": [],
            "stream": True,
            "stream_options": {"include_usage": True},
            "seed": 1,
        }
    )
    assert oc.call.sampling_params == {
        "max_new_tokens": 5,
        "n": 2,
        "seed": 1,
        "json_schema": '{"type": "object"}',
    }
    assert oc.call.return_logprob and oc.call.top_logprobs_num == 3 and oc.logprobs == 3
    assert oc.stream and oc.include_usage and oc.n == 2
    assert oc.names["max_new_tokens"] == "max_completion_tokens"
    oc = chat({"logprobs": True, "rid": "my-id"})
    assert oc.logprobs == 0 and oc.call.top_logprobs_num == 0 and oc.call.rid == "my-id"
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert chat({"tools": tools, "tool_choice": "none"}).call.input_ids


def test_chat_template_options():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The"}]
    oc = proto.chat_call({"messages": msgs, "continue_final_message": True}, TOK, 100)
    assert oc.prompt_text == "<user>hi</><assistant>The"
    oc = chat({"add_generation_prompt": False})
    assert oc.prompt_text == "<user>hi</>"
    e = bad(chat, {"continue_final_message": True})
    assert e.param == "continue_final_message"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [{"type": "function"}], "tool_choice": "auto"}, "tools"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"temperature": -0.5}, "temperature"),
        ({"response_format": {"type": "json"}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "json_schema": "{}"}, "response_format"),
        ({"response_format": {"type": "json_object"}, "regex": "a"}, "response_format"),
    ],
)
def test_chat_bad_inputs(body, param):
    e = bad(chat, body)
    assert e.param == param
    if param:
        assert param in e.message


def test_chat_without_template():
    class NoTemplate(FakeTokenizer):
        chat_template = None

    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert "chat template" in bad(proto.chat_call, body, NoTemplate(), 100).message


def test_chat_with_real_template(default_tokenizer):
    oc = proto.chat_call(
        {"messages": [{"role": "user", "content": "Hello"}]}, default_tokenizer, 2048
    )
    assert oc.prompt_text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert oc.call.input_ids == default_tokenizer.encode(oc.prompt_text, add_special_tokens=False)


# ---- results ----------------------------------------------------------------------------


def meta(**kw):
    base = {
        "id": "r",
        "finish_reason": {"type": "length", "length": 2},
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "cached_tokens": 1,
    }
    return {**base, **kw}


LOGPROB_META = meta(
    output_token_logprobs=[[-0.5, 10, "A"], [-1.0, 11, "bc"]],
    output_top_logprobs=[[[-0.5, 10, "A"], [-2.0, 12, "Z"]], [[-0.1, 13, "x"], [-1.0, 11, "bc"]]],
    input_token_logprobs=[[None, 1, "p"], [-3.0, 2, "q"]],
    input_top_logprobs=[None, [[-0.2, 5, "r"], [-3.0, 2, "q"]]],
)


def test_finish_reason():
    assert proto.finish_reason(meta()) == ("length", None)
    assert proto.finish_reason(meta(finish_reason={"type": "stop", "matched": 2})) == ("stop", 2)
    assert proto.finish_reason(meta(finish_reason={"type": "stop", "matched": "\n"})) == (
        "stop",
        "\n",
    )
    assert proto.finish_reason(meta(finish_reason={"type": "abort", "message": "x"})) == (
        "abort",
        None,
    )
    assert proto.finish_reason(meta(finish_reason=None)) == (None, None)


def test_completion_logprobs():
    lp = proto.completion_logprobs(LOGPROB_META)
    assert lp == {
        "tokens": ["A", "bc"],
        "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"A": -0.5, "Z": -2.0}, {"x": -0.1, "bc": -1.0}],
        "text_offset": [0, 1],
    }
    lp = proto.completion_logprobs(LOGPROB_META, prompt=True)
    assert lp["tokens"] == ["p", "q", "A", "bc"]
    assert lp["token_logprobs"] == [None, -3.0, -0.5, -1.0]
    assert lp["top_logprobs"][:2] == [None, {"r": -0.2, "q": -3.0}]
    assert lp["text_offset"] == [0, 1, 2, 3]
    # logprobs=0: no top rows, but the sampled token is always listed
    m = meta(output_token_logprobs=[[-0.5, 10, "A"]])
    assert proto.completion_logprobs(m, offset=4)["top_logprobs"] == [{"A": -0.5}]
    assert proto.completion_logprobs(LOGPROB_META, start=1, offset=1)["text_offset"] == [1]


def test_chat_logprobs():
    lp = proto.chat_logprobs(LOGPROB_META, 1)
    assert lp["content"][0] == {
        "token": "A",
        "logprob": -0.5,
        "bytes": [65],
        "top_logprobs": [{"token": "A", "logprob": -0.5, "bytes": [65]}],
    }
    assert [c["token"] for c in lp["content"]] == ["A", "bc"]
    assert proto.chat_logprobs(meta(output_token_logprobs=[[-0.5, 10, "é"]]), 0)["content"] == [
        {"token": "é", "logprob": -0.5, "bytes": [195, 169], "top_logprobs": []}
    ]


def result(text, **kw):
    return {"text": text, "output_ids": [], "meta_info": meta(**kw)}


def test_choices_and_usage():
    oc = proto.completion_call({"prompt": ["ab", "c"], "n": 2, "echo": True}, TOK)
    results = [
        result("x", prompt_tokens=2),
        result("y", prompt_tokens=2, finish_reason={"type": "stop", "matched": "\n"}),
        result("z", prompt_tokens=1),
        result("w", prompt_tokens=1),
    ]
    choices = [proto.completion_choice(i, r, oc) for i, r in enumerate(results)]
    assert [c["text"] for c in choices] == ["abx", "aby", "cz", "cw"]
    assert choices[1]["finish_reason"] == "stop" and choices[1]["matched_stop"] == "\n"
    assert choices[0]["logprobs"] is None
    assert proto.usage(results, 2) == {
        "prompt_tokens": 3,  # once per prompt, not per sample
        "completion_tokens": 8,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    oc = chat({"logprobs": True})
    c = proto.chat_choice(0, {**result("hi"), "meta_info": LOGPROB_META}, oc)
    assert c["message"] == {"role": "assistant", "content": "hi"}
    assert c["finish_reason"] == "length" and len(c["logprobs"]["content"]) == 2


# ---- streaming --------------------------------------------------------------------------

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}


def test_chat_stream_chunks():
    oc = chat({"stream": True, "stream_options": {"include_usage": True}, "n": 2})
    st = proto.StreamState(oc, HEAD, chat=True)
    role = st.role_chunk(1)
    assert role["choices"] == [
        {
            "index": 1,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert role["usage"] is None and role["id"] == "chatcmpl-1"
    running = result("He", finish_reason=None, completion_tokens=1)
    (c,) = st.chunks(0, running)
    assert c["choices"][0]["delta"] == {"content": "He"} and c["usage"] is None
    assert st.chunks(0, running) == []  # nothing new
    done = result("Hello", finish_reason={"type": "stop", "matched": 2})
    c1, c2 = st.chunks(0, done)
    assert c1["choices"][0]["delta"] == {"content": "llo"}
    assert c2["choices"][0]["delta"] == {} and c2["choices"][0]["finish_reason"] == "stop"
    assert c2["choices"][0]["matched_stop"] == 2
    (c,) = st.chunks(1, result("", completion_tokens=0))
    assert c["choices"][0]["finish_reason"] == "length"
    usage = st.usage_chunk()
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 3
    assert usage["usage"]["completion_tokens"] == 2


def test_chat_stream_logprobs_are_per_chunk():
    oc = chat({"stream": True, "logprobs": True, "top_logprobs": 1})
    st = proto.StreamState(oc, HEAD, chat=True)
    m1 = {**LOGPROB_META, "finish_reason": None, "completion_tokens": 1}
    m1["output_token_logprobs"] = LOGPROB_META["output_token_logprobs"][:1]
    (c,) = st.chunks(0, {"text": "A", "meta_info": m1})
    assert [t["token"] for t in c["choices"][0]["logprobs"]["content"]] == ["A"]
    assert "usage" not in c
    c, _ = st.chunks(0, {"text": "Abc", "meta_info": LOGPROB_META})
    assert [t["token"] for t in c["choices"][0]["logprobs"]["content"]] == ["bc"]


def test_completion_stream_chunks_with_echo():
    oc = proto.completion_call(
        {"prompt": "ab", "stream": True, "echo": True, "logprobs": 1, "max_tokens": 2}, TOK
    )
    head = {**HEAD, "object": "text_completion"}
    st = proto.StreamState(oc, head, chat=False)
    m1 = {**LOGPROB_META, "finish_reason": None, "completion_tokens": 1}
    m1["output_token_logprobs"] = LOGPROB_META["output_token_logprobs"][:1]
    (c,) = st.chunks(0, {"text": "A", "meta_info": m1})
    ch = c["choices"][0]
    assert ch["text"] == "abA" and ch["finish_reason"] is None
    assert ch["logprobs"]["tokens"] == ["p", "q", "A"]
    (c,) = st.chunks(0, {"text": "Abc", "meta_info": LOGPROB_META})
    ch = c["choices"][0]
    assert ch["text"] == "bc" and ch["finish_reason"] == "length"
    assert ch["logprobs"]["tokens"] == ["bc"] and ch["logprobs"]["text_offset"] == [3]
