"""Prefill/decode disaggregation end to end: a prefill server and a decode server (real
subprocesses, tiny model, fake and Mooncake transfer engines) driven the way SGLang's router
drives them: the same body, with bootstrap fields added, posted to both at once."""

from __future__ import annotations

import json
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import TINY_SERVER_FLAGS
from pd_pair import PDPair, pd_router, post, scheduler_stats

GREEDY = {"temperature": 0, "max_new_tokens": 16}


def tiny_pair(
    model_dir,
    backend: str,
    timeout: float = 30.0,
    prefill_flags: tuple[str, ...] = (),
    decode_flags: tuple[str, ...] = (),
) -> PDPair:
    """A pair on the tiny model."""
    flags = ["--model-path", str(model_dir), *TINY_SERVER_FLAGS]
    return PDPair(flags, backend, timeout, prefill_flags, decode_flags)


def kv_bytes(info: dict, tokens: int) -> int:
    """layers x 2 x tokens x kv_heads x head_dim x dtype size, from /server_info."""
    return tokens * info["kv_bytes_per_token"]


@pytest.fixture(scope="module")
def pd_fake(tiny_chat_model_dir):
    with tiny_pair(tiny_chat_model_dir, "fake", 8) as pair:
        yield pair


def prompts(tokenizer_len: int = 200) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, tokenizer_len) for _ in range(n)] for n in (1, 7, 100, 300)]


def test_greedy_pd_is_token_identical_to_one_server(pd_fake, tiny_server):
    sent_tokens = 0
    for ids in prompts():
        body = {"input_ids": ids, "sampling_params": GREEDY}
        plain = post(tiny_server, body)
        assert plain.status_code == 200, plain.text
        pre, dec = pd_fake.generate(body)
        assert pre.status_code == 200, pre.text + pd_fake.prefill.log_text()
        assert dec.status_code == 200, dec.text + pd_fake.decode.log_text()
        want = plain.json()["output_ids"]
        assert dec.json()["output_ids"] == want, len(ids)
        assert dec.json()["text"] == plain.json()["text"]
        assert pre.json()["output_ids"] == want[:1]
        assert dec.json()["meta_info"]["completion_tokens"] == len(want)
        sent_tokens += len(ids)
    # The decode server computed no prompt token: every prompt's KV came from the prefill side.
    d = scheduler_stats(pd_fake.decode, kv_transfers=4, num_running_reqs=0)
    assert d["prefill_tokens"] == 0
    assert d["kv_transfers"] == 4
    assert d["num_used_tokens"] == 0  # all its KV is free or evictable cache again
    p = scheduler_stats(pd_fake.prefill, kv_transfers=4)
    info = requests.get(pd_fake.prefill.url + "/server_info", timeout=10).json()
    assert info["disaggregation_mode"] == "prefill"
    assert p["prefill_tokens"] >= sent_tokens - 4  # radix hits may skip a few
    assert p["kv_transfer_bytes"] == kv_bytes(info, sent_tokens)


def test_logprob_of_the_first_token_crosses_over(pd_fake, tiny_server):
    body = {"input_ids": prompts()[2], "sampling_params": GREEDY, "return_logprob": True}
    plain = post(tiny_server, body).json()
    _, dec = pd_fake.generate(body)
    got = dec.json()["meta_info"]["output_token_logprobs"]
    want = plain["meta_info"]["output_token_logprobs"]
    assert [t[1] for t in got] == [t[1] for t in want]
    assert got[0][0] == pytest.approx(want[0][0], abs=1e-4)


def test_decode_request_without_bootstrap_fields_fails_clearly(pd_fake):
    r = post(pd_fake.decode, {"input_ids": [5, 6, 7], "sampling_params": GREEDY})
    assert r.status_code == 400  # the client's request is incomplete
    assert "bootstrap_room" in r.text


