"""``Runtime``: start a local smallm server for a program's lifetime and talk to it over HTTP.

    runtime = sl.Runtime(model_path="path/or/model.gguf", max_total_tokens=16384)
    sl.set_default_backend(runtime)
    ...
    runtime.shutdown()

Keyword arguments are server flags in snake case (``--max-running-requests`` is
``max_running_requests=``; a flag without a value is ``disable_radix_cache=True``). The server
is a subprocess on a free loopback port; it is stopped by ``shutdown()``, by leaving a ``with``
block, or at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from smallm.lang.backends.endpoint import RuntimeEndpoint


class RuntimeStartError(RuntimeError):
    """The server subprocess exited or did not become healthy in time (its log is attached)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(server_args: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in server_args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


class Runtime(RuntimeEndpoint):
    """A :class:`RuntimeEndpoint` on a server this object starts and owns."""

    def __init__(
        self,
        model_path: str | None = None,
        chat_template: Any = None,
        start_timeout: float = 300.0,
        **server_args: Any,
    ):
        port = server_args.pop("port", None) or free_port()
        cmd = [sys.executable, "-m", "smallm.launch_server", "--host", "127.0.0.1"]
        cmd += ["--port", str(port)]
        if model_path is not None:
            cmd += ["--model-path", str(model_path)]
        cmd += _flags(server_args)
        fd, self.log_path = tempfile.mkstemp(prefix="smallm-runtime-", suffix=".log")
        os.close(fd)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        atexit.register(self.shutdown)
        url = f"http://127.0.0.1:{port}"
        try:
            self._wait_healthy(url, start_timeout)
            super().__init__(url, api_key=server_args.get("api_key"), chat_template=chat_template)
        except BaseException:
            self.shutdown()
            raise

    def _wait_healthy(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeStartError(
                    f"the server exited with code {self.process.returncode}:\n{self._log_tail()}"
                )
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(url + "/health", timeout=2) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise RuntimeStartError(
            f"the server was not healthy after {timeout:.0f}s:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def shutdown(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 30 s). Idempotent."""
        p = getattr(self, "process", None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
