"""Dataclasses that cross the boundary between the front end and the scheduler.

The in-process Engine passes them through queues; the server passes the same objects between
processes. Every message carries the request id (``rid``) end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from smallm.runtime.sampling import SamplingParams


@dataclass
class GenerateRequest:
    """A tokenized request for the scheduler (one sample: ``n > 1`` is expanded before this)."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output logprobs only
    top_logprobs_num: int = 0
    stream: bool = False
    # Requests of one `n > 1` group share a prompt; the scheduler lets the first prefill it and
    # the others reuse its KV from the prefix cache.
    group: str | None = None


@dataclass
class AbortRequest:
    rid: str | None = None  # None with abort_all
    abort_all: bool = False


@dataclass
class FlushCacheRequest:
    pass


@dataclass
class TokenOutput:
    """What one request produced in one scheduler step (tokens since the previous output)."""

    rid: str
    new_token_ids: list[int]
    finished: bool = False
    # {"type": "stop", "matched": id or str} | {"type": "length", "length": n}
    # | {"type": "abort", "message": str}; None while running.
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Per new token: (logprob, token id); top alternatives as [(token id, logprob), ...].
    output_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # Sent once, with the first output: positions logprob_start_len .. of the prompt. The first
    # entry's logprob is None (nothing precedes it to predict it from, by protocol).
    input_logprobs: list[tuple[float | None, int]] | None = None
    input_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    error: str | None = None
