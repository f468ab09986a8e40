"""Details of the language's API that SGLang programs rely on: numbers that stop, gen(n > 1),
argument names shared with sampling options, positional run_batch, SGLang's endpoint keywords,
and the greedy choice rule's tie tolerance."""

from __future__ import annotations

import time

import pytest

import smallm as sl


@pytest.fixture(scope="module")
def endpoint(default_server):
    return sl.RuntimeEndpoint(default_server.url, chat_template_name="chatml", verify=True)


def test_gen_int_and_float_stop_after_the_number(endpoint):
    @sl.function
    def count(s):
        s += "Q: What is 2 + 2?\nA: 4\nQ: How many days are in a week?\nA: "
        s += sl.gen_int("days", max_tokens=6) + "\nQ: What is half of 3?\nA: "
        s += sl.gen("half", dtype=float, max_tokens=8)

    state = count.run(backend=endpoint, temperature=0)
    assert state.error() is None
    assert state["days"] == "7"
    assert state.get_meta_info("days")["finish_reason"]["type"] == "stop"
    float(state["half"])
    assert state.get_meta_info("half")["finish_reason"]["type"] == "stop"


def test_gen_with_n_gives_a_list(endpoint):
    @sl.function
    def names(s):
        s += "A name for a cat:" + sl.gen("name", max_tokens=4, n=3, temperature=1.0, stop="\n")
        s += "\nDone."

    state = names.run(backend=endpoint)
    assert state.error() is None
    assert isinstance(state["name"], list) and len(state["name"]) == 3
    assert state.text() == "A name for a cat:" + state["name"][0] + "\nDone."
    streamed = names.run(backend=endpoint, stream=True)
    assert "cannot stream" in str(streamed.error())


def test_program_arguments_named_like_sampling_options(endpoint):
    @sl.function
    def echo(s, max_tokens, temperature):
        s += f"{max_tokens} {temperature}" + sl.gen("x", max_tokens=2)

    state = echo.run(max_tokens=5, temperature="warm", backend=endpoint)
    assert state.error() is None and state.text().startswith("5 warm")
    states = echo.run_batch([(1, "a"), (2, "b")], backend=endpoint)
    assert [st.text()[:3] for st in states] == ["1 a", "2 b"]


def test_greedy_token_selection_ignores_float_noise():
    # Both choices start with the same token, scored in two rows of one batch (7th digit).
    lps = [
        [[-0.016386226, 1, " the"], [-3.0, 2, " city"]],
        [[-0.016386108, 1, " the"], [-1.0, 3, " capital"]],
    ]
    d = sl.greedy_token_selection(choices=["a", "b"], normalized_prompt_logprobs=[0, 0],
                                  input_token_logprobs=lps, output_token_logprobs=[[], []])  # fmt: skip
    assert d.decision == "b"


def test_a_backend_timeout_is_the_programs_error_not_a_hang(default_server):
    slow = sl.RuntimeEndpoint(default_server.url, timeout=0.5)

    @sl.function
    def long(s):
        s += "Count to a thousand:" + sl.gen("x", max_tokens=500, ignore_eos=True)
        s += sl.gen("y", max_tokens=2)

    t0 = time.monotonic()
    state = long.run(backend=slow, temperature=0)
    assert time.monotonic() - t0 < 30
    assert "timed out" in str(state.error()).lower()
    with pytest.raises(sl.VariableError):
        state["y"]
