"""SGLang's own frontend (sglang==0.5.2, ``sgl.RuntimeEndpoint``) runs programs against a
smallm server and gets the same greedy text as smallm's in-process Engine."""

from __future__ import annotations

import pytest
import sglang as sgl

from smallm.runtime.engine import Engine


@pytest.fixture(scope="module")
def backend(default_server):
    sgl.global_config.enable_parallel_encoding = False
    return sgl.RuntimeEndpoint(default_server.url, chat_template_name="chatml")


@pytest.fixture(scope="module")
def engine(default_model_dir):
    with Engine(default_model_dir, max_total_tokens=8192) as e:
        yield e


def greedy(engine: Engine, prefix: str, max_tokens: int, stop: list[str] | None = None) -> str:
    params = {"max_new_tokens": max_tokens, "temperature": 0, "stop": stop or []}
    return engine.generate(prefix, params)["text"]


def prefix_of(text: str, completion: str, suffix: str = "") -> str:
    at = text.rindex(completion + suffix)
    return text[:at]


@sgl.function
def few_shot_qa(s, question):
    s += "Q: What is 2 + 2?\nA: 4\nQ: What colour is the sky?\nA: Blue\n"
    s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=16, stop="\n")


@sgl.function
def chat(s, question):
    s += sgl.system("You are a helpful assistant. Answer briefly.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=24))


@sgl.function
def pick_city(s):
    s += sgl.user("What is the capital of France?")
    s += sgl.assistant(
        "The capital of France is" + sgl.select("city", choices=[" Paris", " London", " Berlin"])
    )


@sgl.function
def forked(s):
    s += "Here are two facts about the sea.\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Fact {i + 1}:" + sgl.gen("fact", max_tokens=10, stop="\n")
    forks.join()
    s += "That is all."


def test_gen_with_stop(backend, engine):
    state = few_shot_qa.run(
        question="What is the capital of France?", backend=backend, temperature=0
    )
    answer = state["answer"]
    assert answer and "\n" not in answer
    assert answer == greedy(engine, prefix_of(state.text(), answer), 16, ["\n"])


def test_roles_and_streaming(backend, engine):
    state = chat.run(question="What is the capital of France?", backend=backend, temperature=0)
    answer = state["answer"]
    assert "Paris" in answer
    prefix = prefix_of(state.text(), answer, "<|im_end|>")
    assert prefix.endswith("<|im_start|>assistant\n")
    assert answer == greedy(engine, prefix, 24)
    streamed = chat.run(
        question="What is the capital of France?", backend=backend, temperature=0, stream=True
    )
    pieces = list(streamed.text_iter("answer"))
    assert len(pieces) > 1 and "".join(pieces) == answer


def test_select(backend, engine):
    state = pick_city.run(backend=backend, temperature=0)
    assert state["city"] == " Paris"
    # The same decision from the Engine's prompt logprobs (SGLang's token-length-normalised
    # score: mean logprob of the choice's tokens and the two before them).
    prefix = prefix_of(state.text(), " Paris")
    n = engine.generate(prefix, {"max_new_tokens": 0})["meta_info"]["prompt_tokens"]
    scores = {}
    for choice in (" Paris", " London", " Berlin"):
        meta = engine.generate(
            prefix + choice,
            {"max_new_tokens": 0},
            return_logprob=True,
            logprob_start_len=max(n - 2, 0),
        )["meta_info"]
        scores[choice] = meta["normalized_prompt_logprob"]
    assert max(scores, key=scores.get) == " Paris"


def test_fork_and_join(backend, engine):
    state = forked.run(backend=backend, temperature=0)
    text = state.text()
    assert text.endswith("That is all.")
    base = "Here are two facts about the sea.\n"
    for i, fact in enumerate(state["fact"]):
        assert fact == greedy(engine, base + f"Fact {i + 1}:", 10, ["\n"])