def test_a_room_the_prefill_side_never_gets_times_out_and_frees_slots(pd_fake):
    before = scheduler_stats(pd_fake.decode)
    room = pd_fake.bootstrap()
    body = {"input_ids": list(range(3, 60)), "sampling_params": GREEDY, **room}
    start = time.monotonic()
    r = post(pd_fake.decode, body)  # only the decode side: no prefill ever computes the room
    # Not the client's fault: a gateway timeout, with the flag named.
    assert r.status_code == 504 and "disaggregation-timeout" in r.text, r.text
    assert r.json()["error"]["code"] == 504
    assert time.monotonic() - start < 30
    # Its slots were quarantined until the prefill side acknowledged the cancel, then freed.
    after = scheduler_stats(
        pd_fake.decode, num_running_reqs=0, num_used_tokens=0, kv_quarantined_tokens=0
    )
    assert after["num_used_tokens"] == 0 and after["kv_quarantined_tokens"] == 0
    assert after["kv_transfers"] == before["kv_transfers"]
    assert after["kv_transfer_failures"] == before["kv_transfer_failures"] + 1
    # The prefill request for that room arriving late computes, answers, and writes nothing
    # into the decode side's memory (which may belong to another request by now).
    p_before = scheduler_stats(pd_fake.prefill)
    late = post(pd_fake.prefill, body)
    assert late.status_code == 200, late.text
    p_after = scheduler_stats(pd_fake.prefill, num_used_tokens=0, pd_transfer_queue_reqs=0)
    assert p_after["kv_transfers"] == p_before["kv_transfers"]
    assert p_after["num_used_tokens"] == 0 and p_after["pd_transfer_queue_reqs"] == 0
    # ... and both servers keep serving.
    _, dec = pd_fake.generate({"input_ids": [9, 8, 7], "sampling_params": GREEDY})
    assert dec.status_code == 200, dec.text


def test_a_room_whose_prompts_differ_fails_fast_and_frees_both_sides(pd_fake):
    """The same room with different prompts (a client reusing rooms by hand): the prefill side
    refuses to send the wrong KV and writes FAILED; the decode side answers 503 long before
    its timeout; no memory stays held on either side."""
    d_before = scheduler_stats(pd_fake.decode)
    p_before = scheduler_stats(pd_fake.prefill)
    for other in ([5, *range(4, 40)], list(range(4, 40))):  # same length, then shorter
        room = pd_fake.bootstrap()
        ids = list(range(3, 40))
        with ThreadPoolExecutor(2) as pool:
            pre = pool.submit(
                post, pd_fake.prefill, {"input_ids": other, "sampling_params": GREEDY, **room}
            )
            start = time.monotonic()
            dec = pool.submit(
                post, pd_fake.decode, {"input_ids": ids, "sampling_params": GREEDY, **room}
            ).result()
            elapsed = time.monotonic() - start
            assert pre.result().status_code == 200
        assert dec.status_code == 503, dec.text
        assert "got a different prompt for this bootstrap_room" in dec.text
        assert elapsed < 6, elapsed  # the record said FAILED; the timeout is 8 s
    # Streaming: the stream carries the error event (status and message), then ends.
    room = pd_fake.bootstrap()
    with ThreadPoolExecutor(2) as pool:
        pre = pool.submit(
            post, pd_fake.prefill, {"input_ids": [7, 8, 9], "sampling_params": GREEDY, **room}
        )
        body = {"input_ids": [7, 8, 10], "sampling_params": GREEDY, "stream": True, **room}
        streamed = requests.post(pd_fake.decode.url + "/generate", json=body, stream=True)
        last = last_stream_event(streamed)
        assert pre.result().status_code == 200
    assert last["error"]["code"] == 503 and "different prompt" in last["error"]["message"]
    d = scheduler_stats(pd_fake.decode, num_used_tokens=0, num_running_reqs=0)
    assert d["num_used_tokens"] == 0 and d["kv_quarantined_tokens"] == 0
    assert d["kv_transfer_failures"] == d_before["kv_transfer_failures"] + 3
    assert d["kv_transfers"] == d_before["kv_transfers"]
    p = scheduler_stats(pd_fake.prefill, num_used_tokens=0, pd_transfer_queue_reqs=0)
    assert p["num_used_tokens"] == 0 and p["pd_transfer_queue_reqs"] == 0
    assert p["kv_transfers"] == p_before["kv_transfers"]


