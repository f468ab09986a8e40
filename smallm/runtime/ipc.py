"""The ZMQ endpoints joining the three server processes, and worker-process plumbing."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class IpcEndpoints:
    """``ipc://`` addresses in a private (0700) temp directory; each PULL side binds."""

    scheduler_input: str  # tokenizer manager -> scheduler
    detokenizer_input: str  # scheduler -> detokenizer
    tokenizer_input: str  # detokenizer -> tokenizer manager

    def scheduler_input_of(self, dp_rank: int) -> str:
        """Where data-parallel replica ``dp_rank`` takes its requests (rank 0: the plain one)."""
        return self.scheduler_input if dp_rank == 0 else f"{self.scheduler_input}-{dp_rank}"

    @classmethod
    def in_dir(cls, directory: str) -> IpcEndpoints:
        return cls(
            scheduler_input=f"ipc://{directory}/scheduler",
            detokenizer_input=f"ipc://{directory}/detokenizer",
            tokenizer_input=f"ipc://{directory}/tokenizer",
        )


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so a killed server leaves no
    orphan holding the model and its memory. Elsewhere, the worker loops poll the parent pid."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


def setup_worker_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
