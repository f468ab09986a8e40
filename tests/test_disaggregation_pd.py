"""Prefill/decode disaggregation end to end: a prefill server and a decode server (real
subprocesses, tiny model, fake and Mooncake transfer engines) driven the way SGLang's router
drives them: the same body, with bootstrap fields added, posted to both at once."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from smallm.lang.backends.runtime import free_port

from conftest import TINY_SERVER_FLAGS
from server_process import ServerProcess

GREEDY = {"temperature": 0, "max_new_tokens": 16}


class PDPair:
    """A prefill and a decode server joined by a bootstrap port."""

    def __init__(self, model_dir, backend: str, timeout: float = 30.0):
        self.bootstrap_port = free_port()
        common = [
            *TINY_SERVER_FLAGS,
            "--disaggregation-transfer-backend",
            backend,
            "--disaggregation-timeout",
            str(timeout),
        ]
        self.prefill = ServerProcess(
            model_dir,
            *common,
            "--disaggregation-mode",
            "prefill",
            "--disaggregation-bootstrap-port",
            str(self.bootstrap_port),
        )
        self.decode = ServerProcess(model_dir, *common, "--disaggregation-mode", "decode")

    def __enter__(self) -> PDPair:
        self.prefill.start()
        try:
            self.decode.start()
        except BaseException:
            self.prefill.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.decode.stop()
        self.prefill.stop()

    def bootstrap(self, room: int | None = None) -> dict:
        return {
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": self.bootstrap_port,
            "bootstrap_room": random.getrandbits(63) if room is None else room,
        }

    def generate(self, body: dict) -> tuple[requests.Response, requests.Response]:
        """Post ``body`` + bootstrap fields to both servers concurrently, as the router does."""
        body = {**body, **self.bootstrap()}
        with ThreadPoolExecutor(2) as pool:
            p = pool.submit(post, self.prefill, body)
            d = pool.submit(post, self.decode, body)
            return p.result(), d.result()


def post(server, body, path="/generate"):
    return requests.post(server.url + path, json=body, timeout=120)


def scheduler_stats(server, **expect) -> dict:
    """The server's scheduler gauges once they show ``expect`` (they arrive a few times a
    second), or the last seen."""
    deadline = time.monotonic() + 10
    while True:
        stats = requests.get(server.url + "/server_info", timeout=10).json()["scheduler_stats"]
        if stats and all(stats.get(k) == v for k, v in expect.items()):
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def kv_bytes(info: dict, tokens: int) -> int:
    """layers x 2 x tokens x kv_heads x head_dim x dtype size, from /server_info."""
    return tokens * info["kv_bytes_per_token"]


@pytest.fixture(scope="module")
def pd_fake(tiny_chat_model_dir):
    with PDPair(tiny_chat_model_dir, "fake", timeout=8) as pair:
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
    body = {"input_ids": list(range(3, 60)), "sampling_params": GREEDY, **pd_fake.bootstrap()}
    start = time.monotonic()
    r = post(pd_fake.decode, body)  # only the decode side: no prefill ever computes the room
    # Not the client's fault: a gateway timeout, with the flag named.
    assert r.status_code == 504 and "disaggregation-timeout" in r.text, r.text
    assert r.json()["error"]["code"] == 504
    assert time.monotonic() - start < 30
    after = scheduler_stats(pd_fake.decode, num_running_reqs=0, num_used_tokens=0)
    assert after["num_used_tokens"] == 0 and after["kv_transfers"] == before["kv_transfers"]
    # ... and both servers keep serving.
    _, dec = pd_fake.generate({"input_ids": [9, 8, 7], "sampling_params": GREEDY})
    assert dec.status_code == 200, dec.text


def test_pd_over_mooncake(tiny_chat_model_dir, tiny_server):
    pytest.importorskip("mooncake.engine", reason="mooncake-transfer-engine-non-cuda")
    with PDPair(tiny_chat_model_dir, "mooncake") as pair:
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


def test_sglang_router_pd_mode_drives_the_pair(pd_fake, tiny_server):
    """``sglang-router --pd-disaggregation --prefill URL BOOTSTRAP_PORT --decode URL`` in front:
    it adds the bootstrap fields itself; streaming and not, text and input_ids."""
    pytest.importorskip("sglang_router")
    port = free_port()
    cmd = [
        sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
        "--prefill", pd_fake.prefill.url, str(pd_fake.bootstrap_port),
        "--decode", pd_fake.decode.url, "--host", "127.0.0.1", "--port", str(port),
        "--policy", "round_robin", "--prometheus-port", str(free_port()), "--log-level", "warn",
    ]  # fmt: skip
    router = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the router did not start"
            time.sleep(0.25)
        before = scheduler_stats(pd_fake.decode)["kv_transfers"]
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
        stats = scheduler_stats(pd_fake.decode, kv_transfers=before + 4, num_running_reqs=0)
        assert stats["kv_transfers"] == before + 4 and stats["prefill_tokens"] == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(router.pid, signal.SIGKILL)  # its server outlives a SIGTERM (FACTS.md)
        router.wait()