def test_a_room_the_prefill_side_refuses_fails_fast_with_the_reason(pd_fake):
    room = pd_fake.bootstrap()
    ids = list(range(3, 30))
    with ThreadPoolExecutor(2) as pool:
        bad = {"input_ids": ids, "sampling_params": {**GREEDY, "regex": "(unclosed"}, **room}
        pre = pool.submit(post, pd_fake.prefill, bad)
        start = time.monotonic()
        dec = post(pd_fake.decode, {"input_ids": ids, "sampling_params": GREEDY, **room})
        elapsed = time.monotonic() - start
        assert pre.result().status_code == 400
    assert dec.status_code == 503 and "refused or aborted" in dec.text, dec.text
    assert elapsed < 6, elapsed  # the FAILED record, not the 8 s timeout
    d = scheduler_stats(pd_fake.decode, num_used_tokens=0, num_running_reqs=0)
    assert d["num_used_tokens"] == 0 and d["kv_quarantined_tokens"] == 0


def test_aborting_a_waiting_decode_request_frees_its_reservation(pd_fake):
    rid = f"abort-me-{random.getrandbits(32)}"
    body = {"input_ids": list(range(3, 50)), "sampling_params": GREEDY, "rid": rid}
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, pd_fake.decode, {**body, **pd_fake.bootstrap()})
        deadline = time.monotonic() + 10
        while scheduler_stats(pd_fake.decode).get("pd_transfer_queue_reqs", 0) == 0:
            assert time.monotonic() < deadline, "the request never reached the transfer queue"
            time.sleep(0.1)
        aborted = requests.post(pd_fake.decode.url + "/abort_request", json={"rid": rid})
        assert aborted.status_code == 200, aborted.text
        r = waiting.result()
    # As on a plain server (and SGLang): the aborted request ends with finish_reason abort.
    assert r.json()["meta_info"]["finish_reason"]["type"] == "abort", r.text
    d = scheduler_stats(pd_fake.decode, num_used_tokens=0, kv_quarantined_tokens=0)
    assert d["num_used_tokens"] == 0 and d["kv_quarantined_tokens"] == 0
    assert d["pd_transfer_queue_reqs"] == 0 and d["pd_prealloc_queue_reqs"] == 0


def test_n_samples_and_batches_get_a_room_each(pd_fake, tiny_server):
    """One room for an n > 1 request (what the router sends): both servers expand it into the
    same per-sample rooms, so every sample's KV reaches its own decode request."""
    start = scheduler_stats(pd_fake.decode)
    before, computed = start["kv_transfers"], start["prefill_tokens"]  # (jump-forward extends)
    ids = prompts()[2]
    body = {"input_ids": ids, "sampling_params": {**GREEDY, "n": 3}}
    want = post(tiny_server, {"input_ids": ids, "sampling_params": GREEDY}).json()["output_ids"]
    pre, dec = pd_fake.generate(body)
    assert pre.status_code == 200 and dec.status_code == 200, dec.text
    samples = dec.json()
    assert len(samples) == 3 and all(s["output_ids"] == want for s in samples)
    # A batch: one room per prompt, as the router sends for a list of prompts.
    batch = prompts()[:3]
    wants = [
        post(tiny_server, {"input_ids": x, "sampling_params": GREEDY}).json()["output_ids"]
        for x in batch
    ]
    rooms = [pd_fake.bootstrap() for _ in batch]
    body = {
        "input_ids": batch,
        "sampling_params": GREEDY,
        "bootstrap_host": [r["bootstrap_host"] for r in rooms],
        "bootstrap_port": [r["bootstrap_port"] for r in rooms],
        "bootstrap_room": [r["bootstrap_room"] for r in rooms],
    }
    with ThreadPoolExecutor(2) as pool:
        p = pool.submit(post, pd_fake.prefill, body)
        d = pool.submit(post, pd_fake.decode, body)
        assert p.result().status_code == 200
        got = d.result()
    assert got.status_code == 200, got.text
    assert [x["output_ids"] for x in got.json()] == wants
    stats = scheduler_stats(pd_fake.decode, kv_transfers=before + 6, num_used_tokens=0)
    assert stats["kv_transfers"] == before + 6 and stats["prefill_tokens"] == computed


