"""The smallm language (``smallm.lang``) interpreted over the in-process Engine and over HTTP."""

from __future__ import annotations

import os

import pytest

import smallm as sgl
from smallm.lang import chat_template as ct
from smallm.lang.choices import greedy_token_selection, unconditional_likelihood_normalized


@pytest.fixture(scope="module")
def backend(default_model_dir):
    """The one default-model backend of this module (content-sensitive tests)."""
    be = sgl.EngineBackend(default_model_dir, max_total_tokens=8192)
    yield be
    be.shutdown()


@pytest.fixture(scope="module")
def tiny_backend(tiny_chat_model_dir):
    """A random model with the default tokenizer: fast, gibberish text."""
    be = sgl.EngineBackend(str(tiny_chat_model_dir), max_total_tokens=8192)
    yield be
    be.shutdown()


def greedy(backend, prefix: str, max_tokens: int, stop=None) -> str:
    params = {"max_new_tokens": max_tokens, "temperature": 0, "stop": stop or []}
    return backend.engine.generate(prefix, params)["text"]


@sgl.function
def few_shot_qa(s, question):
    s += "Q: What is 2 + 2?\nA: 4\nQ: What colour is the sky?\nA: Blue\n"
    s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=16, stop="\n")


@sgl.function
def chat(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=24))
    s += sgl.user("Thanks. And which country is Berlin the capital of?")
    s += sgl.assistant(sgl.gen("answer2", max_tokens=24))


def test_few_shot_qa_with_stop(backend):
    state = few_shot_qa.run(question="What is the capital of France?", backend=backend,
                            temperature=0)  # fmt: skip
    answer = state["answer"]
    assert state.error() is None
    assert answer and "\n" not in answer and "Paris" in answer
    prefix = state.text()[: -len(answer)]
    assert answer == greedy(backend, prefix, 16, ["\n"])
    assert state.get_meta_info("answer")["finish_reason"]["type"] == "stop"


def test_multi_turn_chat_renders_like_the_tokenizer(backend):
    state = chat.run(question="What is the capital of France?", backend=backend, temperature=0)
    assert "Paris" in state["answer"] and "Germany" in state["answer2"]
    msgs = state.messages()
    # The template's default system turn is inserted, as the tokenizer's template does itself.
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    tok = backend.engine.tokenizer
    assert state.text() == tok.apply_chat_template(msgs, tokenize=False)
    # The first answer was generated from exactly the tokenizer's generation prompt.
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert state.text().startswith(prompt + state["answer"] + "<|im_end|>")


def test_select_picks_paris(backend):
    @sgl.function
    def pick(s, method):
        s += sgl.user("What is the capital of France?")
        s += sgl.assistant(
            "The capital of France is"
            + sgl.select("city", [" Paris", " London", " Berlin"], choices_method=method)
        )

    state = pick.run(method=sgl.token_length_normalized, backend=backend)
    assert state["city"] == " Paris"
    assert state.text().endswith("The capital of France is Paris<|im_end|>\n")
    assert len(state.get_meta_info("city")["normalized_prompt_logprobs"]) == 3
    for method in (greedy_token_selection, unconditional_likelihood_normalized):
        assert pick.run(method=method, backend=backend)["city"] in (" Paris", " London", " Berlin")

    # gen(choices=...) is a select.
    @sgl.function
    def yes_no(s):
        s += sgl.user("Is Paris in France? Answer yes or no.")
        s += sgl.assistant(sgl.gen("a", choices=["yes", "no"]))

    assert yes_no.run(backend=backend)["a"] in ("yes", "no")


def test_regex_and_dtype_int(backend):
    @sgl.function
    def facts(s):
        s += "A dog has " + sgl.gen("legs", dtype=int, max_tokens=4) + " legs.\n"
        s += "Phone number: " + sgl.gen("phone", regex=r"[0-9]{3}-[0-9]{4}", max_tokens=10)
        s += "\nAge: " + sgl.gen_int("age", max_tokens=4)

    state = facts.run(backend=backend, temperature=0)
    assert state.error() is None
    int(state["legs"])
    int(state["age"])
    import re

    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", state["phone"])


def test_fork_join_then_summary(backend):
    @sgl.function
    def tips(s):
        s += "Here are three facts about the sea.\n"
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f"Fact {i + 1}:" + sgl.gen("fact", max_tokens=12, stop="\n")
        forks.join()
        for i, fact in enumerate(s["fact"]):
            s += f"Fact {i + 1}:{fact}\n"
        s += "In one sentence:" + sgl.gen("summary", max_tokens=16, stop="\n")

    state = tips.run(backend=backend, temperature=0)
    facts = state["fact"]
    assert isinstance(facts, list) and len(facts) == 3
    base = "Here are three facts about the sea.\n"
    for i, fact in enumerate(facts):
        assert fact == greedy(backend, base + f"Fact {i + 1}:", 12, ["\n"])
    assert state["summary"]
    assert state.text().startswith(base + "".join(f"Fact {i + 1}:{f}\n" for i, f in
                                                  enumerate(facts)))  # fmt: skip


