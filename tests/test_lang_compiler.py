"""The language's compiler: tracing to IR, the constant prefix, and step-aligned ``run_batch``
(one batched request per round) against a real server, with the same greedy results as the
interpreter."""

from __future__ import annotations

import threading
import time

import pytest
import requests

import smallm as sl
from smallm.lang.compiler import Argument, trace
from smallm.lang.ir import ConstantText, Gen


@sl.function
def quiz(s, topic, bad_top_p=None):
    """Roles, a gen, a data-dependent branch, a select, a fork: every kind of step."""
    s += sl.system("You are a helpful assistant.")
    s += sl.user("Give one word about " + topic + ".")
    s += sl.assistant(sl.gen("word", max_tokens=4, stop="\n"))
    if s["word"].strip().lower().startswith(("a", "e", "i", "o", "u")):
        s += sl.user("Does it start with a vowel?")
    else:
        s += sl.user("Does it start with a consonant?")
    s += sl.assistant(sl.select("yes", ["Yes", "No"]))
    branches = s.fork(2)
    branches += lambda i: sl.user(f"Say a number above {i}.")
    kwargs = {} if bad_top_p is None else {"top_p": bad_top_p}
    branches += sl.assistant(sl.gen("number", max_tokens=3, **kwargs))
    branches.join()


TOPICS = ["the sea", "apples", "winter", "music", "elephants", "iron"]


def test_trace_records_the_ir_and_stops_at_the_first_generated_value():
    t = trace(quiz)
    assert not t.complete and "generated" in t.stopped_by
    kinds = [type(e).__name__ for e in t.exprs]
    assert kinds == ["ExprList", "ExprList", "ExprList"]  # system, user, assistant(gen)
    prefix = t.prefix_exprs()
    # system turn, then the user turn's opening and its constant text, up to the argument
    assert [type(e).__name__ for e in prefix] == [
        "RoleBegin", "ConstantText", "RoleEnd", "RoleBegin", "ConstantText",
    ]  # fmt: skip
    assert prefix[-1].value == "Give one word about "
    assert any(isinstance(e, Argument) for e in t.exprs[1].exprs[1].exprs)

    @sl.function
    def uses_value(s, name):
        s += "Hello "
        s += f"dear {name}"  # needs the argument's value: the trace stops here
        s += sl.gen("x")

    t = trace(uses_value)
    assert not t.complete and "'name'" in t.stopped_by
    assert [e.value for e in t.prefix_exprs()] == ["Hello "]

    @sl.function
    def constant(s, style):
        s += "Style: " + style + "\n" + sl.gen("x", max_tokens=2)

    t = trace(constant.bind(style="terse"))
    assert t.complete
    assert [e.value for e in t.prefix_exprs()] == ["Style: terse\n"]  # str + str first
    assert isinstance(t.exprs[0].exprs[-1], Gen) and isinstance(t.exprs[0].exprs[0], ConstantText)


def test_constant_prefix_renders_with_the_backends_chat_template(default_server):
    endpoint = sl.RuntimeEndpoint(default_server.url)
    prefix = quiz.compile().constant_prefix(endpoint)
    assert prefix == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nGive one word about "
    )
    state = quiz.run(topic="x", backend=endpoint, temperature=0, max_new_tokens=1)
    assert state.text().startswith(prefix)


def test_compiled_run_batch_equals_interpreted_with_one_request_per_round(exact_server):
    # Compiled and interpreted runs batch differently: identical text needs the exact path.
    endpoint = sl.RuntimeEndpoint(exact_server.url)
    batch = [{"topic": t} for t in TOPICS]
    endpoint.requests_sent = 0
    interpreted = quiz.run_batch(batch, backend=endpoint, temperature=0)
    interpreted_requests = endpoint.requests_sent
    endpoint.requests_sent = 0
    compiled = quiz.run_batch(batch, backend=endpoint, temperature=0, compiled=True)
    compiled_requests = endpoint.requests_sent
    for a, b in zip(interpreted, compiled):
        assert a.error() is None and b.error() is None
        assert a.text() == b.text()
        assert a["word"] == b["word"] and a["yes"] == b["yes"] and a["number"] == b["number"]
        assert a.messages() == b.messages()
    # Per program: word, select (2 requests), fork warm-up, two branch gens = 6 requests.
    assert interpreted_requests == 6 * len(TOPICS)
    # Compiled: one warm-up of the constant prefix, then each step once for the whole batch
    # (word, select x2, the branches' gens; no separate fork warm-up: the branches go together).
    assert compiled_requests == 1 + 4


def test_compiled_run_of_one_program_batches_its_forks(default_server):
    endpoint = sl.RuntimeEndpoint(default_server.url)
    plain = quiz.run(topic="rain", backend=endpoint, temperature=0)
    endpoint.requests_sent = 0
    state = quiz.compile().run(topic="rain", backend=endpoint, temperature=0)
    assert state.error() is None and state.text() == plain.text()
    assert state["number"] == plain["number"]
    assert endpoint.requests_sent == 4  # word, select x2, both branches at once


