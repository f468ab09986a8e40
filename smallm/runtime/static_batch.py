"""Run a fixed batch of prompts to completion on a ModelRunner.

The smallest correct generation loop: prefill every prompt in one pass, then decode the
unfinished ones together until each stops. It is the reference the continuous-batching
scheduler is tested against, and what ``smallm generate`` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from smallm.runtime.model.forward_batch import BatchEntry
from smallm.runtime.model.model_runner import ModelRunner
from smallm.runtime.sampling import Sampler, SamplingBatchInfo, SamplingParams


@dataclass
class GenerationResult:
    """One prompt's outcome: generated ids, why it stopped, and per-token logprobs."""

    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    matched_stop: int | None = None
    logprobs: list[float] = field(default_factory=list)


@dataclass
class _Seq:
    index: int
    prompt: list[int]
    params: SamplingParams
    row: int
    kv_len: int = 0  # tokens whose KV slots this sequence holds
    result: GenerationResult = field(default_factory=GenerationResult)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.result.output_ids)


class StaticBatchGenerator:
    """Generates for a fixed batch; all KV it allocates is freed before ``generate`` returns."""

    def __init__(self, runner: ModelRunner, eos_token_ids: list[int], seed: int | None = None):
        self.runner = runner
        self.eos_token_ids = set(eos_token_ids)
        self.sampler = Sampler(runner.model_config.vocab_size, seed=seed)

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        on_token: Callable[[int, int], None] | None = None,
        return_logprob: bool = False,
    ) -> list[GenerationResult]:
        """Generate for every prompt; ``on_token(prompt_index, token_id)`` streams tokens."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        runner = self.runner
        limit = runner.context_length
        for p, sp in zip(prompts, params):
            if not p:
                raise ValueError("empty prompt")
            if len(p) + sp.max_new_tokens > limit:
                raise ValueError(
                    f"prompt of {len(p)} tokens + max_new_tokens {sp.max_new_tokens} exceeds "
                    f"the context length {limit}"
                )
        seqs: list[_Seq] = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                seqs.append(_Seq(i, list(p), sp, runner.req_to_token.alloc()))
            active = [s for s in seqs if s.params.max_new_tokens > 0]
            for s in seqs:
                if s.params.max_new_tokens == 0:
                    s.result.finish_reason = "length"
            entries = [self._entry(s, s.prompt, 0) for s in active]
            while active:
                logits = runner.forward(entries).next_token_logits
                info = SamplingBatchInfo.build(
                    [s.params for s in active],
                    [s.result.output_ids for s in active],
                    [s.prompt for s in active],
                    self.eos_token_ids,
                    runner.model_config.vocab_size,
                    return_logprob=[return_logprob] * len(active) if return_logprob else None,
                )
                out = self.sampler.sample(logits, info)
                still = []
                for j, s in enumerate(active):
                    tok = out.next_token_ids[j]
                    s.result.output_ids.append(tok)
                    if return_logprob and out.logprobs is not None:
                        s.result.logprobs.append(out.logprobs[j])
                    if on_token is not None:
                        on_token(s.index, tok)
                    if not self._finished(s, tok):
                        still.append(s)
                active = still
                entries = [self._entry(s, [s.result.output_ids[-1]], s.length - 1) for s in active]
        finally:
            for s in seqs:
                self._release(s)
        return [s.result for s in seqs]

    def _entry(self, s: _Seq, tokens: list[int], prefix_len: int) -> BatchEntry:
        slots = self.runner.kv_pool.alloc(len(tokens))
        self.runner.req_to_token.write(s.row, prefix_len, slots)
        s.kv_len = prefix_len + len(tokens)
        return BatchEntry(s.row, prefix_len, tokens)

    def _finished(self, s: _Seq, tok: int) -> bool:
        r, sp = s.result, s.params
        if (not sp.ignore_eos and tok in self.eos_token_ids) or tok in sp.stop_token_ids:
            r.finish_reason, r.matched_stop = "stop", tok
        elif len(r.output_ids) >= sp.max_new_tokens or s.length >= self.runner.context_length:
            r.finish_reason = "length"
        return r.finish_reason is not None

    def _release(self, s: _Seq) -> None:
        if s.kv_len:
            self.runner.kv_pool.free(self.runner.req_to_token.read(s.row, 0, s.kv_len).copy())
        self.runner.req_to_token.free(s.row)
