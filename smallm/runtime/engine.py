"""``smallm.Engine``: the scheduler in-process, for offline batch jobs and tests (no HTTP).

    with Engine() as engine:
        out = engine.generate("The capital of France is", {"max_new_tokens": 8, "temperature": 0})
        print(out["text"], out["meta_info"]["finish_reason"])

Results are the same dicts as the native ``/generate`` JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from smallm.runtime.detokenize import IncrementalDecoder
from smallm.runtime.messages import (
    AbortRequest,
    FlushCacheRequest,
    GenerateRequest,
    TokenOutput,
)
from smallm.runtime.model.loader import resolve_model_path
from smallm.runtime.model.model_runner import ModelRunner, RunnerConfig
from smallm.runtime.sampling import SamplingParams
from smallm.runtime.scheduler.scheduler import FlushCacheResult, Scheduler, SchedulerConfig
from smallm.runtime.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

_RUNNER_FIELDS = {f.name for f in dataclasses.fields(RunnerConfig)} - {"model_path"}
_SCHEDULER_FIELDS = {f.name for f in dataclasses.fields(SchedulerConfig)}


class Engine:
    """Runs a model with continuous batching and a prefix cache inside this process.

    Keyword arguments are server flags in snake case: those of the model runner (``dtype``,
    ``context_length``, ``max_total_tokens``, ``max_running_requests``, ``mem_fraction_static``,
    ``attention_backend``, ``matmul_backend``) and of the scheduler (``chunked_prefill_size``,
    ``schedule_policy``, ``disable_radix_cache``, ``random_seed``, ...).
    """

    def __init__(
        self,
        model_path: str | None = None,
        tokenizer_path: str | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ):
        unknown = set(kwargs) - _RUNNER_FIELDS - _SCHEDULER_FIELDS
        if unknown:
            raise TypeError(
                f"unknown Engine arguments: {sorted(unknown)}; known: "
                f"{sorted(_RUNNER_FIELDS | _SCHEDULER_FIELDS)}"
            )
        self.model_path = resolve_model_path(model_path)
        self.tokenizer = load_tokenizer(tokenizer_path or self.model_path, chat_template)
        runner_cfg = RunnerConfig(
            model_path=self.model_path, **{k: v for k, v in kwargs.items() if k in _RUNNER_FIELDS}
        )
        self.runner = ModelRunner(runner_cfg)
        sched_cfg = SchedulerConfig(**{k: v for k, v in kwargs.items() if k in _SCHEDULER_FIELDS})
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.runner.model_config.eos_token_ids)
        self.scheduler = Scheduler(self.runner, sched_cfg, self.eos_token_ids, self.tokenizer)
        self.vocab_size = self.runner.model_config.vocab_size
        self._collectors: dict[str, _Collector] = {}
        self._flush_results: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="smallm-scheduler", daemon=True)
        self._thread.start()

    # ---- public API ----------------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (a dict back) or a list (a list back, in order; ``n > 1``
        gives n results per prompt, prompt-major). ``stream=True`` (one prompt, n = 1) returns an
        iterator of dicts whose ``text`` is cumulative."""
        options = _RequestOptions(
            return_logprob, logprob_start_len, top_logprobs_num, return_text_in_logprobs, stream
        )
        collectors = self._submit(prompt, sampling_params, input_ids, options, rid)
        if stream:
            if len(collectors) != 1:
                raise ValueError("stream=True takes one prompt with n = 1")
            return self._stream(collectors[0])
        results = [self._wait(c) for c in collectors]
        single = _is_single(prompt, input_ids)
        return results[0] if single and len(results) == 1 else results

    async def async_generate(
        self, *args: Any, **kwargs: Any
    ) -> dict | list[dict] | AsyncIterator[dict]:
        """``generate`` without blocking the event loop. With ``stream=True`` (as in SGLang) the
        awaited result is an async iterator of cumulative-text chunks."""
        if kwargs.pop("stream", False):
            return self.async_generate_stream(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.generate(*args, **kwargs)
        )

    async def async_generate_stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[dict]:
        """Async iterator of cumulative-text chunks for one prompt."""
        kwargs["stream"] = True
        it = self.generate(*args, **kwargs)
        loop = asyncio.get_running_loop()
        done = object()
        while True:
            chunk = await loop.run_in_executor(None, next, it, done)
            if chunk is done:
                return
            yield chunk

    def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        self.scheduler.submit(AbortRequest(rid=rid, abort_all=abort_all))
        self._wakeup.set()

    def flush_cache(self, timeout: float = 30.0) -> bool:
        """Empty the prefix cache; False while requests are running."""
        self.scheduler.submit(FlushCacheRequest())
        self._wakeup.set()
        result: FlushCacheResult = self._flush_results.get(timeout=timeout)
        return result.success

    def shutdown(self) -> None:
        """Stop the scheduler thread; unfinished requests end with an abort."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wakeup.set()
        self._thread.join(timeout=60)
        self._fail_all("the engine was shut down")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- internals -----------------------------------------------------------------------

    def _submit(
        self, prompt, sampling_params, input_ids, options: _RequestOptions, rid
    ) -> list[_Collector]:
        if self._stopping.is_set():
            raise RuntimeError("the engine is shut down")
        if self._error is not None:
            raise RuntimeError(f"the engine failed: {self._error}")
        prompts = _as_token_lists(self.tokenizer, prompt, input_ids)
        params_list = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(prompts)
        )
        if len(params_list) != len(prompts):
            raise ValueError("sampling_params must be one dict or one per prompt")
        rids = rid if isinstance(rid, list) else [rid] * len(prompts)
        msgs: list[tuple[GenerateRequest, _Collector]] = []
        for ids, raw, r in zip(prompts, params_list, rids):
            params = SamplingParams.from_dict(raw).validate(self.vocab_size)
            for tok in ids:
                if not 0 <= tok < self.vocab_size:
                    raise ValueError(
                        f"token id {tok} is outside the vocabulary (0..{self.vocab_size - 1})"
                    )
            base = r or uuid.uuid4().hex
            group = base if params.n > 1 else None
            for i in range(params.n):
                sample = dataclasses.replace(params, n=1)
                if params.n > 1 and params.seed is not None:
                    sample.seed = params.seed + i  # distinct samples, still reproducible
                msg = GenerateRequest(
                    rid=base if params.n == 1 else f"{base}-{i}",
                    input_ids=list(ids),
                    params=sample,
                    return_logprob=options.return_logprob,
                    logprob_start_len=-1
                    if options.logprob_start_len is None
                    else options.logprob_start_len,
                    top_logprobs_num=options.top_logprobs_num or 0,
                    stream=options.stream,
                    group=group,
                )
                collector = _Collector(self.tokenizer, msg, options.return_text_in_logprobs)
                msgs.append((msg, collector))
        with self._lock:
            for msg, col in msgs:
                if msg.rid in self._collectors:
                    raise ValueError(f"request id {msg.rid!r} is already in use")
                self._collectors[msg.rid] = col
        for msg, _ in msgs:
            self.scheduler.submit(msg)
        self._wakeup.set()
        return [c for _, c in msgs]

    def _wait(self, c: _Collector) -> dict:
        while not c.finished:
            c.absorb(self._next_output(c))
        return c.result()

    def _stream(self, c: _Collector) -> Iterator[dict]:
        try:
            while not c.finished:
                c.absorb(self._next_output(c))
                chunk = c.result(streaming=not c.finished)
                if chunk is not None:
                    yield chunk
        finally:
            if not c.finished:  # the consumer stopped early: free the request's memory
                self.abort(c.rid)

    def _next_output(self, c: _Collector) -> TokenOutput:
        while True:
            try:
                return c.queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive() and c.queue.empty():
                    raise RuntimeError(f"the scheduler stopped: {self._error}") from None

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.scheduler.has_work():
                    self._wakeup.wait(timeout=0.1)
                    self._wakeup.clear()
                    continue
                for out in self.scheduler.step():
                    if isinstance(out, FlushCacheResult):
                        self._flush_results.put(out)
                    else:
                        self._dispatch(out)
        except BaseException as e:  # the scheduler is broken: fail every waiter, loudly
            logger.exception("scheduler loop failed")
            self._error = e
            self._fail_all(f"scheduler error: {e}")

    def _dispatch(self, out: TokenOutput) -> None:
        with self._lock:
            c = self._collectors.get(out.rid)
            if out.finished:
                self._collectors.pop(out.rid, None)
        if c is not None:
            c.queue.put(out)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            pending, self._collectors = self._collectors, {}
        for rid, c in pending.items():
            c.queue.put(
                TokenOutput(rid, [], True, {"type": "abort", "message": message}, error=message)
            )


@dataclasses.dataclass
class _RequestOptions:
    """Per-call options of ``generate`` that apply to every prompt in it."""

    return_logprob: bool
    logprob_start_len: int | None
    top_logprobs_num: int | None
    return_text_in_logprobs: bool
    stream: bool


class _Collector:
    """Assembles one request's TokenOutputs into text and the native response dict."""

    def __init__(self, tokenizer: Any, msg: GenerateRequest, text_in_logprobs: bool):
        self.tokenizer = tokenizer
        self.msg = msg
        self.rid = msg.rid
        self.text_in_logprobs = text_in_logprobs
        p = msg.params
        self.decoder = IncrementalDecoder(
            tokenizer, p.skip_special_tokens, p.spaces_between_special_tokens
        )
        # While streaming, hold back text that a stop string might still claim.
        self.holdback = max((len(s) for s in p.stop), default=1) - 1
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.start = time.perf_counter()
        self.output_ids: list[int] = []
        self.last: TokenOutput | None = None
        self.output_logprobs: list[tuple[float, int]] = []
        self.output_top: list[list[tuple[int, float]]] = []
        self.input_logprobs = None
        self.input_top = None
        self.finished = False
        self.sent_len = 0

    def absorb(self, o: TokenOutput) -> None:
        self.last = o
        self.output_ids.extend(o.new_token_ids)
        self.decoder.push(o.new_token_ids)
        self.output_logprobs.extend(o.output_logprobs)
        self.output_top.extend(o.output_top_logprobs)
        if o.input_logprobs is not None:
            self.input_logprobs, self.input_top = o.input_logprobs, o.input_top_logprobs
        self.finished = o.finished

    def _final_text(self) -> str:
        p, reason = self.msg.params, self.last.finish_reason or {}
        ids = self.output_ids
        matched = reason.get("matched")
        if reason.get("type") == "stop" and isinstance(matched, int) and not p.no_stop_trim:
            ids = ids[:-1]
        text = self.tokenizer.decode(
            ids,
            skip_special_tokens=p.skip_special_tokens,
            spaces_between_special_tokens=p.spaces_between_special_tokens,
        )
        if isinstance(matched, str) and not p.no_stop_trim:
            at = text.find(matched)
            if at >= 0:
                text = text[:at]
        return text

    def result(self, streaming: bool = False) -> dict | None:
        if streaming:
            text = self.decoder.text
            text = text[: max(len(text) - self.holdback, 0)] if self.msg.params.stop else text
            if len(text) <= self.sent_len and not self.output_logprobs:
                return None
            self.sent_len = max(self.sent_len, len(text))
        else:
            text = self._final_text()
        o = self.last
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": None if streaming else o.finish_reason,
            "prompt_tokens": o.prompt_tokens or len(self.msg.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": o.cached_tokens,
            "e2e_latency": time.perf_counter() - self.start,
        }
        if self.msg.return_logprob:
            meta["output_token_logprobs"] = [self._entry(lp, t) for lp, t in self.output_logprobs]
            if self.msg.top_logprobs_num:
                meta["output_top_logprobs"] = [
                    [self._entry(lp, t) for t, lp in row] for row in self.output_top
                ]
            if self.input_logprobs is not None:
                meta["input_token_logprobs"] = [self._entry(lp, t) for lp, t in self.input_logprobs]
                vals = [lp for lp, _ in self.input_logprobs if lp is not None]
                meta["normalized_prompt_logprob"] = sum(vals) / len(vals) if vals else 0.0
                if self.msg.top_logprobs_num:
                    meta["input_top_logprobs"] = [
                        None if row is None else [self._entry(lp, t) for t, lp in row]
                        for row in self.input_top
                    ]
        if o.error and not streaming:
            meta["error"] = o.error
        return {"text": text, "output_ids": list(self.output_ids), "meta_info": meta}

    def _entry(self, logprob: float | None, token: int) -> list:
        text = self.tokenizer.decode([token]) if self.text_in_logprobs else None
        return [logprob, token, text]


def _is_single(prompt: Any, input_ids: Any) -> bool:
    if prompt is not None:
        return isinstance(prompt, str)
    return bool(input_ids) and isinstance(input_ids[0], int)


def _as_token_lists(tokenizer: Any, prompt: Any, input_ids: Any) -> list[list[int]]:
    if (prompt is None) == (input_ids is None):
        raise ValueError("give exactly one of prompt (text) and input_ids")
    if prompt is not None:
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("prompt must be a string or a list of strings")
        return [tokenizer.encode(t) for t in texts]
    if input_ids and isinstance(input_ids[0], int):
        return [list(input_ids)]
    if not all(isinstance(x, list) for x in input_ids):
        raise ValueError("input_ids must be a list of ints or a list of lists of ints")
    return [list(x) for x in input_ids]
