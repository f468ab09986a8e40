"""Data-parallel replicas in one server (``--dp-size``): the coordinator's placement rules, and
real servers with two scheduler processes on the tiny model (exact float32 path, so greedy
output does not depend on batching)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest
import requests

from smallm.runtime.server.coordinator import (
    BALANCE_ABS,
    ROUTING_PAGE_TOKENS,
    DataParallelCoordinator,
    PlacementError,
    page_hashes,
)

from conftest import EXACT_FLAGS, TINY_SERVER_FLAGS
from server_process import ServerProcess

# ---- the coordinator ---------------------------------------------------------------------


def _prompt(seed: int, n: int = 64) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def test_page_hashes_identify_whole_prefixes():
    a = _prompt(1, 40)
    b = [*a[:32], 9, 9, 9, 9, 9, 9, 9, 9]
    ha, hb = page_hashes(a), page_hashes(b)
    assert len(ha) == 40 // ROUTING_PAGE_TOKENS == 2
    assert ha == hb  # the differing tail is not a full page
    c = [1, *a[1:]]
    assert page_hashes(c)[1] != ha[1]  # page 2's hash covers page 1 too
    assert page_hashes(a[:15]) == []


def test_round_robin_takes_turns_and_skips_dead_replicas():
    c = DataParallelCoordinator(3, "round_robin")
    assert [c.place(_prompt(i)) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    c.mark_dead(1)
    assert [c.place(_prompt(i)) for i in range(4)] == [0, 2, 0, 2]
    assert c.live_ranks == [0, 2]


def test_shortest_queue_follows_unfinished_requests():
    c = DataParallelCoordinator(2, "shortest_queue")
    assert c.place(_prompt(1)) == 0
    assert c.place(_prompt(2)) == 1
    assert c.place(_prompt(3)) == 0
    c.finished(1)
    c.finished(0)
    c.finished(0)
    assert c.place(_prompt(4)) == 0  # both idle again: the lowest rank


def test_cache_aware_keeps_a_prefix_on_its_replica_until_it_is_overloaded():
    c = DataParallelCoordinator(2, "cache_aware", capacity_tokens=10_000)
    a, b = _prompt(1, 256), _prompt(2, 256)
    ra = c.place([*a, 1, 2, 3])
    rb = c.place([*b, 4])
    assert ra != rb  # an unseen prefix goes to the replica that holds less
    for i in range(BALANCE_ABS):  # requests that stay running on a's replica
        assert c.place([*a, i]) == ra
    # Busier by more than BALANCE_ABS and BALANCE_REL times the other: the hit is given up.
    assert c.place([*a, 99]) == ra
    assert c.place([*a, 100]) == rb
    for _ in range(BALANCE_ABS + 3):
        c.finished(ra)
    assert c.place([*a, 101]) == ra


def test_cache_aware_learns_finished_outputs_and_forgets_on_flush():
    c = DataParallelCoordinator(2, "cache_aware", capacity_tokens=10_000)
    prompt = _prompt(5, 48)
    r = c.place(prompt)
    c.finished(r, prompt + _prompt(6, 40))  # the answer is cached there too
    other = c.place(_prompt(7, 48))
    assert other != r
    c.finished(other)
    # A follow-up turn that extends prompt + answer goes back to r.
    assert c.place(prompt + _prompt(6, 40) + [1] * 20) == r
    c.clear_cache()
    assert c.replicas[r].pages == {}


def test_cache_aware_index_is_bounded_by_the_replica_capacity():
    c = DataParallelCoordinator(1, "cache_aware", capacity_tokens=4 * ROUTING_PAGE_TOKENS)
    c.place(_prompt(1, 10 * ROUTING_PAGE_TOKENS))
    assert len(c.replicas[0].pages) == 4


def test_explicit_rank_wins_and_bad_ranks_are_refused():
    c = DataParallelCoordinator(2, "cache_aware", capacity_tokens=10_000)
    p = _prompt(3, 64)
    assert c.place(p) == 0
    assert c.place(p, rank=1) == 1
    with pytest.raises(PlacementError, match=r"\[0, 2\)"):
        c.place(p, rank=2)
    c.mark_dead(1)
    with pytest.raises(PlacementError, match="not alive"):
        c.place(p, rank=1)
    c.mark_dead(0)
    with pytest.raises(PlacementError, match="no data-parallel replica"):
        c.place(p)


# ---- real servers ------------------------------------------------------------------------

DP_FLAGS = (*TINY_SERVER_FLAGS, *EXACT_FLAGS)
GREEDY = {"temperature": 0, "max_new_tokens": 12}
LONG = {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}


def _generate(url: str, text: str, params: dict = GREEDY, **extra) -> dict:
    r = requests.post(
        url + "/generate", json={"text": text, "sampling_params": params, **extra}, timeout=120
    )
    assert r.status_code == 200, r.text
    return r.json()


def _info(url: str) -> dict:
    return requests.get(url + "/get_server_info", timeout=10).json()


def _wait_gone(pids, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def rr_server(tiny_chat_model_dir):
    s = ServerProcess(
        tiny_chat_model_dir, *DP_FLAGS, "--dp-size", "2", "--load-balance-method", "round_robin"
    ).start()
    yield s
    s.stop()


PROMPTS = [f"Request {i}: tell me about {w}." for i, w in enumerate("abcdefgh")]


def test_two_replicas_answer_like_one_and_round_robin_uses_both(tiny_chat_model_dir, rr_server):
    info = _info(rr_server.url)
    assert info["dp_size"] == 2 and info["load_balance_method"] == "round_robin"
    assert set(info["worker_pids"]) == {"scheduler-0", "scheduler-1", "detokenizer"}
    two = [_generate(rr_server.url, p)["text"] for p in PROMPTS]
    with ServerProcess(tiny_chat_model_dir, *DP_FLAGS) as one_server:
        one = [_generate(one_server.url, p)["text"] for p in PROMPTS]
    assert two == one
    placed = [r["num_placed_reqs"] for r in _info(rr_server.url)["replicas"]]
    assert placed[0] >= 4 and placed[1] >= 4, placed
    # What routers read: one /get_load entry and one series of each gauge per replica.
    load = requests.get(rr_server.url + "/get_load", timeout=10).json()
    assert [e["dp_rank"] for e in load] == [0, 1]
    metrics = requests.get(rr_server.url + "/metrics", timeout=10).text
    for rank in (0, 1):
        assert re.search(rf'sglang:num_running_reqs\{{[^}}]*dp_rank="{rank}"', metrics)
    # n > 1 samples of one call may span replicas and still come back complete.
    out = _generate(rr_server.url, "Hello", {**GREEDY, "n": 3})
    assert len(out) == 3 and len({o["text"] for o in out}) == 1


def test_flush_and_abort_reach_every_replica(rr_server):
    url = rr_server.url
    prompt = "Cache me on both replicas, please. " * 8
    _generate(url, prompt)
    _generate(url, prompt)  # round robin: one copy on each replica
    hits = [_generate(url, prompt)["meta_info"]["cached_tokens"] for _ in range(2)]
    assert min(hits) > 0
    assert requests.post(url + "/flush_cache", timeout=30).status_code == 200
    after = [_generate(url, prompt)["meta_info"]["cached_tokens"] for _ in range(2)]
    assert after == [0, 0]

    results: list[dict] = []

    def run(i: int) -> None:
        results.append(_generate(url, f"Long request {i}", LONG))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        loads = [r["num_unfinished_reqs"] for r in _info(url)["replicas"]]
        if loads == [1, 1]:
            break
        time.sleep(0.05)
    assert loads == [1, 1]
    r = requests.post(url + "/abort_request", json={"abort_all": True}, timeout=10)
    assert r.status_code == 200
    for t in threads:
        t.join(60)
    assert [o["meta_info"]["finish_reason"]["type"] for o in results] == ["abort", "abort"]


def test_cache_aware_sends_a_repeated_prefix_to_one_replica(tiny_chat_model_dir):
    prefixes = [f"Document {k}: " + " ".join(f"w{k}x{i}" for i in range(55)) for k in range(2)]
    with ServerProcess(
        tiny_chat_model_dir, *DP_FLAGS, "--dp-size", "2", "--load-balance-method", "cache_aware"
    ) as s:
        assert _info(s.url)["load_balance_method"] == "cache_aware"
        prompt_tokens = cached = 0
        for i in range(12):
            for p in prefixes:
                meta = _generate(s.url, f"{p} Question {i}?", {**GREEDY, "max_new_tokens": 2})[
                    "meta_info"
                ]
                if i > 0:
                    prompt_tokens += meta["prompt_tokens"]
                    cached += meta["cached_tokens"]
        assert cached / prompt_tokens > 0.9
        replicas = _info(s.url)["replicas"]
        # Each prefix stayed on one replica, and the two prefixes went to different ones.
        assert [r["num_placed_reqs"] for r in replicas] == [12, 12]
        for r in replicas:
            assert r["scheduler_stats"]["cache_hit_rate"] > 0.85


def _start_long_requests(url: str, n: int) -> tuple[list, list[threading.Thread]]:
    results: list = [None] * n

    def run(i: int) -> None:
        results[i] = requests.post(
            url + "/generate",
            json={"text": f"Long {i}", "sampling_params": LONG},
            timeout=120,
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if [r["num_unfinished_reqs"] for r in _info(url)["replicas"]] == [1] * n:
            break
        time.sleep(0.05)
    return results, threads


def test_a_dead_replica_fails_its_requests_and_the_others_serve_on(tiny_chat_model_dir):
    s = ServerProcess(
        tiny_chat_model_dir,
        *DP_FLAGS,
        "--dp-size", "2",
        "--load-balance-method", "round_robin",
        "--dp-tolerate-failure",
    ).start()  # fmt: skip
    try:
        pids = _info(s.url)["worker_pids"]
        results, threads = _start_long_requests(s.url, 2)
        os.kill(pids["scheduler-1"], signal.SIGKILL)
        for t in threads:
            t.join(60)
        codes = sorted(r.status_code for r in results)
        assert codes == [200, 503], [r.text for r in results]
        failed = next(r for r in results if r.status_code == 503)
        assert "scheduler-1" in failed.json()["error"]["message"]
        for i in range(4):  # everything goes to the live replica now
            _generate(s.url, f"after {i}")
        assert s.get_status("/health") == 200
        replicas = _info(s.url)["replicas"]
        assert [r["alive"] for r in replicas] == [True, False]
        bad = requests.post(
            s.url + "/generate",
            json={"text": "x", "sampling_params": GREEDY, "data_parallel_rank": 1},
            timeout=10,
        )
        assert bad.status_code == 400 and "not alive" in bad.json()["error"]["message"]
        assert s.stop() == 0  # the drain waits only for the live replica
        assert _wait_gone(pids.values())
    finally:
        s.stop(signal.SIGKILL)


def test_a_dead_replica_stops_the_server_without_tolerance(tiny_chat_model_dir):
    s = ServerProcess(tiny_chat_model_dir, *DP_FLAGS, "--dp-size", "2").start()
    try:
        pids = _info(s.url)["worker_pids"]
        os.kill(pids["scheduler-0"], signal.SIGKILL)
        assert s.proc.wait(30) == 1
        assert _wait_gone(pids.values())
    finally:
        s.stop(signal.SIGKILL)
