"""Dataclasses that cross the boundary between the front end and the scheduler.

The in-process Engine passes them through queues; the server passes the same objects between
processes. Every message carries the request id (``rid``) end to end.
"""

from __future__ import annotations

import dataclasses
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
    # /v1/embeddings: prefill the whole prompt (no cached prefix) and return the mean of its
    # last hidden states, L2-normalised, in the final TokenOutput's ``embedding``.
    return_embedding: bool = False
    # The replica (--dp-size) a DP-aware router chose for this request (its body's
    # ``data_parallel_rank``), checked to be in [0, dp_size); None: the server picks.
    data_parallel_rank: int | None = None
    # Prefill/decode disaggregation (the fields SGLang's router adds in PD mode): where the
    # prefill server's bootstrap service is, and the room that pairs the prefill and decode
    # halves of this request. None on a plain request.
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None


@dataclass
class AbortRequest:
    rid: str | None = None  # None with abort_all
    abort_all: bool = False


@dataclass
class FlushCacheRequest:
    request_id: str = ""  # echoed in the FlushCacheResult so the front end can match replies


@dataclass
class FlushCacheResult:
    success: bool
    request_id: str = ""


@dataclass
class ShutdownRequest:
    """Ask a worker process to leave its loop (the front end is exiting)."""

    # Schedulers pass it on to the detokenizer, which leaves after this many copies (one from
    # each live replica), so no replica's last outputs are lost.
    replicas: int = 1


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
    # The HTTP status the error answers with: 400 for a request the scheduler refuses, 5xx for
    # a failure that is not the client's (e.g. a prefill/decode KV transfer that failed).
    error_status: int = 400
    # Constrained requests: output tokens so far that jump-forward appended without sampling.
    jump_forward_tokens: int | None = None
    # return_embedding requests: the pooled, normalised prompt embedding (final output only).
    embedding: list[float] | None = None
    # Sent with a request's first output only: how the detokenizer should render its text.
    params: SamplingParams | None = None
    stream: bool = False


@dataclass
class BatchTokenOutput:
    """Scheduler -> detokenizer: everything one scheduler step produced."""

    outputs: list[TokenOutput]


@dataclass
class TextOutput:
    """Detokenizer -> front end: a TokenOutput with its text.

    ``text`` is cumulative: for a streaming request the text so far (minus a tail a stop string
    might still claim), for a finished request the final text (stop strings trimmed); None for
    an unfinished request that does not stream.
    """

    out: TokenOutput
    text: str | None


@dataclass
class BatchTextOutput:
    outputs: list[TextOutput]


# SchedulerStats fields that combined() does not add up over replicas.
_NOT_SUMMED = frozenset({"cache_hit_rate", "dp_rank", "kv_transfer_latencies"})


@dataclass
class SchedulerStats:
    """Scheduler -> front end (through the detokenizer), a few times a second: the gauges of
    ``/metrics`` and ``/get_server_info``."""

    num_running_reqs: int
    num_queue_reqs: int
    num_used_tokens: int  # KV slots held by requests or pinned cache entries (not evictable)
    max_total_tokens: int
    cache_hit_rate: float
    gen_throughput: float  # generated tokens per second over the last interval
    num_grammar_queue_reqs: int = 0
    num_retractions: int = 0
    forward_steps: int = 0
    # Prompt (and re-prefill) tokens this scheduler computed; a decode server in PD mode
    # computes none: its requests' prompt KV arrives from the prefill server.
    prefill_tokens: int = 0
    # Prefill/decode disaggregation (cumulative): rooms whose KV was written (prefill side) or
    # arrived (decode side), its bytes and time (prefill: the write; decode: transfer request
    # to arrival, prefill compute included), rooms that failed after their transfer request,
    # requests that never found their prefill rank (decode).
    kv_transfer_bytes: int = 0
    kv_transfers: int = 0
    kv_transfer_seconds: float = 0.0
    kv_transfer_failures: int = 0
    kv_bootstrap_failures: int = 0
    # ... and now: decode requests waiting for memory or their prefill rank (prealloc), waiting
    # for their KV (transfer; on a prefill server: requests whose KV is pinned until written),
    # and KV slots of failed rooms held until no late write can land in them.
    pd_prealloc_queue_reqs: int = 0
    pd_transfer_queue_reqs: int = 0
    kv_quarantined_tokens: int = 0
    # Each transfer's seconds since the previous report (for the histogram on /metrics).
    kv_transfer_latencies: list[float] = field(default_factory=list)
    dp_rank: int = 0  # which replica (--dp-size) sent it

    @property
    def token_usage(self) -> float:
        return self.num_used_tokens / self.max_total_tokens if self.max_total_tokens else 0.0

    @classmethod
    def combined(cls, parts: list[SchedulerStats]) -> SchedulerStats:
        """All replicas' gauges as one server's: every count summed, the hit rate weighted by
        capacity (``dp_rank`` 0, no per-report latencies)."""
        total = sum(p.max_total_tokens for p in parts)
        hit = sum(p.cache_hit_rate * p.max_total_tokens for p in parts) / total if total else 0.0
        summed = {
            f.name: sum(getattr(p, f.name) for p in parts)
            for f in dataclasses.fields(cls)
            if f.name not in _NOT_SUMMED
        }
        return cls(**summed, cache_hit_rate=hit)
