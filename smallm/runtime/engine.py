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
from collections.abc import AsyncIterator, Iterator
from typing import Any

from smallm.runtime.detokenize import TextAssembler
from smallm.runtime.messages import (
    AbortRequest,
    FlushCacheRequest,
    FlushCacheResult,
    GenerateRequest,
    TokenOutput,
)
from smallm.runtime.model.loader import resolve_model_path
from smallm.runtime.model.model_runner import ModelRunner, RunnerConfig
from smallm.runtime.request_builder import GenerateCall, build_requests
from smallm.runtime.response import ResponseBuilder
from smallm.runtime.scheduler.scheduler import Scheduler, SchedulerConfig
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
        sched_cfg = SchedulerConfig(**{k: v for k, v in kwargs.items() if k in _SCHEDULER_FIELDS})
        self._collectors: dict[str, _Collector] = {}
        self._flush_results: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._ids = itertools.count()
        # The model is loaded by the scheduler thread that will run it: measured on the AMX
        # Xeon, oneDNN's bfloat16 matmuls ran 2-3x slower in a thread other than the one that
        # loaded (prepacked) the model (a batch-1 step 18.8 vs 8.4 ms; built in the thread that
        # runs it: 8.5 ms).
        ready: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(runner_cfg, sched_cfg, ready), name="smallm-scheduler",
            daemon=True,
        )  # fmt: skip
        self._thread.start()
        error = ready.get()
        if error is not None:
            raise error
        self.vocab_size = self.runner.model_config.vocab_size

    def _run(self, runner_cfg: RunnerConfig, sched_cfg: SchedulerConfig, ready) -> None:
        try:
            self.runner = ModelRunner(runner_cfg)
            self.eos_token_ids = eos_token_ids(
                self.tokenizer, self.runner.model_config.eos_token_ids
            )
            self.scheduler = Scheduler(self.runner, sched_cfg, self.eos_token_ids, self.tokenizer)
        except BaseException as e:  # reported to the constructor, which raises it
            ready.put(e)
            return
        ready.put(None)
        self._loop()

    # ---- public API ----------------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (a dict back) or a list (a list back, in order; ``n > 1``
        gives n results per prompt, prompt-major). The logprob options take a value per
        prompt as a list. ``stream=True`` (one prompt, n = 1) returns an
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
        self.scheduler.shutdown()

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
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and prompt)
        ):
            raise ValueError("prompt must be a string or a list of strings")
        call = GenerateCall(
            text=prompt,
            input_ids=input_ids,
            sampling_params=sampling_params,
            rid=rid,
            return_logprob=options.return_logprob,
            logprob_start_len=-1
            if options.logprob_start_len is None
            else options.logprob_start_len,
            top_logprobs_num=options.top_logprobs_num or 0,
            return_text_in_logprobs=options.return_text_in_logprobs,
            stream=options.stream,
        )
        msgs = build_requests(call, self.tokenizer, self.vocab_size)
        collectors = [_Collector(self.tokenizer, m, options.return_text_in_logprobs) for m in msgs]
        with self._lock:
            taken = [m.rid for m in msgs if m.rid in self._collectors]
            if taken:
                raise ValueError(f"request id {taken[0]!r} is already in use")
            for c in collectors:
                self._collectors[c.rid] = c
        for msg in msgs:
            self.scheduler.submit(msg)
        self._wakeup.set()
        return collectors

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
                if self.scheduler.waiting_only_for_background:
                    time.sleep(0.005)  # a grammar compiles in its own thread; don't spin
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
    """Per-call options of ``generate`` (the logprob ones may hold a value per prompt)."""

    return_logprob: bool | list[bool]
    logprob_start_len: int | list[int] | None
    top_logprobs_num: int | list[int] | None
    return_text_in_logprobs: bool
    stream: bool


class _Collector:
    """One request's outputs in the Engine: its text (as the detokenizer process would render
    it) and its response dict."""

    def __init__(self, tokenizer: Any, msg: GenerateRequest, text_in_logprobs: bool):
        self.rid = msg.rid
        self.msg = msg
        self.text = TextAssembler(tokenizer, msg.params, stream=msg.stream)
        self.response = ResponseBuilder(tokenizer, msg, text_in_logprobs)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.finished = False
        self.sent_len = 0

    def absorb(self, o: TokenOutput) -> None:
        self.text.push(o.new_token_ids)
        self.response.absorb(o)
        self.finished = o.finished

    def result(self, streaming: bool = False) -> dict | None:
        if not streaming:
            return self.response.result(self.text.final_text(self.response.finish_reason))
        text = self.text.stream_text()
        if len(text) <= self.sent_len and not self.response.output_logprobs:
            return None
        self.sent_len = max(self.sent_len, len(text))
        return self.response.result(text, streaming=True)


def _is_single(prompt: Any, input_ids: Any) -> bool:
    return GenerateCall(text=prompt, input_ids=input_ids).is_single
