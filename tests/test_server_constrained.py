"""Constrained decoding over HTTP (tiny random model: only the mask makes its output valid)."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import requests

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "grade": {"enum": ["A", "B", "C"]}},
    "required": ["ok", "grade"],
    "additionalProperties": False,
}


def generate(server, **body):
    return requests.post(server.url + "/generate", json=body, timeout=60)


def test_native_regex_and_json_schema(tiny_server):
    regex = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])"
    r = generate(
        tiny_server,
        text=["A month:", "Another:"],
        sampling_params={"max_new_tokens": 16, "temperature": 1.0, "seed": 5, "regex": regex},
    )
    assert r.status_code == 200
    for out in r.json():
        assert re.fullmatch(regex, out["text"]), out["text"]
    params = {
        "max_new_tokens": 40,
        "temperature": 0.7,
        "seed": 1,
        "json_schema": json.dumps(SCHEMA),
    }
    out = generate(tiny_server, text="Grade:", sampling_params=params).json()
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert out["meta_info"]["jump_forward_tokens"] > 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"regex": "([a-z"}, "invalid regex"),
        ({"json_schema": "{nope"}, "invalid json_schema"),
        ({"json_schema": {"type": "object"}}, "json_schema must be a string"),
        ({"regex": "a", "json_schema": "{}"}, "at most one"),
        ({"ebnf": "start: ("}, "invalid ebnf"),
    ],
)
def test_bad_constraints_are_400_and_the_server_stays_up(tiny_server, params, message):
    r = generate(tiny_server, text="x", sampling_params={"max_new_tokens": 4, **params})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    assert generate(tiny_server, text="x", sampling_params={"max_new_tokens": 1}).status_code == 200


def test_openai_response_format_json_schema(tiny_server):
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x")
    resp = client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": "Grade me."}],
        max_tokens=40,
        temperature=0.7,
        seed=3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "grade", "schema": SCHEMA, "strict": True},
        },
    )
    jsonschema.validate(json.loads(resp.choices[0].message.content), SCHEMA)
    with pytest.raises(openai.BadRequestError, match="invalid json_schema"):
        client.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "object", "not": {}}},
            },
        )


def test_grammar_queue_metric_exists(tiny_server):
    text = requests.get(tiny_server.url + "/metrics", timeout=10).text
    # SGLang's gauge labels (engine_type, model_name, pp_rank, tp_rank) in any order.
    assert re.search(
        r'^sglang:num_grammar_queue_reqs\{[^}]*model_name="[^"]*"[^}]*\} 0\.0$', text, re.M
    )
