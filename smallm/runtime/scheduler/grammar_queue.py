"""Requests whose grammar is still compiling: they wait here, off the batch, while others run.

A request with ``regex``, ``json_schema``, ``ebnf`` or ``structural_tag`` enters the queue on arrival; its grammar
compiles in the compiler's worker thread (cached by backend, kind and spec). Each scheduler
step polls the queue without blocking: compiled requests move on to the waiting queue with
their own matcher, failed ones (invalid spec, unenforceable keyword, timeout) are answered with
the error. ``sglang:num_grammar_queue_reqs`` is this queue's length.
"""

from __future__ import annotations

import logging
from typing import Any

from smallm.runtime.constrained import GrammarCompiler, GrammarError, backend_for
from smallm.runtime.constrained.registry import create_grammar_backend
from smallm.runtime.sampling import SamplingParams
from smallm.runtime.scheduler.request import Req

logger = logging.getLogger(__name__)


def grammar_spec(params: SamplingParams) -> tuple[str, str] | None:
    """The request's constraint as (kind, spec), or None when it is unconstrained."""
    for kind in ("regex", "json_schema", "ebnf", "structural_tag"):
        spec = getattr(params, kind)
        if spec is not None:
            return kind, spec
    return None


class GrammarQueue:
    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        backend: str = "auto",
        compile_timeout_s: float = 60.0,
        whitespace_pattern: str | None = None,
    ):
        self.backend = backend
        self.compiler: GrammarCompiler | None = None
        if backend != "none" and tokenizer is not None:
            options = (
                {} if whitespace_pattern is None else {"whitespace_pattern": whitespace_pattern}
            )

            def factory(name: str):
                extra = {"build_timeout_s": compile_timeout_s} if name == "outlines" else {}
                return lambda: create_grammar_backend(
                    name, tokenizer, vocab_size, **options, **extra
                )

            self.compiler = GrammarCompiler(
                {name: factory(name) for name in ("outlines", "llguidance")},
                timeout_s=compile_timeout_s,
            )
        self.pending: list[tuple[Req, Any]] = []

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, r: Req, kind: str, spec: str) -> str | None:
        """Start compiling r's grammar; returns an error message if that is impossible."""
        if self.compiler is None:
            return "constrained decoding is off on this server (--grammar-backend none)"
        try:
            name = backend_for(kind, self.backend)
        except GrammarError as e:
            return str(e)
        self.pending.append((r, self.compiler.submit(name, kind, spec)))
        return None

    def poll(self) -> tuple[list[Req], list[tuple[Req, str]]]:
        """(requests whose grammar is ready, (request, error) pairs); never blocks."""
        ready: list[Req] = []
        failed: list[tuple[Req, str]] = []
        still: list[tuple[Req, Any]] = []
        for r, handle in self.pending:
            if not handle.done():
                still.append((r, handle))
                continue
            try:
                r.grammar = handle.result(wait=False)
                ready.append(r)
            except GrammarError as e:
                kind, text = handle.key[1], str(e)
                prefix = f"invalid {kind}"
                failed.append((r, text if text.startswith(prefix) else f"{prefix}: {text}"))
        self.pending = still
        return ready, failed

    def remove(self, predicate) -> list[Req]:
        """Drop (and return) the queued requests ``predicate`` selects (aborts)."""
        gone = [r for r, _ in self.pending if predicate(r)]
        self.pending = [(r, h) for r, h in self.pending if not predicate(r)]
        return gone

    def shutdown(self) -> None:
        if self.compiler is not None:
            self.compiler.shutdown()
