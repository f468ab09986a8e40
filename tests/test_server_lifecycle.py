"""Server lifecycle on real subprocesses: API keys, SIGTERM draining, a dying worker."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from conftest import TINY_SERVER_FLAGS
from server_process import ServerProcess

LONG = {"max_new_tokens": 300, "temperature": 0, "ignore_eos": True}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited as far as we care.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_api_key_guards_every_route_but_health(tiny_chat_model_dir):
    with ServerProcess(tiny_chat_model_dir, *TINY_SERVER_FLAGS, "--api-key", "sekret") as s:
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 1}}
        assert requests.get(s.url + "/health", timeout=10).status_code == 200
        for method, path in [
            ("post", "/generate"),
            ("get", "/get_model_info"),
            ("get", "/v1/models"),
            ("get", "/metrics"),
        ]:
            r = getattr(requests, method)(s.url + path, json=body, timeout=10)
            assert r.status_code == 401, path
            assert "API key" in r.json()["error"]["message"]
        bad = {"Authorization": "Bearer wrong"}
        assert (
            requests.post(s.url + "/generate", json=body, headers=bad, timeout=10).status_code
            == 401
        )
        good = {"Authorization": "Bearer sekret"}
        r = requests.post(s.url + "/generate", json=body, headers=good, timeout=30)
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 1
        info = requests.get(s.url + "/get_server_info", headers=good, timeout=10).json()
        assert "api_key" not in info  # never echoed


def test_sigterm_drains_in_flight_requests_then_exits_cleanly(tiny_chat_model_dir):
    s = ServerProcess(tiny_chat_model_dir, *TINY_SERVER_FLAGS).start()
    try:
        pids = list(
            requests.get(s.url + "/get_server_info", timeout=10).json()["worker_pids"].values()
        )
        result = {}

        # As long as the tiny model's context allows: the fused CPU path decodes it fast
        # enough that 300 tokens were done (and the server gone) before the late request.
        params = {**LONG, "max_new_tokens": 500}

        def run() -> None:
            body = {"text": "Count:", "sampling_params": params}
            result["r"] = requests.post(s.url + "/generate", json=body, timeout=120)

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.2)  # the request is running
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        late = requests.post(s.url + "/generate", json={"text": "late"}, timeout=10)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        t.join(120)
        r = result["r"]
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["finish_reason"] == {"type": "length", "length": 500}
        assert s.proc.wait(60) == 0
        assert _wait_gone(pids), "a worker process outlived the server"
    finally:
        s.stop(signal.SIGKILL)


def test_killed_scheduler_fails_requests_fast_and_server_exits_nonzero(tiny_chat_model_dir):
    s = ServerProcess(tiny_chat_model_dir, *TINY_SERVER_FLAGS).start()
    try:
        pids = requests.get(s.url + "/get_server_info", timeout=10).json()["worker_pids"]
        result = {}

        def run() -> None:
            body = {"text": "Count:", "sampling_params": {**LONG, "max_new_tokens": 480}}
            t0 = time.monotonic()
            result["r"] = requests.post(s.url + "/generate", json=body, timeout=120)
            result["dt"] = time.monotonic() - t0

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.3)
        os.kill(pids["scheduler"], signal.SIGKILL)
        t.join(60)
        r = result["r"]
        assert r.status_code == 503, r.text
        assert "scheduler" in r.json()["error"]["message"]
        assert result["dt"] < 10
        code = s.proc.wait(30)
        assert code != 0
        assert _wait_gone(pids.values())
    finally:
        s.stop(signal.SIGKILL)


@pytest.mark.parametrize("flag", ["--port=0", "--max-running-requests=0", "--schedule-policy=lifo"])
def test_bad_flags_exit_with_a_message(flag, tiny_chat_model_dir):
    import subprocess
    import sys

    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "smallm.launch_server",
            "--model-path",
            str(tiny_chat_model_dir),
            flag,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert flag.split("=")[0] in p.stderr


def test_every_runner_and_scheduler_knob_is_a_server_flag():
    import dataclasses

    from smallm.runtime.config import ServerArgs
    from smallm.runtime.model.model_runner import RunnerConfig
    from smallm.runtime.scheduler.scheduler import SchedulerConfig

    server = {f.name for f in dataclasses.fields(ServerArgs)}
    knobs = {f.name for f in dataclasses.fields(RunnerConfig)} | {
        f.name for f in dataclasses.fields(SchedulerConfig)
    }
    # The scheduler's admission-ratio internals are tuning constants, not flags.
    internal = {"init_new_token_ratio", "min_new_token_ratio", "new_token_ratio_decay"}
    missing = knobs - server - internal - {"model_path"}
    assert not missing, f"no server flag for {sorted(missing)}"
    args = ServerArgs()
    args.runner_config("m")
    args.scheduler_config()
