"""``SchedulerConfig``: the scheduling knobs (torch-free, so ``ServerArgs`` can read its
defaults without loading the model stack)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SchedulerConfig:
    """Scheduling knobs (server flags of the same names)."""

    max_running_requests: int | None = None  # None: the request table's size
    chunked_prefill_size: int = 512  # prefill tokens per step; <= 0: whole prompts
    schedule_policy: str = "lpm"  # lpm | fcfs
    disable_radix_cache: bool = False
    random_seed: int | None = None
    # Share of each running request's remaining max_new_tokens kept free when admitting more.
    # Low values admit more at the risk of retraction; retraction raises it, calm decays it.
    init_new_token_ratio: float = 0.5
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.002
    # Hold back a waiting request whose prompt shares an uncached prefix with one being
    # prefilled, so it reuses that prefix from the cache instead of computing it again.
    defer_shared_prefix: bool = True
    # Constrained decoding: auto (per-kind default) | outlines | llguidance | none.
    grammar_backend: str = "auto"
    grammar_compile_timeout: float = 60.0  # seconds; the request fails after that
    # Whitespace a JSON schema allows between tokens (a regex; None: the backends' "[ ]?").
    # Compact JSON ("") is the default: every separator becomes forced text; on 100 documents
    # jump-forward was 1.21x faster end to end with it and 0.79x with "[ ]?" (before short
    # extends were batched; docs/benchmarks.md), and the output is shorter.
    grammar_whitespace_pattern: str | None = ""
    # Within this many tokens of its limit, a json_schema request may only emit closing tokens
    # where its grammar allows them (see json_closing.py); 0 turns it off.
    json_close_margin: int = 32
    # Append the text a grammar forces without sampling it (prefilled as a short extend).
    disable_jump_forward: bool = False
