"""The smallm language (``smallm.lang``): chat template loading, a local ``Runtime`` and the
OpenAI backend. The programs themselves (gen, select, roles, fork, streaming, batches, errors)
run on both native backends in ``test_lang_suite.py``."""

from __future__ import annotations

import os

import pytest

import smallm as sgl
from smallm.lang import chat_template as ct


@sgl.function
def chat(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=24))
    s += sgl.user("Thanks. And which country is Berlin the capital of?")
    s += sgl.assistant(sgl.gen("answer2", max_tokens=24))


def test_chat_template_override_and_fallback():
    jinja = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}[/]{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    t = ct.load(jinja)
    assert t.get_prefix_and_suffix("user") == ("[user]", "[/]")
    assert t.generation_prompt == "[assistant]" and t.stop_str == ("[/]",)
    assert ct.load(None, "/nonexistent") == ct.CHATML


def test_runtime_starts_and_stops_a_local_server(tiny_chat_model_dir):
    @sgl.function
    def hello(s):
        s += sgl.user("Say hi.")
        s += sgl.assistant(sgl.gen("reply", max_tokens=4))

    with sgl.Runtime(model_path=tiny_chat_model_dir, max_total_tokens=4096) as runtime:
        state = hello.run(backend=runtime, temperature=0)
        assert state.error() is None and state.get_meta_info("reply")["completion_tokens"] <= 4
        pid = runtime.process.pid
    assert runtime.process.poll() == 0  # a clean SIGTERM shutdown
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="exited with code 2"):
        sgl.Runtime(model_path=tiny_chat_model_dir, max_running_requests=0)


def test_openai_backend_matches_the_native_endpoint(default_server):
    endpoint = sgl.RuntimeEndpoint(default_server.url)
    client = sgl.OpenAI(base_url=default_server.url + "/v1", chat_template=endpoint.chat_template)
    a = chat.run(question="Name a large animal.", backend=client, temperature=0)
    b = chat.run(question="Name a large animal.", backend=endpoint, temperature=0)
    assert a.error() is None and a.text() == b.text()
    streamed = chat.run(question="Name a large animal.", backend=client, temperature=0, stream=True)
    assert "".join(streamed.text_iter("answer")) == b["answer"]

    @sgl.function
    def city(s):
        s += sgl.user("What is the capital of France?")
        s += sgl.assistant(
            "The capital of France is" + sgl.select("c", [" Paris", " London", " Rome"])
        )

    assert city.run(backend=client)["c"] == " Paris"
