"""A real smallm server in a subprocess on a free loopback port, for the HTTP tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from smallm.lang.backends.runtime import free_port


class ServerProcess:
    """``python -m smallm.launch_server`` with the given flags; ``url`` once ``start`` returns."""

    def __init__(self, model_path: str | Path | None, *flags: str, start_timeout: float = 240):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.flags = [*([] if model_path is None else ["--model-path", str(model_path)]), *flags]
        self.start_timeout = start_timeout
        fd, self.log_path = tempfile.mkstemp(prefix="smallm-server-", suffix=".log")
        os.close(fd)
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "smallm.launch_server", "--port", str(self.port), *self.flags]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with open(self.log_path, "ab") as log:
            # Its own process group, so `stop` can reap workers a failed launcher left behind.
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited ({self.proc.returncode}):\n{self.log_text()}"
                )
            if self.get_status("/health") == 200:
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server did not start in {self.start_timeout}s:\n{self.log_text()}")

    def get_status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def log_text(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-6000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Signal the server and wait; returns its exit code (kills it after ``timeout``)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in the group, if any
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
