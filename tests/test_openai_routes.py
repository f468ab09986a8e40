"""The routes and fields added for real clients, on a tiny random model (protocol, not
quality): /tokenize, /detokenize, /tokenizer_info, /openapi.json, logit_bias,
max_completion_tokens, the vLLM guided_* / structured_outputs spellings, and their 400s."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import requests

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def post(server, path, body):
    return requests.post(server.url + path, json=body, timeout=60)


def test_tokenize_and_detokenize(tiny_server, default_tokenizer):
    r = post(tiny_server, "/tokenize", {"prompt": "Hello world", "return_token_strs": True})
    body = r.json()
    ids = default_tokenizer.encode("Hello world")
    assert body["tokens"] == ids and body["count"] == len(ids) and body["max_model_len"] > 0
    assert body["token_strs"] == default_tokenizer.convert_ids_to_tokens(ids)
    assert post(tiny_server, "/detokenize", {"tokens": ids}).json() == {"prompt": "Hello world"}
    assert post(tiny_server, "/v1/detokenize", {"tokens": []}).json() == {"prompt": ""}
    chat = post(tiny_server, "/tokenize", {"messages": HI}).json()
    text = default_tokenizer.apply_chat_template(HI, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == default_tokenizer.encode(text, add_special_tokens=False)
    for path, bad, param in [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": HI}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ]:
        r = post(tiny_server, path, bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, bad, r.text)


def test_tokenizer_info_and_openapi(tiny_server, default_tokenizer):
    info = requests.get(tiny_server.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == default_tokenizer.eos_token
    assert info["bos_token"] == default_tokenizer.bos_token
    assert info["chat_template"] == default_tokenizer.chat_template
    spec = requests.get(tiny_server.url + "/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.")
    for path, method in [
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/responses", "post"),
        ("/tokenize", "post"),
        ("/detokenize", "post"),
        ("/tokenizer_info", "get"),
        ("/generate", "post"),
        ("/openapi.json", "get"),
    ]:
        assert method in spec["paths"][path], path
    chat = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert "tools" in chat["content"]["application/json"]["schema"]["properties"]


def test_logit_bias_forces_and_bans(client, default_tokenizer):
    (tok,) = default_tokenizer.encode(" Paris")
    forced = client.completions.create(
        model="m", prompt="Hello", max_tokens=4, temperature=0, logit_bias={str(tok): 100}
    )
    assert forced.choices[0].text == " Paris" * 4
    free = client.completions.create(model="m", prompt="Hello", max_tokens=1, temperature=0)
    first = default_tokenizer.encode(free.choices[0].text)[0]
    banned = client.completions.create(
        model="m", prompt="Hello", max_tokens=1, temperature=0, logit_bias={str(first): -100}
    )
    assert banned.choices[0].text != free.choices[0].text
    # Batched: a sampled row with a bias beside a greedy row without one.
    chat = client.chat.completions.create(
        model="m", messages=HI, max_completion_tokens=3, temperature=0.7, logit_bias={tok: 100}
    )
    assert chat.choices[0].message.content == " Paris" * 3
    assert chat.usage.completion_tokens == 3  # max_completion_tokens


@pytest.mark.parametrize(
    "extra,check",
    [
        ({"guided_json": SCHEMA}, "schema"),
        ({"structured_outputs": {"json": SCHEMA}}, "schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}}, "schema"),
        ({"guided_regex": "[0-9]{3}-[a-c]{2}"}, r"[0-9]{3}-[a-c]{2}"),
        ({"structured_outputs": {"regex": "(yes|no)!"}}, r"(yes|no)!"),
        ({"guided_choice": ["red", "green", "blue"]}, r"red|green|blue"),
        ({"structured_outputs": {"choice": ["left", "right"]}}, r"left|right"),
        ({"guided_grammar": 'start: "x" NUM\nNUM: /[0-9]{2}/'}, r"x[0-9]{2}"),
        ({"structured_outputs": {"grammar": 'start: ("a" | "b") ("a" | "b")? "."'}}, r"[ab]{1,2}\."),
    ],
)  # fmt: skip
def test_guided_spellings(client, extra, check):
    for kind in ("chat", "completion"):
        if kind == "chat":
            resp = client.chat.completions.create(
                model="m", messages=HI, max_tokens=40, temperature=0, extra_body=extra
            )
            text = resp.choices[0].message.content
        else:
            resp = client.completions.create(
                model="m", prompt="x", max_tokens=40, temperature=0, extra_body=extra
            )
            text = resp.choices[0].text
        assert resp.choices[0].finish_reason == "stop", (kind, text)
        if check == "schema":
            jsonschema.validate(json.loads(text), SCHEMA)
        else:
            assert re.fullmatch(check, text), (kind, text)


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": "red"}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_grammar": ""}, "guided_grammar"),
        ({"structured_outputs": "json"}, "structured_outputs"),
        ({"structured_outputs": {"regex": 5}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
    ],
)
def test_guided_errors(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=HI, max_tokens=4, extra_body=extra)
    assert e.value.body["param"] == param, e.value.body


def test_suffix_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="def f(", suffix="return 1", max_tokens=4)
    assert e.value.body["param"] == "suffix" and "not supported" in e.value.body["message"]


def test_embeddings_match_hf_mean_pooled_last_hidden_state(
    client, tiny_chat_model_dir, default_tokenizer
):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    texts = [
        "The capital of France is Paris.",
        "Hello",
        "A much longer sentence about cats and dogs.",
    ]
    resp = client.embeddings.create(model="m", input=texts)
    assert [d.index for d in resp.data] == [0, 1, 2]
    ref = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32).eval()
    for text, item in zip(texts, resp.data):
        ids = default_tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            hidden = ref.model(torch.tensor([ids])).last_hidden_state[0]
        want = torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy()
        got = np.array(item.embedding)
        assert abs(np.linalg.norm(got) - 1) < 1e-4
        # The tiny server runs the default path (bfloat16 activations): close, not bit-equal.
        assert float(got @ want) > 0.9999 and np.abs(got - want).max() < 5e-3, text
    total = sum(len(default_tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    assert resp.usage.prompt_tokens == total
    # Again (now with the prompts in the prefix cache), by token ids, and as base64.
    again = client.embeddings.create(
        model="m", input=[default_tokenizer.encode(texts[0], add_special_tokens=False)]
    )
    assert np.abs(np.array(again.data[0].embedding) - np.array(resp.data[0].embedding)).max() < 1e-5
    raw = requests.post(client.base_url.__str__().rstrip("/") + "/embeddings", json={"input": "Hello", "encoding_format": "base64"}, timeout=60).json()  # fmt: skip
    import base64

    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.abs(vec - np.array(resp.data[1].embedding)).max() < 1e-5
    for bad, param in [({"input": ""}, "input"), ({"input": []}, "input"), ({"input": "x", "dimensions": 3}, "dimensions"), ({"input": "x", "encoding_format": "int8"}, "encoding_format")]:  # fmt: skip
        r = requests.post(
            client.base_url.__str__().rstrip("/") + "/embeddings", json=bad, timeout=60
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_same_constraint_in_two_spellings_is_one(client):
    # guidance's vLLM client sends guided_grammar and structured_outputs.grammar together.
    grammar = 'start: "ok" ("!" | "?")'
    extra = {"guided_grammar": grammar, "structured_outputs": {"grammar": grammar}}
    resp = client.chat.completions.create(model="m", messages=HI, max_tokens=8, extra_body=extra)
    assert resp.choices[0].message.content in ("ok!", "ok?")
