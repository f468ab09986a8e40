"""A request's state inside the scheduler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from smallm.runtime.messages import GenerateRequest


class Phase(Enum):
    WAITING = "waiting"  # queued, holds no memory
    PREFILL = "prefill"  # admitted, its prompt (+ earlier output) is being prefilled in chunks
    DECODE = "decode"  # generating one token per step
    FINISHED = "finished"


@dataclass
class Req:
    """Scheduler-side state of one sample.

    Memory held while admitted: row ``req_pool_index`` of the request->token table, whose first
    ``kv_len`` entries are the KV slots of ``all_ids[:kv_len]``, and a lock on ``locked_node``,
    the cached prefix it reuses (the prefix cache owns those slots; the rest are private).
    """

    msg: GenerateRequest
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    phase: Phase = Phase.WAITING
    req_pool_index: int = -1
    locked_node: Any = None
    kv_len: int = 0  # tokens with KV in the pool (cached + private)
    cached_tokens: int = 0  # reported: prompt tokens reused from the cache at first admission
    admitted_once: bool = False
    finish_reason: dict[str, Any] | None = None
    # Tokens produced since the last TokenOutput, with their logprobs.
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[tuple[float, int]] = field(default_factory=list)
    pending_top: list[list[tuple[int, float]]] = field(default_factory=list)
    # Input logprobs accumulate chunk by chunk, then become `input_logprobs` once complete.
    input_acc: list[tuple[float, int]] = field(default_factory=list)
    input_top_acc: list[list[tuple[int, float]]] = field(default_factory=list)
    input_logprobs: list[tuple[float | None, int]] | None = None
    input_top: list[list[tuple[int, float]] | None] | None = None
    input_logprobs_sent: bool = False
    hidden_sum: Any = None  # return_embedding: running sum of the prompt's last hidden states
    embedding: list[float] | None = None  # ... and, once the prompt is prefilled, the result
    grammar: Any = None  # its constrained-decoding matcher (smallm.runtime.constrained.Grammar)
    jump_forward_tokens: int = 0  # output tokens appended by jump-forward, not sampled
    first_output_sent: bool = False  # the first output carries the params the detokenizer needs

    @property
    def rid(self) -> str:
        return self.msg.rid

    @property
    def prompt_ids(self) -> list[int]:
        return self.msg.input_ids

    @property
    def all_ids(self) -> list[int]:
        """Prompt and output so far. A prefill (first, or after retraction) computes KV for all
        of them and samples the next token from the last; a decode step computes the newest
        token's KV."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def seq_len(self) -> int:
        """``len(all_ids)`` without building the list (the scheduler asks every step)."""
        return len(self.msg.input_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        """``all_ids[i]`` without building the list."""
        n = len(self.msg.input_ids)
        return self.msg.input_ids[i] if i < n else self.output_ids[i - n]

    @property
    def wants_input_logprobs(self) -> bool:
        return self.msg.return_logprob and self.msg.logprob_start_len >= 0

    @property
    def max_new_tokens(self) -> int:
        return self.msg.params.max_new_tokens

    def remaining_tokens(self) -> int:
        return max(self.max_new_tokens - len(self.output_ids), 0)
