"""Assembling one request's outputs into the native ``/generate`` response dict."""

from __future__ import annotations

import time
from typing import Any

from smallm.runtime.messages import GenerateRequest, TokenOutput


class ResponseBuilder:
    """Accumulates a request's TokenOutputs (ids, logprobs, counts) and renders the native
    response: ``{"text", "output_ids", "meta_info"}`` with the fields COMPAT.md lists.

    The text itself comes from elsewhere (the detokenizer), so this class never decodes except
    for the per-token texts of ``return_text_in_logprobs``.
    """

    def __init__(self, tokenizer: Any, msg: GenerateRequest, text_in_logprobs: bool):
        self.tokenizer = tokenizer
        self.msg = msg
        self.rid = msg.rid
        self.text_in_logprobs = text_in_logprobs
        self.start = time.perf_counter()
        self.output_ids: list[int] = []
        self.last: TokenOutput | None = None
        self.output_logprobs: list[tuple[float, int]] = []
        self.output_top: list[list[tuple[int, float]]] = []
        self.input_logprobs: list[tuple[float | None, int]] | None = None
        self.input_top: list[list[tuple[int, float]] | None] | None = None
        self.finished = False
        self.embedding: list[float] | None = None
        self._token_text: dict[int, str] = {}

    def absorb(self, o: TokenOutput) -> None:
        self.last = o
        self.output_ids.extend(o.new_token_ids)
        self.output_logprobs.extend(o.output_logprobs)
        self.output_top.extend(o.output_top_logprobs)
        if o.input_logprobs is not None:
            self.input_logprobs, self.input_top = o.input_logprobs, o.input_top_logprobs
        self.finished = o.finished
        if o.embedding is not None:
            self.embedding = o.embedding

    @property
    def finish_reason(self) -> dict | None:
        return self.last.finish_reason if self.last is not None else None

    @property
    def error(self) -> str | None:
        return self.last.error if self.last is not None else None

    @property
    def error_status(self) -> int:
        return self.last.error_status if self.last is not None else 400

    def result(self, text: str, streaming: bool = False) -> dict:
        o = self.last
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": None if streaming or o is None else o.finish_reason,
            "prompt_tokens": (o.prompt_tokens if o else 0) or len(self.msg.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": o.cached_tokens if o else 0,
            "e2e_latency": time.perf_counter() - self.start,
        }
        if o is not None and o.jump_forward_tokens is not None:
            meta["jump_forward_tokens"] = o.jump_forward_tokens
        if self.msg.return_logprob:
            self._add_logprobs(meta)
        if o is not None and o.error and not streaming:
            meta["error"] = o.error
        out = {"text": text, "output_ids": list(self.output_ids), "meta_info": meta}
        if self.embedding is not None:
            out["embedding"] = self.embedding
        return out

    def _add_logprobs(self, meta: dict[str, Any]) -> None:
        meta["output_token_logprobs"] = [self._entry(lp, t) for lp, t in self.output_logprobs]
        if self.msg.top_logprobs_num:
            meta["output_top_logprobs"] = [
                [self._entry(lp, t) for t, lp in row] for row in self.output_top
            ]
        inputs, tops = self.input_logprobs, self.input_top
        if inputs is None and self.msg.input_ids:
            # logprob_start_len = -1 (output only): like SGLang, the input list holds just the
            # last prompt token, with a null logprob; clients index [0] of it.
            inputs = [(None, self.msg.input_ids[-1])]
            tops = [None]
        if inputs is None:
            return
        meta["input_token_logprobs"] = [self._entry(lp, t) for lp, t in inputs]
        vals = [lp for lp, _ in inputs if lp is not None]
        meta["normalized_prompt_logprob"] = sum(vals) / len(vals) if vals else 0.0
        if self.msg.top_logprobs_num:
            meta["input_top_logprobs"] = [
                None if row is None else [self._entry(lp, t) for t, lp in row]
                for row in (tops or [None] * len(inputs))
            ]

    def _entry(self, logprob: float | None, token: int) -> list:
        if not self.text_in_logprobs:
            return [logprob, token, None]
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return [logprob, token, text]
