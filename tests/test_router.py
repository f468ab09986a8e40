"""smallm workers behind SGLang's real router (sglang-router 0.3.2, a Rust gateway).

One module-wide cluster: ``smallm router --workers 2 --policy round_robin`` starts two tiny-model
servers and a router; two more routers (cache_aware, power_of_two) are started in front of the
same workers. Every policy must list both workers healthy with smallm's metadata, read real
loads (not the -1 it reports for workers without /get_load), give the same greedy output as a
worker asked directly, and keep serving once a worker is killed. Fast checks of the routes and
body fields the router relies on run against worker 0 directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from smallm.lang.backends.runtime import free_port
from smallm.runtime.messages import SchedulerStats
from smallm.runtime.metrics import ServerMetrics
from smallm.runtime.request_builder import GenerateCall, RequestError, build_requests
from smallm.runtime.server.http.router_api import load_entries
from smallm.runtime.server.router import router_command

pytest.importorskip("sglang_router")

POLICIES = ("round_robin", "cache_aware", "power_of_two")
# Short health checks, so a dead worker is noticed within a few seconds.
HEALTH_FLAGS = [
    "--health-check-interval-secs", "1", "--health-check-timeout-secs", "2",
    "--health-failure-threshold", "1", "--log-level", "warn",
]  # fmt: skip
SERVER_FLAGS = ["--max-total-tokens", "8192", "--max-running-requests", "64"]
GREEDY = {"max_new_tokens": 12, "temperature": 0}
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,", "def main():"]
# Exactly the extras sglang-router 0.3.2 added to each body it forwarded (seen on the wire).
ROUTER_GENERATE_EXTRAS = {
    "model": None, "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
    "return_hidden_states": False, "background": False, "no_logs": False,
    "return_bytes": False, "return_entropy": False,
}  # fmt: skip
ROUTER_CHAT_EXTRAS = {
    "logprobs": False, "stream": False, "no_stop_trim": False, "ignore_eos": False,
    "continue_final_message": False, "skip_special_tokens": True, "separate_reasoning": True,
    "stream_reasoning": True, "return_hidden_states": False,
}  # fmt: skip
ROUTER_COMPLETION_EXTRAS = {
    "stream": False, "echo": False, "no_stop_trim": False, "ignore_eos": False,
    "skip_special_tokens": True, "return_hidden_states": False,
}  # fmt: skip


class Cluster:
    """The `smallm router` process, its workers, and one router URL per policy."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.log_path = Path(tempfile.mkstemp(prefix="smallm-router-", suffix=".log")[1])
        self.routers: dict[str, str] = {}
        self.extra_routers: list[subprocess.Popen] = []
        self.worker_urls: list[str] = []
        self.worker_pids: list[int] = []
        self.proc: subprocess.Popen | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def start(self) -> None:
        port = free_port()
        cmd = [
            sys.executable, "-m", "smallm.cli", "router", "--workers", "2",
            "--policy", "round_robin", "--port", str(port),
            f"--router-args={' '.join(HEALTH_FLAGS)}",
            "--model-path", str(self.model_dir), *SERVER_FLAGS,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 300
        while "smallm router ready at" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"smallm router did not start:\n{self.log()}")
            time.sleep(0.25)
        found = re.findall(r"worker (\d) ready at (\S+) \(pid (\d+)\)", self.log())
        self.worker_urls = [url for _, url, _ in sorted(found)]
        self.worker_pids = [int(pid) for _, _, pid in sorted(found)]
        self.routers["round_robin"] = f"http://127.0.0.1:{port}"
        for policy in POLICIES[1:]:
            port = free_port()
            cmd = router_command(self.worker_urls, port, policy, extra=HEALTH_FLAGS)
            self.extra_routers.append(
                subprocess.Popen(
                    cmd,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            self.routers[policy] = f"http://127.0.0.1:{port}"
        for url in self.routers.values():
            wait_for(lambda u=url: healthy_urls(u) == set(self.worker_urls), 60, url)

    def stop(self) -> int | None:
        for p in self.extra_routers:
            kill_group(p)
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(90)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            return None


def kill_group(p: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def workers(router: str) -> list[dict]:
    return requests.get(router + "/workers", timeout=10).json()["workers"]


def healthy_urls(router: str) -> set[str]:
    return {w["url"] for w in workers(router) if w["is_healthy"]}


@pytest.fixture(scope="module")
def cluster(tiny_chat_model_dir):
    c = Cluster(tiny_chat_model_dir)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def generate(url: str, body: dict) -> dict:
    r = requests.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def chat(url: str, content: str, **extra) -> requests.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 12,
            "temperature": 0, **extra}  # fmt: skip
    return requests.post(url + "/v1/chat/completions", json=body, timeout=60)


def direct_outputs(worker: str) -> tuple[list[dict], list[str]]:
    gen = [generate(worker, {"text": p, "sampling_params": GREEDY}) for p in PROMPTS]
    chats = [chat(worker, p).json()["choices"][0]["message"]["content"] for p in PROMPTS]
    return gen, chats


def metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


# ---- through the router, once per policy ----------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_router_lists_both_workers_healthy_with_smallm_metadata(cluster, policy):
    listed = {w["url"]: w for w in workers(cluster.routers[policy])}
    assert set(listed) == set(cluster.worker_urls)
    for w in listed.values():
        assert w["is_healthy"] and w["worker_type"] == "regular"
        assert w["model_id"] == str(cluster.model_dir)
        meta = w["metadata"]
        # From /model_info (config.json) and /server_info: the router labels workers with them.
        assert meta["model_type"] == "llama"
        assert json.loads(meta["architectures"]) == ["LlamaForCausalLM"]
        assert meta["served_model_name"] == str(cluster.model_dir)
        assert meta["model_path"] == str(cluster.model_dir)


@pytest.mark.parametrize("policy", POLICIES)
def test_router_reads_real_loads(cluster, policy):
    router = cluster.routers[policy]
    loads = {
        x["worker"]: x["load"]
        for x in requests.get(router + "/get_loads", timeout=30).json()["workers"]
    }
    assert set(loads) == set(cluster.worker_urls)
    assert all(load >= 0 for load in loads.values()), loads  # -1: the router read no load
    # While long requests run on worker 0 the router sees its KV tokens in use.
    busy = cluster.worker_urls[0]
    stop = threading.Event()

    def traffic() -> None:
        body = {
            "input_ids": [1, 2, 3],
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True},
        }
        while not stop.is_set():
            requests.post(busy + "/generate", json=body, timeout=60)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    seen: list[int] = []
    try:

        def loaded() -> bool:
            got = requests.get(router + "/get_loads", timeout=30).json()["workers"]
            seen.append(next(x["load"] for x in got if x["worker"] == busy))
            return seen[-1] > 0

        wait_for(loaded, 30, f"a positive load for {busy} (seen {seen[-5:]})")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert min(seen) >= 0


@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_output_through_router_equals_direct(cluster, policy):
    router = cluster.routers[policy]
    before = [metric(w, "sglang:num_requests_total") for w in cluster.worker_urls]
    ref_gen, ref_chat = direct_outputs(cluster.worker_urls[0])
    for _ in range(2):  # twice: round robin then sends each prompt to both workers
        for prompt, ref in zip(PROMPTS, ref_gen):
            out = generate(router, {"text": prompt, "sampling_params": GREEDY})
            assert (out["text"], out["output_ids"]) == (ref["text"], ref["output_ids"])
        for prompt, ref in zip(PROMPTS, ref_chat):
            r = chat(router, prompt)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == ref
    served = [
        metric(w, "sglang:num_requests_total") - b for w, b in zip(cluster.worker_urls, before)
    ]
    assert sum(served) == 8 + 16  # 8 direct on worker 0, 16 through the router
    if policy == "round_robin":
        assert served[1] == 8  # half the routed requests


def test_dp_aware_router_sends_a_rank_the_worker_accepts(cluster):
    """With --dp-aware the router registers url@rank per replica (dp_size from /server_info)
    and puts data_parallel_rank in each body."""
    port = free_port()
    cmd = router_command(
        cluster.worker_urls, port, "round_robin", extra=["--dp-aware", *HEALTH_FLAGS]
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    router = f"http://127.0.0.1:{port}"
    try:
        wanted = {f"{u}@0" for u in cluster.worker_urls}
        wait_for(lambda: healthy_urls(router) == wanted, 60, "dp-aware workers")
        ref = generate(cluster.worker_urls[0], {"text": PROMPTS[0], "sampling_params": GREEDY})
        for _ in range(2):
            out = generate(router, {"text": PROMPTS[0], "sampling_params": GREEDY})
            assert out["output_ids"] == ref["output_ids"]
            assert chat(router, PROMPTS[0]).status_code == 200
    finally:
        kill_group(proc)


def test_router_gathers_worker_metrics_and_flushes_their_caches(cluster):
    router = cluster.routers["round_robin"]
    text = requests.get(router + "/engine_metrics", timeout=30).text
    # The router's aggregator spells the names with "_" and adds a worker_addr label.
    gauges = [line for line in text.splitlines() if line.startswith("sglang_cache_config_info{")]
    assert len(gauges) == 2 and all(
        'page_size="1"' in g and 'num_pages="8192"' in g for g in gauges
    )
    assert {re.search(r'worker_addr="([^"]+)"', g).group(1) for g in gauges} == set(
        cluster.worker_urls
    )
    # The router's flush reaches the workers: a prompt cached on worker 0 is no longer.
    worker = cluster.worker_urls[0]
    body = {"text": "A prompt to cache " * 8, "sampling_params": GREEDY}
    generate(worker, body)
    assert generate(worker, body)["meta_info"]["cached_tokens"] > 0
    r = requests.post(router + "/flush_cache", timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["workers_flushed"] == 2, r.json()
    assert generate(worker, body)["meta_info"]["cached_tokens"] == 0


# ---- the worker contract, on worker 0 directly ----------------------------------------------


def test_get_load_server_info_and_model_info(cluster):
    url = cluster.worker_urls[0]
    load = requests.get(url + "/get_load", timeout=10).json()
    assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    info = requests.get(url + "/server_info", timeout=10).json()
    assert set(info) == set(requests.get(url + "/get_server_info", timeout=10).json())
    expected = {"tp_size": 1, "dp_size": 1, "load_balance_method": "cache_aware",
                "disaggregation_mode": "null", "max_prefill_tokens": 512,
                "max_total_tokens": 8192, "max_running_requests": 64}  # fmt: skip
    assert {k: info[k] for k in expected} == expected
    assert isinstance(info["version"], str) and info["model_path"] == str(cluster.model_dir)
    model = requests.get(url + "/model_info", timeout=10).json()
    assert model == requests.get(url + "/get_model_info", timeout=10).json()
    assert model["is_generation"] is True
    assert (model["model_type"], model["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert model["tokenizer_path"] == str(cluster.model_dir)


def test_metrics_carry_sglang_labels_and_cache_config(cluster):
    text = requests.get(cluster.worker_urls[0] + "/metrics", timeout=10).text
    name = str(cluster.model_dir)
    assert (
        f'sglang:cache_config_info{{model_name="{name}",num_pages="8192",page_size="1"}} 1.0'
        in text
    )
    gauge = next(line for line in text.splitlines() if line.startswith("sglang:num_running_reqs{"))
    labels = dict(re.findall(r'(\w+)="([^"]*)"', gauge))
    # SGLang's scheduler labels; dp_rank only when there are several replicas.
    assert labels == {"engine_type": "unified", "model_name": name, "pp_rank": "0", "tp_rank": "0"}
    counter = next(
        line for line in text.splitlines() if line.startswith("sglang:num_requests_total{")
    )
    assert dict(re.findall(r'(\w+)="([^"]*)"', counter)) == {"model_name": name}


@pytest.mark.parametrize(
    "route, body",
    [
        ("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}, **ROUTER_GENERATE_EXTRAS}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, **ROUTER_COMPLETION_EXTRAS}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                  "max_completion_tokens": 2, **ROUTER_CHAT_EXTRAS}),
    ],
)  # fmt: skip
def test_router_body_fields(cluster, route, body):
    url = cluster.worker_urls[0] + route
    r = requests.post(url, json=body, timeout=30)
    assert r.status_code == 200, r.text  # the router's defaults pass
    assert requests.post(url, json={**body, "data_parallel_rank": 0}, timeout=30).status_code == 200
    assert (
        requests.post(url, json={**body, "data_parallel_rank": None}, timeout=30).status_code == 200
    )
    bad = {
        "return_hidden_states": True, "return_bytes": True, "return_entropy": True,
        "background": True, "log_metrics": "yes", "data_parallel_rank": 1,
    }  # fmt: skip
    bad_ranks = [-1, "0", True, 0.5]
    cases = [(k, v) for k, v in bad.items()] + [("data_parallel_rank", v) for v in bad_ranks]
    for field, value in cases:
        r = requests.post(url, json={**body, field: value}, timeout=30)
        assert r.status_code == 400, (field, value, r.text)
        err = r.json()["error"]
        assert err["param"] == field and field in err["message"], err


def test_data_parallel_rank_is_carried_into_the_native_request():
    call = GenerateCall.from_json({"input_ids": [[1, 2], [3]], "data_parallel_rank": 3})
    msgs = build_requests(call, tokenizer=None, vocab_size=10)
    assert [m.data_parallel_rank for m in msgs] == [3, 3]
    assert build_requests(GenerateCall(input_ids=[1]), None, 10)[0].data_parallel_rank is None
    with pytest.raises(RequestError, match="data_parallel_rank"):
        GenerateCall.from_json({"input_ids": [1], "data_parallel_rank": -2})


def _stats(rank: int, running: int, queued: int, used: int, grammar: int = 0) -> SchedulerStats:
    return SchedulerStats(
        num_running_reqs=running, num_queue_reqs=queued, num_used_tokens=used,
        max_total_tokens=1000, cache_hit_rate=0.5, gen_throughput=7.0,
        num_grammar_queue_reqs=grammar, dp_rank=rank,
    )  # fmt: skip


def test_load_entries_one_per_replica():
    assert load_entries({}, 1) == [
        {"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}
    ]
    got = load_entries({1: _stats(1, running=2, queued=3, used=40, grammar=1)}, 2)
    assert got == [
        {"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0},
        {"dp_rank": 1, "num_reqs": 6, "num_waiting_reqs": 4, "num_tokens": 40},
    ]


def test_replica_gauges_get_a_dp_rank_label():
    m = ServerMetrics("m", dp_size=2, page_size=16, num_pages=64)
    m.set_scheduler_stats(_stats(0, running=1, queued=0, used=100))
    m.set_scheduler_stats(_stats(1, running=4, queued=2, used=300))
    text = m.render().decode()
    base = 'engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"'
    assert f'sglang:num_running_reqs{{dp_rank="0",{base}}} 1.0' in text
    assert f'sglang:num_running_reqs{{dp_rank="1",{base}}} 4.0' in text
    assert f'sglang:num_queue_reqs{{dp_rank="1",{base}}} 2.0' in text
    assert f'sglang:token_usage{{dp_rank="1",{base}}} 0.3' in text
    assert 'sglang:cache_config_info{model_name="m",num_pages="64",page_size="16"} 1.0' in text


def test_missing_router_package_gives_the_install_command(tmp_path):
    code = (
        "import sys; sys.modules['sglang_router'] = None\n"
        "from smallm.cli import main\n"
        "sys.exit(main(['router', '--workers', '1']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "pip install 'smallm[router]'" in r.stderr and "not installed" in r.stderr


# ---- last: a worker dies ---------------------------------------------------------------------


def test_killed_worker_is_dropped_and_requests_keep_succeeding(cluster):
    survivor, victim = cluster.worker_urls
    ref = generate(survivor, {"text": PROMPTS[1], "sampling_params": GREEDY})
    os.killpg(cluster.worker_pids[1], signal.SIGKILL)
    for policy, router in cluster.routers.items():
        wait_for(lambda r=router: healthy_urls(r) == {survivor}, 30, f"{policy} to drop {victim}")
        for _ in range(4):
            out = generate(router, {"text": PROMPTS[1], "sampling_params": GREEDY})
            assert out["output_ids"] == ref["output_ids"], policy
            assert chat(router, PROMPTS[1]).status_code == 200, policy


def test_smallm_router_stops_cleanly_on_sigterm(cluster):
    survivor = cluster.worker_urls[0]
    assert cluster.stop() == 0, cluster.log()
    with pytest.raises(requests.ConnectionError):
        requests.get(survivor + "/health", timeout=5)
    with pytest.raises(requests.ConnectionError):
        requests.get(cluster.routers["round_robin"] + "/health", timeout=5)