def test_branch_on_variable_mid_program(backend):
    @sgl.function
    def tool_use(s, question):
        s += "Question: " + question + "\n"
        s += "Tool to use (calculator or search):" + sgl.select("tool", ["calculator", "search"])
        s += "\n"
        if s["tool"] == "calculator":
            s += "Result: " + str(eval("12*7")) + "\n"
        else:
            s += "Search result: Paris is the capital of France.\n"
        s += "Answer:" + sgl.gen("answer", max_tokens=8, stop="\n")

    state = tool_use.run(question="What is 12 times 7?", backend=backend, temperature=0)
    assert state["tool"] in ("calculator", "search")
    expected = "Result: 84" if state["tool"] == "calculator" else "Search result"
    assert expected in state.text()
    assert state["answer"]


def test_streaming_text_iter(backend):
    state = chat.run(question="What is the capital of France?", backend=backend, temperature=0)
    streamed = chat.run(
        question="What is the capital of France?", backend=backend, temperature=0, stream=True
    )
    pieces = list(streamed.text_iter("answer"))
    # Usually several pieces; a consumer descheduled for the whole generation (a loaded
    # machine) may see them coalesced into one, so the count is not asserted beyond that.
    assert pieces and "".join(pieces) == state["answer"]
    whole = "".join(streamed.text_iter())
    assert whole == state.text() == streamed.text()


def test_run_batch_with_progress_bar(tiny_backend, capsys):
    @sgl.function
    def short(s, i):
        s += f"Item {i}:" + sgl.gen("out", max_tokens=4)

    states = short.run_batch(
        [{"i": i} for i in range(16)], backend=tiny_backend, progress_bar=True, temperature=0
    )
    assert len(states) == 16
    for i, st in enumerate(states):
        assert st.error() is None
        assert st.text() == f"Item {i}:" + st["out"]
        assert st.get_meta_info("out")["completion_tokens"] <= 4
    assert "16/16" in capsys.readouterr().err


def test_endpoint_and_engine_agree(backend, default_server):
    endpoint = sgl.RuntimeEndpoint(default_server.url)
    # The server's tokenizer directory is local here, so the templates are the same.
    assert endpoint.chat_template == backend.chat_template
    a = chat.run(question="Name a large animal.", backend=endpoint, temperature=0)
    b = chat.run(question="Name a large animal.", backend=backend, temperature=0)
    assert a.error() is None and a.text() == b.text()
    s1 = chat.run(question="Name a colour.", backend=endpoint, temperature=0, stream=True)
    assert "".join(s1.text_iter("answer")) == s1["answer"]
    assert endpoint.flush_cache()


def test_errors_are_recorded_not_raised(tiny_backend):
    @sgl.function
    def broken(s):
        s += "Hello" + sgl.gen("x", max_tokens=2)
        raise RuntimeError("boom")

    state = broken.run(backend=tiny_backend, temperature=0)
    assert isinstance(state.error(), RuntimeError)
    assert state["x"] is not None  # work done before the failure stays readable

    @sgl.function
    def bad_request(s):
        s += "Hello" + sgl.gen("y", max_tokens=2, top_p=5.0)
        s += sgl.gen("z", max_tokens=2)

    state = bad_request.run(backend=tiny_backend)
    assert state.error() is not None
    with pytest.raises(sgl.lang.VariableError):
        state["z"]


def test_import_smallm_as_sgl_runs_sglang_programs(tiny_backend):
    @sgl.function
    def prog(s):
        s += sgl.system("Be brief.")
        with s.user():
            s += "Hi"
        s += sgl.assistant_begin()
        s += sgl.gen("reply", max_tokens=3)
        s += sgl.assistant_end()

    sgl.set_default_backend(tiny_backend)
    try:
        state = prog.run(temperature=0)
    finally:
        sgl.set_default_backend(None)
    assert state.error() is None
    assert state.text().startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"]


def test_chat_template_override_and_fallback():
    jinja = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}[/]{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    t = ct.load(jinja)
    assert t.get_prefix_and_suffix("user") == ("[user]", "[/]")
    assert t.generation_prompt == "[assistant]" and t.stop_str == ("[/]",)
    assert ct.load(None, "/nonexistent") == ct.CHATML


def test_greedy_token_selection_prefers_extended_prefix():
    lp = [[[-1.0, 1, "a"]], [[-1.0, 1, "a"], [-0.1, 2, "b"]]]
    d = greedy_token_selection(
        choices=["a", "ab"], normalized_prompt_logprobs=[-1.0, -0.55],
        input_token_logprobs=lp, output_token_logprobs=[[], []],
    )  # fmt: skip
    assert d.decision == "ab"


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
