"""Language backends against a real server: the OpenAI backend's chat-API mode
(``is_chat_model=True``: whole assistant turns, the server's own chat template), and a remote
native endpoint rendering the server's chat template."""

from __future__ import annotations

import dataclasses
import json

import pytest

import smallm as sl


@sl.function
def chat(s, question):
    s += sl.system("You are a helpful assistant.")
    s += sl.user(question)
    s += sl.assistant(sl.gen("answer", max_tokens=24))
    s += sl.user("Thanks. And which country is Berlin the capital of?")
    s += sl.assistant(sl.gen("answer2", max_tokens=24))


def test_chat_api_backend_matches_the_native_endpoint(default_server):
    endpoint = sl.RuntimeEndpoint(default_server.url)
    client = sl.OpenAI(base_url=default_server.url + "/v1", is_chat_model=True)
    a = chat.run(question="What is the capital of France?", backend=client, temperature=0)
    b = chat.run(question="What is the capital of France?", backend=endpoint, temperature=0)
    assert a.error() is None
    # The server renders the messages with the model's template: the same prompt as the
    # language's rendering, so the same greedy turns.
    assert a["answer"] == b["answer"] and "Paris" in a["answer"]
    assert a["answer2"] == b["answer2"]
    assert a.messages() == b.messages()
    streamed = chat.run(question="What is the capital of France?", backend=client,
                        temperature=0, stream=True)  # fmt: skip
    assert "".join(streamed.text_iter("answer")) == b["answer"]

    @sl.function
    def extract(s):
        s += sl.user("Give the name and age of Ann, who is 31, as JSON.")
        schema = {"type": "object", "properties": {"name": {"type": "string"},
                  "age": {"type": "integer"}}, "required": ["name", "age"]}  # fmt: skip
        s += sl.assistant(sl.gen("json", max_tokens=40, json_schema=schema))

    out = json.loads(extract.run(backend=client, temperature=0)["json"])
    assert isinstance(out["age"], int) and isinstance(out["name"], str)


def test_chat_api_backend_refuses_what_it_cannot_do(default_server):
    client = sl.OpenAI(base_url=default_server.url + "/v1", is_chat_model=True)

    @sl.function
    def continues_text(s):
        s += sl.user("Hi")
        s += sl.assistant("Sure, " + sl.gen("rest", max_tokens=4))

    state = continues_text.run(backend=client)
    assert "whole assistant messages" in str(state.error())

    @sl.function
    def chooses(s):
        s += sl.user("Yes or no?")
        s += sl.assistant(sl.select("c", ["Yes", "No"]))

    assert "prompt logprobs" in str(chooses.run(backend=client).error())
    with pytest.raises(sl.VariableError):
        chooses.run(backend=client)["c"]


def test_a_remote_endpoint_renders_the_servers_own_chat_template(default_server, monkeypatch):
    local = sl.RuntimeEndpoint(default_server.url)  # tokenizer directory readable here
    # As if the server ran on another machine: its tokenizer_path is not a local directory.
    monkeypatch.setattr("smallm.lang.backends.endpoint.os.path.isdir", lambda path: False)
    remote = sl.RuntimeEndpoint(default_server.url)
    same_name = dataclasses.replace(remote.chat_template, name=local.chat_template.name)
    assert same_name == local.chat_template
    assert remote.model_info["chat_template"].startswith("{%")
