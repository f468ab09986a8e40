"""The OpenAI-compatible API of a real server subprocess, driven by the ``openai`` client."""

from __future__ import annotations

import json

import openai
import pytest
import requests

HELLO = [{"role": "user", "content": "Hello! Tell me about yourself."}]
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def native(server, body: dict) -> dict:
    r = requests.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_models(tiny_server, client, model):
    raw = requests.get(tiny_server.url + "/v1/models", timeout=10).json()
    assert raw["object"] == "list" and len(raw["data"]) == 1
    card = raw["data"][0]
    assert card["owned_by"] == "sglang" and card["root"] == model and card["max_model_len"] > 0
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_forms(client, model, default_tokenizer):
    prompt = "The capital of France is"
    one = client.completions.create(model=model, prompt=prompt, **GREEDY)
    assert one.object == "text_completion" and one.id.startswith("cmpl-") and one.model == model
    (choice,) = one.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    ids = default_tokenizer.encode(prompt)
    assert one.usage.prompt_tokens == len(ids) and one.usage.completion_tokens == 12
    assert one.usage.total_tokens == len(ids) + 12
    by_ids = client.completions.create(model="any-name", prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == choice.text and by_ids.model == model
    batch = client.completions.create(model=model, prompt=[prompt, "Once upon a time"], **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == choice.text
    ids2 = default_tokenizer.encode("Once upon a time")
    assert batch.usage.prompt_tokens == len(ids) + len(ids2)
    batch_ids = client.completions.create(model=model, prompt=[ids, ids2], **GREEDY)
    assert [c.text for c in batch_ids.choices] == [c.text for c in batch.choices]


def test_chat_matches_native_generate(tiny_server, client, model, default_tokenizer):
    resp = client.chat.completions.create(model=model, messages=HELLO, **GREEDY)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    prompt = default_tokenizer.apply_chat_template(
        HELLO, add_generation_prompt=True, tokenize=False
    )
    ids = default_tokenizer.encode(prompt, add_special_tokens=False)
    ref = native(
        tiny_server, {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 12}}
    )
    assert choice.message.content == ref["text"]
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 12


def test_chat_stream_deltas_concatenate(client, model):
    full = client.chat.completions.create(model=model, messages=HELLO, **GREEDY)
    chunks = list(
        client.chat.completions.create(model=model, messages=HELLO, stream=True, **GREEDY)
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first, last = chunks[0].choices[0], chunks[-1].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    assert last.finish_reason == "length" and not last.delta.content
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert all(c.usage is None for c in chunks)


def test_completion_stream_and_usage(client, model):
    prompt = "1, 2, 3,"
    full = client.completions.create(model=model, prompt=prompt, **GREEDY)
    stream = client.completions.create(
        model=model, prompt=prompt, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    *body, tail = chunks
    assert tail.choices == [] and tail.usage.completion_tokens == 12
    assert tail.usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None and c.object == "text_completion" for c in body)
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text
    assert body[-1].choices[0].finish_reason == "length"


def test_chat_stream_usage_with_n(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=HELLO,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        temperature=1,
        seed=5,
        max_tokens=6,
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 12
    texts = {0: "", 1: ""}
    finished = set()
    for c in chunks[:-1]:
        (ch,) = c.choices
        texts[ch.index] += ch.delta.content or ""
        if ch.finish_reason:
            finished.add(ch.index)
    assert finished == {0, 1}


def test_n_samples_and_seed(client, model):
    kw = dict(model=model, messages=HELLO, max_tokens=8, temperature=1, seed=1234)
    a = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    single = client.chat.completions.create(**kw)
    assert a.usage.prompt_tokens == single.usage.prompt_tokens  # counted once, not per sample
    assert a.usage.completion_tokens == 16
    b = client.chat.completions.create(n=2, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    c1 = client.completions.create(model=model, prompt="Hi", max_tokens=8, temperature=1, seed=7)
    c2 = client.completions.create(model=model, prompt="Hi", max_tokens=8, temperature=1, seed=7)
    assert c1.choices[0].text == c2.choices[0].text


def test_completion_logprobs_and_echo(client, model):
    resp = client.completions.create(model=model, prompt="Hello world", logprobs=2, **GREEDY)
    lp = resp.choices[0].logprobs
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(2 <= len(top) <= 3 and max(top.values()) <= 0 for top in lp.top_logprobs)
    # greedy: the sampled token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-4 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset)
    echo = client.completions.create(
        model=model, prompt="Hello world", echo=True, logprobs=1, **GREEDY
    )
    e = echo.choices[0]
    assert e.text == "Hello world" + resp.choices[0].text
    assert len(e.logprobs.tokens) == echo.usage.prompt_tokens + n
    assert e.logprobs.token_logprobs[0] is None and e.logprobs.top_logprobs[0] is None
    assert all(v <= 0 for v in e.logprobs.token_logprobs[1:])
    assert e.logprobs.token_logprobs[-n:] == pytest.approx(lp.token_logprobs, abs=1e-3)
    score = client.completions.create(
        model=model, prompt="Hello world", echo=True, max_tokens=0, logprobs=0
    )
    assert score.choices[0].text == "Hello world" and score.usage.completion_tokens == 0


def test_chat_logprobs(client, model):
    resp = client.chat.completions.create(
        model=model, messages=HELLO, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    chunks = list(
        client.chat.completions.create(
            model=model, messages=HELLO, logprobs=True, stream=True, **GREEDY
        )
    )
    streamed = [
        t for c in chunks for t in ((c.choices[0].logprobs and c.choices[0].logprobs.content) or [])
    ]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_stop(client, model):
    base = client.completions.create(model=model, prompt="Once upon a time", **GREEDY)
    text = base.choices[0].text
    stop = text[4:7]
    cut = client.completions.create(model=model, prompt="Once upon a time", stop=[stop], **GREEDY)
    (c,) = cut.choices
    assert c.finish_reason == "stop" and c.text == text[: text.find(stop)]
    assert c.model_extra["matched_stop"] == stop
    chunks = client.completions.create(
        model=model, prompt="Once upon a time", stop=stop, stream=True, **GREEDY
    )
    chunks = list(chunks)
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_response_format_is_accepted(client, model):
    resp = client.chat.completions.create(
        model=model, messages=HELLO, response_format={"type": "json_object"}, **GREEDY
    )
    assert resp.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "kind,kw,param",
    [
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        (
            "chat",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages",
        ),
        ("chat", {"n": 0}, "n"),
        ("chat", {"temperature": -1}, "temperature"),
        ("chat", {"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ("chat", {"max_tokens": 10**6}, "max_tokens"),
        ("chat", {"response_format": {"type": "yaml"}}, "response_format"),
        ("chat", {"tools": [{"type": "retrieval"}]}, "tools"),
        ("completion", {"prompt": "x", "logprobs": 9}, "logprobs"),
        ("completion", {"prompt": "x", "best_of": 3}, "best_of"),
        ("completion", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("completion", {"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
        ("completion", {"prompt": "x", "top_p": 0}, "top_p"),
        ("completion", {"prompt": ""}, "prompt"),
        ("completion", {"prompt": [10**9]}, "prompt"),
        ("completion", {"extra_body": {"prompt": None}}, "prompt"),
    ],
)
def test_bad_requests(client, model, kind, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        if kind == "chat":
            client.chat.completions.create(**{"model": model, "messages": HELLO, **kw})
        else:
            client.completions.create(**{"model": model, "prompt": "x", **kw})
    e = info.value
    assert e.status_code == 400
    assert e.body["param"] == param and param in e.body["message"]


def test_bad_json_body(tiny_server):
    r = requests.post(tiny_server.url + "/v1/chat/completions", data=b"{nope", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_default_model_knows_paris(default_server):
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="x", max_retries=0)
    resp = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=20,
    )
    assert "Paris" in resp.choices[0].message.content, json.dumps(resp.model_dump())
