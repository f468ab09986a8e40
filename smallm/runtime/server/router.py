"""``smallm router --workers N``: N smallm servers behind SGLang's router (sglang-router).

The router is SGLang's Rust gateway, an optional extra (``pip install 'smallm[router]'``). This
module starts the workers as ``smallm serve`` subprocesses on free loopback ports, waits until
each answers ``/health``, then runs ``python -m sglang_router.launch_router`` in front of them
and stays until SIGINT/SIGTERM or the router exits. A worker that dies is left dead: the
router's health checks drop it and the others keep serving.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")
INSTALL_HINT = "pip install 'smallm[router]'  (it installs sglang-router==0.3.2)"
WORKER_START_TIMEOUT_S = 600.0
ROUTER_START_TIMEOUT_S = 120.0


class RouterUnavailable(RuntimeError):
    """The optional ``sglang-router`` package is not installed."""


def require_router() -> None:
    """Raise `RouterUnavailable` with the install command when sglang-router is missing."""
    try:
        found = importlib.util.find_spec("sglang_router") is not None
    except (ImportError, ValueError):  # a None entry in sys.modules, or a broken package
        found = False
    if not found:
        raise RouterUnavailable(
            f"smallm router needs SGLang's router, which is not installed: {INSTALL_HINT}"
        )


@dataclass
class RouterPlan:
    """What ``smallm router`` starts: ``workers`` servers with ``server_flags`` each, and the
    router on ``host:port`` with ``policy`` and any extra ``router_flags``."""

    workers: int = 2
    policy: str = "cache_aware"
    host: str = "127.0.0.1"
    port: int = 30000
    worker_host: str = "127.0.0.1"
    worker_ports: list[int] = field(default_factory=list)  # empty: free ports
    server_flags: list[str] = field(default_factory=list)
    router_flags: list[str] = field(default_factory=list)
    prometheus_port: int | None = None  # None: a free port (the router's default 29000 clashes)

    def validate(self) -> None:
        """Raise ValueError naming the flag for a bad value."""
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}")
        if self.policy == "power_of_two" and self.workers < 2:
            raise ValueError("--policy power_of_two needs --workers 2 or more")
        if self.worker_ports and len(self.worker_ports) != self.workers:
            raise ValueError(f"--worker-ports needs {self.workers} ports, one per worker")
        if not 0 < self.port < 65536:
            raise ValueError("--port must be in 1..65535")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def worker_command(host: str, port: int, server_flags: list[str]) -> list[str]:
    """The command line of one worker (``smallm serve`` in this Python)."""
    return [
        sys.executable, "-m", "smallm.cli", "serve", *server_flags, "--host", host,
        "--port", str(port),
    ]  # fmt: skip


def router_command(
    worker_urls: list[str],
    port: int,
    policy: str,
    host: str = "127.0.0.1",
    prometheus_port: int | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The sglang-router command line for ``worker_urls`` (SGLang's documented launcher)."""
    return [
        sys.executable, "-m", "sglang_router.launch_router",
        "--worker-urls", *worker_urls,
        "--host", host, "--port", str(port), "--policy", policy,
        "--prometheus-port", str(prometheus_port or free_port()),
        *(extra or []),
    ]  # fmt: skip


def http_status(url: str, timeout: float = 5.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Until ``url`` answers 200; raises RuntimeError if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up")
        if http_status(url) == 200:
            return
        time.sleep(0.25)
    raise RuntimeError(f"{what} did not become healthy within {timeout:.0f}s")


def stop_process_groups(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every process group, wait up to ``grace`` seconds for all of them, then SIGKILL
    what is left (sglang-router's server outlives a SIGTERM to its launcher)."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(deadline - time.monotonic(), 0.0))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group, if any
        proc.wait()


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped


def run_router(plan: RouterPlan) -> int:
    """Start the workers and the router; returns the exit code (0 after SIGINT/SIGTERM)."""
    try:
        plan.validate()
        require_router()
    except (ValueError, RouterUnavailable) as e:
        print(f"smallm router: {e}", file=sys.stderr)
        return 2
    # A signal interrupts whatever is running (start-up waits included); `finally` cleans up.
    old = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    workers: list[subprocess.Popen] = []
    router: subprocess.Popen | None = None
    try:
        ports = plan.worker_ports or [free_port(plan.worker_host) for _ in range(plan.workers)]
        urls = [url_of(plan.worker_host, p) for p in ports]
        for port in ports:
            cmd = worker_command(plan.worker_host, port, plan.server_flags)
            workers.append(subprocess.Popen(cmd, start_new_session=True))
        for i, (url, proc) in enumerate(zip(urls, workers)):
            wait_healthy(url + "/health", proc, WORKER_START_TIMEOUT_S, f"worker {i} ({url})")
            print(f"smallm router: worker {i} ready at {url} (pid {proc.pid})", flush=True)
        cmd = router_command(
            urls, plan.port, plan.policy, plan.host, plan.prometheus_port, plan.router_flags
        )
        router = subprocess.Popen(cmd, start_new_session=True)
        local = plan.host if plan.host not in ("0.0.0.0", "::") else "127.0.0.1"
        wait_healthy(
            url_of(local, plan.port) + "/workers", router, ROUTER_START_TIMEOUT_S, "the router"
        )
        print(
            f"smallm router ready at {url_of(plan.host, plan.port)} "
            f"({plan.policy}, {plan.workers} workers)",
            flush=True,
        )
        # Workers may die (the router's health checks drop them); the router may not.
        while router.poll() is None:
            time.sleep(0.2)
        print(f"smallm router: the router exited ({router.returncode})", file=sys.stderr)
        return 1
    except _Stopped:
        return 0
    except RuntimeError as e:
        print(f"smallm router: {e}", file=sys.stderr)
        return 1
    finally:
        for s in old:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        if router is not None:
            stop_process_groups([router], grace=2.0)
        stop_process_groups(workers, grace=40.0)
        for s, handler in old.items():
            signal.signal(s, handler)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``smallm router`` (any other flag goes to every ``smallm serve``)."""
    p.add_argument("--workers", type=int, default=2, help="how many smallm servers to start")
    p.add_argument("--policy", default="cache_aware", choices=POLICIES)
    p.add_argument("--host", default="127.0.0.1", help="the router's address")
    p.add_argument("--port", type=int, default=30000, help="the router's port")
    p.add_argument(
        "--worker-ports",
        type=int,
        nargs="+",
        default=[],
        help="one loopback port per worker (default: free ports)",
    )
    p.add_argument("--prometheus-port", type=int, default=None, help="the router's own metrics")
    p.add_argument(
        "--router-args",
        default="",
        help="extra sglang-router flags as one string: --router-args='--health-check-interval-secs 5'",
    )


def plan_from_cli(ns: argparse.Namespace, server_flags: list[str]) -> RouterPlan:
    """The plan for parsed ``smallm router`` flags plus the flags meant for the servers."""
    return RouterPlan(
        workers=ns.workers,
        policy=ns.policy,
        host=ns.host,
        port=ns.port,
        worker_ports=list(ns.worker_ports),
        server_flags=server_flags,
        router_flags=shlex.split(ns.router_args),
        prometheus_port=ns.prometheus_port,
    )
