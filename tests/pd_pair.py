"""A prefill server and a decode server joined by a bootstrap port, and SGLang's router in PD
mode in front of them: real subprocesses on 127.0.0.1, for the disaggregation tests."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import requests

from smallm.lang.backends.runtime import free_port

from server_process import ServerProcess


class PDPair:
    """``flags`` (the model's included) on both servers, plus each side's disaggregation flags;
    ``timeout`` sets ``--disaggregation-timeout`` (None: the server's default). ``url`` is the
    router in front while ``pd_router`` runs one."""

    def __init__(
        self,
        flags: list[str] | tuple[str, ...],
        backend: str,
        timeout: float | None = None,
        prefill_flags: tuple[str, ...] = (),
        decode_flags: tuple[str, ...] = (),
    ):
        self.backend = backend
        self.bootstrap_port = free_port()
        common = [*flags, "--disaggregation-transfer-backend", backend]
        if timeout is not None:
            common += ["--disaggregation-timeout", str(timeout)]
        self.prefill = ServerProcess(
            None,
            *common,
            "--disaggregation-mode",
            "prefill",
            "--disaggregation-bootstrap-port",
            str(self.bootstrap_port),
            *prefill_flags,
        )
        self.decode = ServerProcess(None, *common, "--disaggregation-mode", "decode", *decode_flags)
        self.url: str | None = None

    def __enter__(self) -> PDPair:
        try:
            # Both at once: each start is mostly waiting (imports, model load).
            with ThreadPoolExecutor(2) as pool:
                for started in [pool.submit(s.start) for s in (self.prefill, self.decode)]:
                    started.result()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.decode.stop()
        self.prefill.stop()

    def bootstrap(self, room: int | None = None) -> dict:
        """The bootstrap fields the router would add (a random room unless given)."""
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

    def logs(self) -> str:
        return (
            f"\n--- prefill log ---\n{self.prefill.log_text()}"
            f"\n--- decode log ---\n{self.decode.log_text()}"
        )


def post(server, body, path="/generate"):
    return requests.post(server.url + path, json=body, timeout=120)


@contextlib.contextmanager
def pd_router(pair: PDPair, timeout: float = 60) -> Iterator[str]:
    """``sglang-router --pd-disaggregation --prefill URL BOOTSTRAP_PORT --decode URL`` in front
    of ``pair``; yields (and sets ``pair.url`` to) its URL once it answers ``/health``."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
        "--prefill", pair.prefill.url, str(pair.bootstrap_port),
        "--decode", pair.decode.url, "--host", "127.0.0.1", "--port", str(port),
        "--policy", "round_robin", "--prometheus-port", str(free_port()), "--log-level", "warn",
    ]  # fmt: skip
    router = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the router did not start"
            time.sleep(0.25)
        pair.url = url
        yield url
    finally:
        pair.url = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(router.pid, signal.SIGKILL)  # its server outlives a SIGTERM (FACTS.md)
        router.wait()


def scheduler_stats(server, **expect) -> dict:
    """The server's scheduler gauges once they show ``expect`` (they arrive a few times a
    second), or the last seen after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        stats = requests.get(server.url + "/server_info", timeout=10).json()["scheduler_stats"]
        if stats and all(stats.get(k) == v for k, v in expect.items()):
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.2)
