"""The SGLang-native HTTP API of a real server subprocess (tiny model), driven over HTTP."""

from __future__ import annotations

import itertools
import json
import re
import time

import pytest
import requests

from smallm.runtime.engine import Engine

GREEDY = {"max_new_tokens": 12, "temperature": 0}
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,"]


@pytest.fixture(scope="module")
def engine(tiny_chat_model_dir):
    with Engine(str(tiny_chat_model_dir), max_total_tokens=8192) as e:
        yield e


def post(server, body, path="/generate", **kw):
    return requests.post(server.url + path, json=body, timeout=60, **kw)


def stream_events(resp) -> list:
    events = []
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric(server, name: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_greedy_over_http_is_token_identical_to_engine(tiny_server, engine):
    single = post(tiny_server, {"text": PROMPTS[0], "sampling_params": GREEDY}).json()
    batch = post(tiny_server, {"text": PROMPTS, "sampling_params": GREEDY}).json()
    ref = engine.generate(PROMPTS, GREEDY)
    assert isinstance(single, dict) and isinstance(batch, list) and len(batch) == 3
    assert single["output_ids"] == ref[0]["output_ids"]
    assert [b["output_ids"] for b in batch] == [r["output_ids"] for r in ref]
    assert [b["text"] for b in batch] == [r["text"] for r in ref]
    ids = engine.tokenizer.encode(PROMPTS[1])
    by_ids = post(tiny_server, {"input_ids": ids, "sampling_params": GREEDY}).json()
    assert by_ids["output_ids"] == ref[1]["output_ids"]
    meta = single["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode(PROMPTS[0]))
    assert meta["completion_tokens"] == 12 and meta["e2e_latency"] > 0


def test_stream_is_cumulative_and_ends_with_done(tiny_server, engine):
    body = {"text": PROMPTS[2], "sampling_params": GREEDY, "stream": True}
    with requests.post(tiny_server.url + "/generate", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = stream_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # cumulative
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert texts[-1] == engine.generate(PROMPTS[2], GREEDY)["text"]


def test_stop_strings_and_n(tiny_server, engine):
    ref = engine.generate(PROMPTS[0], GREEDY)["text"]
    stop = ref[3:6]
    params = {**GREEDY, "stop": [stop]}
    out = post(tiny_server, {"text": PROMPTS[0], "sampling_params": params}).json()
    assert out["text"] == engine.generate(PROMPTS[0], params)["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stop not in out["text"]
    two = post(
        tiny_server,
        {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 6, "n": 2, "seed": 3}},
    ).json()
    assert isinstance(two, list) and len(two) == 2


def test_logprobs_with_start_len(tiny_server, engine):
    body = {
        "text": PROMPTS[1],
        "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": 1,
        "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
    }
    out = post(tiny_server, body).json()["meta_info"]
    ref = engine.generate(
        PROMPTS[1],
        body["sampling_params"],
        return_logprob=True,
        logprob_start_len=1,
        top_logprobs_num=2,
        return_text_in_logprobs=True,
    )["meta_info"]
    n_prompt = out["prompt_tokens"]
    assert len(out["input_token_logprobs"]) == n_prompt - 1
    assert out["input_token_logprobs"][0][0] is None
    assert all(isinstance(e[2], str) for e in out["input_token_logprobs"])
    assert len(out["output_token_logprobs"]) == 4
    assert len(out["output_top_logprobs"]) == 4 and len(out["output_top_logprobs"][0]) == 2
    for got, want in zip(out["output_token_logprobs"], ref["output_token_logprobs"]):
        assert got[1] == want[1] and got[0] == pytest.approx(want[0], abs=1e-4)
    for got, want in zip(out["input_token_logprobs"][1:], ref["input_token_logprobs"][1:]):
        assert got[1] == want[1] and got[0] == pytest.approx(want[0], abs=1e-4)


def test_prefill_only_request(tiny_server):
    out = post(tiny_server, {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 0}}).json()
    assert out["text"] == "" and out["meta_info"]["completion_tokens"] == 0
    assert out["meta_info"]["prompt_tokens"] > 0
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}


def test_info_health_flush_routes(tiny_server, tiny_chat_model_dir):
    info = requests.get(tiny_server.url + "/get_model_info", timeout=10).json()
    assert info["model_path"] == str(tiny_chat_model_dir) and info["is_generation"] is True
    assert requests.get(tiny_server.url + "/model_info", timeout=10).json() == info
    server = requests.get(tiny_server.url + "/get_server_info", timeout=10).json()
    assert server["port"] == tiny_server.port and server["max_total_tokens"] == 8192
    assert requests.get(tiny_server.url + "/server_info", timeout=10).status_code == 200
    assert requests.get(tiny_server.url + "/health", timeout=10).status_code == 200
    assert requests.get(tiny_server.url + "/health_generate", timeout=30).status_code == 200
    assert requests.post(tiny_server.url + "/flush_cache", timeout=30).status_code == 200
    assert requests.get(tiny_server.url + "/nope", timeout=10).status_code == 404
    text = requests.get(tiny_server.url + "/metrics", timeout=10).text
    for name in (
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:num_used_tokens",
        "sglang:cache_hit_rate",
        "sglang:gen_throughput",
        "sglang:num_grammar_queue_reqs",
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:cached_tokens_total",
        "sglang:num_requests_total",
        "sglang:time_to_first_token_seconds",
        "sglang:inter_token_latency_seconds",
        "sglang:e2e_request_latency_seconds",
    ):
        base = name.removesuffix("_total")
        assert f"# TYPE {base}" in text, name
        # A model_name label on each (scheduler gauges carry SGLang's rank labels as well).
        assert re.search(rf'^{name}(_count)?{{[^}}]*\bmodel_name="', text, re.M), name


BAD_INPUTS = [
    ("malformed JSON", b"{bad", 400, "not valid JSON"),
    ("not an object", [1, 2], 400, "JSON object"),
    ("text wrong type", {"text": 5}, 400, "text must be"),
    ("sampling wrong type", {"text": "x", "sampling_params": {"max_new_tokens": "a"}}, 400, "max_new_tokens"),
    ("both text and ids", {"text": "x", "input_ids": [1, 2]}, 400, "exactly one"),
    ("neither", {"sampling_params": {}}, 400, "exactly one"),
    ("empty prompt", {"text": ""}, 400, "empty"),
    ("prompt too long", {"input_ids": [5] * 600}, 400, "context length"),
    ("negative max_new_tokens", {"text": "x", "sampling_params": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
    ("huge max_new_tokens", {"text": "x", "sampling_params": {"max_new_tokens": 10**9}}, 400, "context length"),
    ("temperature < 0", {"text": "x", "sampling_params": {"temperature": -0.5}}, 400, "temperature"),
    ("top_p 0", {"text": "x", "sampling_params": {"top_p": 0}}, 400, "top_p"),
    ("top_p > 1", {"text": "x", "sampling_params": {"top_p": 1.5}}, 400, "top_p"),
    ("token id too big", {"input_ids": [1, 10**6]}, 400, "outside the vocabulary"),
    ("negative token id", {"input_ids": [1, -3]}, 400, "outside the vocabulary"),
    ("stream wrong type", {"text": "x", "stream": "yes"}, 400, "stream"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "body", "status", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_is_answered_and_server_keeps_serving(tiny_server, name, body, status, message):
    if isinstance(body, bytes):
        r = requests.post(tiny_server.url + "/generate", data=body, timeout=30)
    else:
        r = post(tiny_server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["code"] == status
    ok = post(tiny_server, {"text": "still serving", "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2


def test_too_large_body_is_413(tiny_server):
    r = requests.post(
        tiny_server.url + "/generate",
        data=json.dumps({"text": "x" * 1_500_000}),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413 and "max-request-bytes" in r.json()["error"]["message"]
    assert post(tiny_server, {"text": "ok", "sampling_params": {"max_new_tokens": 1}}).ok


def test_abort_request_route(tiny_server):
    assert post(tiny_server, {"rid": "nothing-here"}, "/abort_request").json() == {"aborted": []}
    assert post(tiny_server, {"abort_all": True}, "/abort_request").status_code == 200
    assert post(tiny_server, {"rid": 5}, "/abort_request").status_code == 400


def test_disconnect_mid_stream_frees_kv(tiny_server):
    idle_tokens = _wait_idle(tiny_server)
    finished_before = metric(tiny_server, "sglang:num_requests_total")
    generated_before = metric(tiny_server, "sglang:generation_tokens_total")
    body = {
        "text": "A long story:",
        "sampling_params": {"max_new_tokens": 480, "temperature": 0, "ignore_eos": True},
        "stream": True,
    }
    with requests.post(tiny_server.url + "/generate", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    # The client is gone: the request is aborted long before its 480 tokens, and KV usage
    # returns to what it was before.
    deadline = time.monotonic() + 30
    while metric(tiny_server, "sglang:num_requests_total") == finished_before:
        assert time.monotonic() < deadline, "the abandoned request never finished"
        time.sleep(0.05)
    generated = metric(tiny_server, "sglang:generation_tokens_total") - generated_before
    assert 0 < generated < 480
    assert _wait_idle(tiny_server) == idle_tokens


def _wait_idle(server, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(server, "sglang:num_running_reqs") == 0:
            return metric(server, "sglang:num_used_tokens")
        time.sleep(0.1)
    raise AssertionError("the server did not become idle")


def test_tokenizing_a_big_batch_does_not_stall_other_requests(tiny_server):
    import threading

    # ~0.8 MB of text: about half a second of tokenizing, then a 400 (longer than the context).
    body = {"text": [f"word{i} " * 13000 for i in range(10)], "sampling_params": {}}
    answer = {}

    def big() -> None:
        t0 = time.perf_counter()
        answer["status"] = post(tiny_server, body).status_code
        answer["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=big)
    thread.start()
    slowest = 0.0
    while thread.is_alive():
        t0 = time.perf_counter()
        assert requests.get(tiny_server.url + "/health", timeout=10).status_code == 200
        slowest = max(slowest, time.perf_counter() - t0)
    thread.join()
    assert answer["status"] == 400
    # Tokenizing runs beside the event loop: /health answered quickly all along.
    assert slowest < max(0.25, answer["seconds"] / 2), (slowest, answer)
