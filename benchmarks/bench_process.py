"""A server or router subprocess for the benchmarks: its own process group (stopped whole),
its output in a log file, optionally pinned to cores; ``wait_ready`` polls ``/health``."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from smallm.runtime.server.router import stop_process_groups


class BenchProcess:
    """``cmd`` running in its own process group; ``url`` is where it will answer."""

    def __init__(
        self, cmd: list[str], url: str, *, log_prefix: str = "bench-", cores: set[int] | None = None
    ):
        fd, self.log = tempfile.mkstemp(prefix=log_prefix, suffix=".log")
        os.close(fd)
        # Affinity is inherited by every process the server starts (scheduler, detokenizer).
        pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        with open(self.log, "ab") as log:
            self.p = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pin,
            )
        self.url = url

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.url} exited:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.url} did not start:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return Path(self.log).read_text()[-3000:]

    def stop(self) -> None:
        # The whole group: sglang-router's server outlives a SIGTERM to its launcher.
        stop_process_groups([self.p], grace=60.0)
        Path(self.log).unlink(missing_ok=True)