def test_constrained_requests_decode_under_their_grammar(pd_fake, tiny_server):
    """JSON schema and regex: the prefill side samples the first token under the constraint,
    the decode side's grammar (compiled meanwhile) takes it and goes on, jump-forward
    included; output as from one plain server, and valid."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    cases = [
        {"json_schema": json.dumps(schema), "max_new_tokens": 48},
        {"regex": r"(yes|no), [0-9]{3}", "max_new_tokens": 16},
    ]
    for extra in cases:
        body = {"text": "Answer:", "sampling_params": {**GREEDY, **extra}}
        want = post(tiny_server, body).json()
        pre, dec = pd_fake.generate(body)
        assert pre.status_code == 200, pre.text
        assert dec.status_code == 200, dec.text
        assert dec.json()["output_ids"] == want["output_ids"]
        assert dec.json()["text"] == want["text"]
        if "json_schema" in extra:
            jsonschema.validate(json.loads(dec.json()["text"]), schema)
    # A grammar that does not compile is the client's error, on the decode side too.
    bad = {"input_ids": [5, 6], "sampling_params": {**GREEDY, "regex": "(unclosed"}}
    _, dec = pd_fake.generate(bad)
    assert dec.status_code == 400 and "regex" in dec.text, dec.text
    d = scheduler_stats(pd_fake.decode, num_used_tokens=0, num_grammar_queue_reqs=0)
    assert d["num_used_tokens"] == 0 and d["num_grammar_queue_reqs"] == 0


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the series ``name{labels...}`` on a /metrics page (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        body, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in body for k, v in labels.items()):
            return float(value)
    return 0.0


def test_metrics_count_bytes_time_and_outcomes_per_mode(pd_fake):
    _, dec = pd_fake.generate({"input_ids": prompts()[3], "sampling_params": GREEDY})
    assert dec.status_code == 200
    for server, mode in ((pd_fake.prefill, "prefill"), (pd_fake.decode, "decode")):
        stats = scheduler_stats(server, num_running_reqs=0)
        time.sleep(0.6)  # the front end applies each report as it arrives
        text = requests.get(server.url + "/metrics", timeout=10).text
        labels = {"engine_type": mode}
        assert metric(text, "sglang:num_running_reqs", **labels) == 0  # labelled by mode
        assert (
            metric(text, "smallm:kv_transfer_bytes_total", **labels) == stats["kv_transfer_bytes"]
        )
        ok = metric(text, "smallm:disaggregation_requests_total", outcome="ok", **labels)
        assert ok == stats["kv_transfers"] > 0
        failed = metric(
            text, "smallm:disaggregation_requests_total", outcome="transfer_failed", **labels
        )
        assert failed == stats["kv_transfer_failures"]
        assert metric(text, "sglang:num_transfer_failed_reqs_total") == failed
        assert metric(text, "smallm:kv_transfer_seconds_count", **labels) == ok
        assert metric(text, "smallm:kv_transfer_seconds_sum", **labels) == pytest.approx(
            stats["kv_transfer_seconds"], rel=1e-6, abs=1e-9
        )
        assert metric(text, "sglang:kv_transfer_latency_ms", **labels) > 0
    info = requests.get(pd_fake.decode.url + "/server_info", timeout=10).json()
    assert info["disaggregation_mode"] == "decode"


def test_a_prefill_server_that_dies_fails_its_rooms_fast_and_the_decode_side_recovers(
    tiny_chat_model_dir,
):
    """SIGKILL the prefill server while rooms wait on it: each decode request ends (200 if its
    KV had arrived, else 503 naming the prefill server) well before the 30 s timeout, the
    decode side frees every slot, and once a prefill server is back on the same bootstrap
    port, requests succeed again (the stale rank address is forgotten)."""
    with tiny_pair(tiny_chat_model_dir, "fake", 30) as pair:
        bodies = []
        for i in range(6):
            ids = [3 + i, *range(10, 400)]  # distinct prompts: no radix hits
            sp = {**GREEDY, "max_new_tokens": 32}
            bodies.append({"input_ids": ids, "sampling_params": sp, **pair.bootstrap()})
        with ThreadPoolExecutor(12) as pool:
            decodes = [pool.submit(post, pair.decode, b) for b in bodies]
            # Half the rooms reach the prefill side too; the other half are in flight (their
            # transfer requests sent, their prompts never computed) when it dies.
            prefills = [pool.submit(post, pair.prefill, b) for b in bodies[:3]]
            for f in prefills:
                assert f.result().status_code == 200
            deadline = time.monotonic() + 10
            while scheduler_stats(pair.decode)["pd_transfer_queue_reqs"] < 3:
                assert time.monotonic() < deadline, "the rooms never reached the transfer queue"
                time.sleep(0.1)
            pair.prefill.stop(signal.SIGKILL)
            start = time.monotonic()
            results = [d.result() for d in decodes]
            elapsed = time.monotonic() - start
        codes = [r.status_code for r in results]
        assert codes[3:] == [503] * 3, [r.text for r in results]
        assert all("is gone" in r.text for r in results[3:])
        assert set(codes[:3]) <= {200, 503}
        assert elapsed < 10, elapsed  # the heartbeat found it, not the 30 s timeout
        d = scheduler_stats(pair.decode, num_running_reqs=0, num_used_tokens=0)
        assert d["num_used_tokens"] == 0 and d["kv_quarantined_tokens"] == 0
        assert d["pd_transfer_queue_reqs"] == 0 and d["pd_prealloc_queue_reqs"] == 0
        pair.prefill.start()
        _, dec = pair.generate({"input_ids": [5, 6, 7, 8], "sampling_params": GREEDY})
        assert dec.status_code == 200, dec.text + pair.decode.log_text()[-3000:]


def test_two_prefill_replicas_and_two_decode_replicas(tiny_chat_model_dir, tiny_server):
    """``--dp-size 2`` on both sides: the prefill front end sends room R to replica R % 2,
    each replica registers as that data-parallel group, and the decode side's replicas find
    it there; output as from one plain server, every replica did its part."""
    dp2 = ("--dp-size", "2")
    with tiny_pair(tiny_chat_model_dir, "fake", 30, dp2, dp2) as pair:
        for k, ids in enumerate(prompts() * 2):
            body = {"input_ids": ids, "sampling_params": GREEDY}
            want = post(tiny_server, body).json()["output_ids"]
            room = pair.bootstrap(room=random.getrandbits(62) * 2 + k % 2)  # both parities
            with ThreadPoolExecutor(2) as pool:
                p = pool.submit(post, pair.prefill, {**body, **room})
                d = pool.submit(post, pair.decode, {**body, **room})
                assert p.result().status_code == 200
                dec = d.result()
            assert dec.status_code == 200, dec.text + pair.decode.log_text()[-2000:]
            assert dec.json()["output_ids"] == want
        info = requests.get(pair.prefill.url + "/server_info", timeout=10).json()
        deadline = time.monotonic() + 10
        while True:
            per_replica = [r["scheduler_stats"] or {} for r in info["replicas"]]
            if [s.get("kv_transfers") for s in per_replica] == [4, 4]:
                break
            assert time.monotonic() < deadline, per_replica
            time.sleep(0.3)
            info = requests.get(pair.prefill.url + "/server_info", timeout=10).json()
        d = scheduler_stats(pair.decode, kv_transfers=8, num_running_reqs=0)
        assert d["kv_transfers"] == 8 and d["prefill_tokens"] == 0


def test_pd_over_mooncake(tiny_chat_model_dir, tiny_server):
    pytest.importorskip("mooncake.engine", reason="mooncake-transfer-engine-non-cuda")
    with tiny_pair(tiny_chat_model_dir, "mooncake") as pair:
        for ids in prompts()[1:3]:
            body = {"input_ids": ids, "sampling_params": GREEDY}
            want = post(tiny_server, body).json()["output_ids"]
            _, dec = pair.generate(body)
            assert dec.status_code == 200, dec.text
            assert dec.json()["output_ids"] == want
        assert scheduler_stats(pair.decode, kv_transfers=2)["prefill_tokens"] == 0


def last_stream_event(resp: requests.Response) -> dict:
    events = [
        json.loads(line[len("data: ") :])
        for line in resp.iter_lines(decode_unicode=True)
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    assert events, "no stream events"
    return events[-1]


def tiny_chat(server, body: dict) -> str:
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_sglang_router_pd_mode_drives_the_pair(pd_fake, tiny_server):
    """``sglang-router --pd-disaggregation --prefill URL BOOTSTRAP_PORT --decode URL`` in front:
    it adds the bootstrap fields itself; streaming and not, text and input_ids, native and
    OpenAI routes."""
    pytest.importorskip("sglang_router")
    with pd_router(pd_fake) as url:
        start = scheduler_stats(pd_fake.decode)
        before, computed = start["kv_transfers"], start["prefill_tokens"]
        bodies = [
            {"input_ids": prompts()[2], "sampling_params": GREEDY},
            {"text": "Once upon a time", "sampling_params": GREEDY},
        ]
        for body in bodies:
            want = post(tiny_server, body).json()
            got = requests.post(url + "/generate", json=body, timeout=120)
            assert got.status_code == 200, got.text
            assert got.json()["output_ids"] == want["output_ids"]
            assert got.json()["text"] == want["text"]
            streamed = requests.post(
                url + "/generate", json={**body, "stream": True}, timeout=120, stream=True
            )
            assert streamed.status_code == 200, streamed.text
            last = last_stream_event(streamed)
            assert last["output_ids"] == want["output_ids"]
            assert last["text"] == want["text"]
        # The OpenAI API through the router (it adds the bootstrap fields to those bodies too),
        # with the openai client; n > 1 gets a room per sample.
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        messages = [{"role": "user", "content": "Say something."}]
        chat = {"model": "default", "messages": messages, "temperature": 0, "max_tokens": 12}
        want = tiny_chat(tiny_server, chat)
        got = client.chat.completions.create(**chat)
        assert got.choices[0].message.content == want
        two = client.chat.completions.create(**chat, n=2)
        assert [c.message.content for c in two.choices] == [want, want]
        stream = client.chat.completions.create(**chat, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
        stats = scheduler_stats(pd_fake.decode, kv_transfers=before + 8, num_running_reqs=0)
        assert stats["kv_transfers"] == before + 8 and stats["prefill_tokens"] == computed
        # The router opens with an HTTP/2 preface, then speaks HTTP/1.1: no error logged.
        for server in (pd_fake.prefill, pd_fake.decode):
            assert "PRI/Upgrade" not in server.log_text()
            assert "Error handling request" not in server.log_text()