def test_a_failing_program_does_not_fail_its_batch(default_server):
    endpoint = sl.RuntimeEndpoint(default_server.url)
    batch = [{"topic": t} for t in TOPICS[:3]]
    batch[1]["bad_top_p"] = 5.0  # a 400 from the server, in the third round only

    @sl.function
    def raises(s, topic, bad_top_p=None):
        quiz.func(s, topic, bad_top_p)
        if topic == TOPICS[2]:
            raise RuntimeError("program bug")

    states = raises.run_batch(batch, backend=endpoint, temperature=0, compiled=True)
    assert states[0].error() is None and len(states[0]["number"]) == 2
    assert "top_p" in str(states[1].error())
    assert isinstance(states[2].error(), RuntimeError)
    alone = quiz.run(topic=TOPICS[0], backend=endpoint, temperature=0)
    assert states[0].text() == alone.text()


def test_a_thread_blocked_outside_the_language_does_not_hang_a_round(exact_server):
    # Compiled and interpreted runs batch differently: identical text needs the exact path.
    endpoint = sl.RuntimeEndpoint(exact_server.url)
    gate = threading.Event()

    @sl.function
    def waits(s, i):
        s += f"Count: {i}," + sl.gen("a", max_tokens=2)
        if i == 0:
            # Invisible to the coordinator: the round goes after max_wait. Long enough that the
            # first round has surely finished on a loaded 2-core machine.
            gate.wait(5)
        s += sl.gen("b", max_tokens=2)

    t0 = time.monotonic()
    endpoint.requests_sent = 0
    states = waits.run_batch([{"i": i} for i in range(4)], backend=endpoint, temperature=0,
                             compiled=True)  # fmt: skip
    assert time.monotonic() - t0 < 60
    # a (all four), b of the three others (sent after max_wait), then program 0's b alone.
    # (No warm-up: the f-string stops the trace before any constant text.)
    assert endpoint.requests_sent == 3
    for i, st in enumerate(states):
        assert st.error() is None
        assert st.text() == waits.run(i=i, backend=endpoint, temperature=0).text()


def test_per_prompt_logprob_options_in_a_list_request(tiny_server):
    body = {
        "text": ["Hello there", "Good morning to you"],
        "sampling_params": [{"max_new_tokens": 2, "temperature": 0}] * 2,
        "return_logprob": [True, False],
        "logprob_start_len": [0, -1],
        "top_logprobs_num": [2, 0],
    }
    r = requests.post(tiny_server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    a, b = r.json()
    assert len(a["meta_info"]["input_token_logprobs"]) == a["meta_info"]["prompt_tokens"]
    assert len(a["meta_info"]["output_top_logprobs"][0]) == 2
    assert "input_token_logprobs" not in b["meta_info"]
    for bad in ({"logprob_start_len": [0]}, {"return_logprob": [True, 1]},
                {"top_logprobs_num": [0, 2000]}):  # fmt: skip
        r = requests.post(tiny_server.url + "/generate", json={**body, **bad}, timeout=60)
        assert r.status_code == 400
        assert next(iter(bad)) in r.json()["error"]["message"]


@pytest.mark.parametrize(("compiled", "num_threads"), [(False, "auto"), (True, "auto"), (True, 5)])
def test_run_batch_progress_bar_counts_every_program(
    tiny_chat_model_dir, capsys, compiled, num_threads
):
    backend = sl.EngineBackend(str(tiny_chat_model_dir), max_total_tokens=4096)
    try:

        @sl.function
        def short(s, i):
            s += f"Item {i}:" + sl.gen("out", max_tokens=2)

        states = short.run_batch([{"i": i} for i in range(24)], backend=backend,
                                 progress_bar=True, temperature=0, compiled=compiled,
                                 num_threads=num_threads)  # fmt: skip
        assert [st.text() for st in states] == [f"Item {i}:" + st["out"] for i, st in
                                                enumerate(states)]  # fmt: skip
        assert "24/24" in capsys.readouterr().err
    finally:
        backend.shutdown()


def test_a_dead_server_fails_every_program_of_a_compiled_batch_quickly(default_server):
    endpoint = sl.RuntimeEndpoint(default_server.url)
    endpoint.base_url = f"http://127.0.0.1:{sl.lang.backends.runtime.free_port()}"
    t0 = time.monotonic()
    states = quiz.run_batch([{"topic": t} for t in TOPICS], backend=endpoint, compiled=True)
    assert time.monotonic() - t0 < 30
    for st in states:
        assert "refused" in str(st.error()).lower() or "connect" in str(st.error()).lower()
        with pytest.raises(sl.VariableError):
            st["word"]
