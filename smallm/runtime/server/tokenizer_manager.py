"""The front end's side of the process trio, living in the HTTP process.

It tokenizes and validates requests, sends them to the scheduler, and turns the detokenizer's
outputs back into native response dicts for the HTTP handlers, streamed or whole. It also keeps
the latency metrics, and knows when the workers are gone: then every pending request fails
with `ServiceUnavailable` instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from smallm.runtime.ipc import IpcEndpoints
from smallm.runtime.messages import (
    AbortRequest,
    BatchTextOutput,
    FlushCacheRequest,
    FlushCacheResult,
    GenerateRequest,
    SchedulerStats,
    ShutdownRequest,
    TextOutput,
)
from smallm.runtime.metrics import ServerMetrics
from smallm.runtime.request_builder import GenerateCall, RequestError, build_requests
from smallm.runtime.response import ResponseBuilder
from smallm.runtime.server.coordinator import DataParallelCoordinator, PlacementError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class GenerationFailed(RuntimeError):
    """A call did not complete; ``status`` is the HTTP status its error answers with."""

    status = 500


class ServiceUnavailable(GenerationFailed):
    """The server cannot serve requests (a worker died, or it is shutting down): HTTP 503."""

    status = 503


class RequestFailed(GenerationFailed):
    """The scheduler rejected or failed one request: HTTP ``status`` (400 when it refused the
    request, 5xx when it failed for a reason not the client's) with its message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ModelInfo:
    """What the scheduler reported once its model was loaded."""

    model_path: str
    tokenizer_path: str
    served_model_name: str
    vocab_size: int
    context_length: int
    max_total_tokens: int
    max_running_requests: int
    extra: dict[str, Any] = field(default_factory=dict)


class _ReqState:
    """One sample of a call: its response so far and its latency marks."""

    def __init__(self, msg: GenerateRequest, builder: ResponseBuilder, index: int, group: _Group):
        self.msg = msg
        self.builder = builder
        self.index = index
        self.group = group
        self.text = ""
        self.finished = False
        self.unavailable: str | None = None
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.sent_len = -1
        self.detached = False  # the client is gone; only the final output is still expected
        self.rank = 0  # the data-parallel replica serving it

    @property
    def failed_message(self) -> str | None:
        """The scheduler's error for a request it refused (not a client abort)."""
        err = self.builder.error
        return err if err and err != "aborted" else None

    def result(self) -> dict:
        return self.builder.result(self.text)


class _Group:
    """The samples of one call; ``updates`` gets a state's index each time it changes."""

    def __init__(self) -> None:
        self.states: list[_ReqState] = []
        self.updates: asyncio.Queue[int] = asyncio.Queue()


class TokenizerManager:
    """Submit calls to the scheduler and collect their results (see the module docstring)."""

    def __init__(
        self,
        endpoints: IpcEndpoints,
        info: ModelInfo,
        tokenizer: Any,
        metrics: ServerMetrics | None = None,
        log_requests: bool = False,
        coordinator: DataParallelCoordinator | None = None,
    ):
        self.endpoints = endpoints
        # Places each request on a scheduler replica (one replica: always rank 0).
        self.coordinator = coordinator or DataParallelCoordinator(1, "round_robin")
        self.info = info
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.log_requests = log_requests
        self.states: dict[str, _ReqState] = {}
        # The latest gauges of each replica (--dp-size), by dp_rank.
        self.rank_stats: dict[int, SchedulerStats] = {}
        self.unavailable: str | None = None  # why the server cannot serve, once it cannot
        self._flushes: dict[str, asyncio.Future] = {}
        self._ctx: Any = None
        self._sends: list[Any] = []  # a PUSH socket per replica, by dp_rank
        self._recv: Any = None
        self._task: asyncio.Task | None = None
        self.num_finished = 0
        # Tokenizing a big batch takes long enough to stall every other request on the event
        # loop: it runs in one worker thread, on its own copy of the tokenizer (a fast
        # tokenizer shared between threads can fail with "Already borrowed").
        self._encode_tokenizer = copy.deepcopy(tokenizer)
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    async def start(self) -> None:
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        for rank in range(self.coordinator.dp_size):
            sock = self._ctx.socket(zmq.PUSH)
            sock.connect(self.endpoints.scheduler_input_of(rank))
            self._sends.append(sock)
        self._recv = self._ctx.socket(zmq.PULL)
        self._recv.bind(self.endpoints.tokenizer_input)
        self._task = asyncio.create_task(self._recv_loop(), name="tokenizer-manager-recv")

    async def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        if self._task is not None:
            self._task.cancel()
        if self._ctx is not None:
            for sock in self._sends:
                sock.close(linger=0)
            self._recv.close(linger=0)
            self._ctx.term()
            self._ctx = None

    # ---- requests ------------------------------------------------------------------------

    async def prepare(self, call: GenerateCall) -> list[GenerateRequest]:
        """Tokenize and validate, off the event loop (raises RequestError /
        SamplingParamsError: HTTP 400). Request ids already in use are refused by `submit`,
        where they are registered."""
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool,
            lambda: build_requests(
                call,
                self._encode_tokenizer,
                self.info.vocab_size,
                context_length=self.info.context_length,
            ),
        )

    async def run_tokenizer(self, fn: Callable[[Any], T]) -> T:
        """``fn(tokenizer)`` in the tokenize thread, on its own tokenizer copy (so big inputs
        to /tokenize or a chat render never stall the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, lambda: fn(self._encode_tokenizer)
        )

    async def submit(self, msgs: list[GenerateRequest], text_in_logprobs: bool) -> _Group:
        """Send prepared requests to the scheduler; raises ServiceUnavailable."""
        if self.unavailable:
            raise ServiceUnavailable(self.unavailable)
        taken = next((m.rid for m in msgs if m.rid in self.states), None)
        if taken is not None:  # checked before registering any, so a refusal leaves nothing
            raise RequestError(f"request id {taken!r} is already in use", "rid")
        ranks = self._place(msgs)
        group = _Group()
        for i, m in enumerate(msgs):
            state = _ReqState(m, ResponseBuilder(self.tokenizer, m, text_in_logprobs), i, group)
            state.rank = ranks[i]
            group.states.append(state)
            self.states[m.rid] = state
        sent = 0
        try:
            for m, rank in zip(msgs, ranks):
                await self._sends[rank].send_pyobj(m)
                sent += 1
        except BaseException:  # e.g. the client left mid-submit: leave nothing behind
            for i, state in enumerate(group.states):
                if i < sent:
                    self.abort(state.msg.rid)
                    state.finished = state.detached = True
                else:
                    self.states.pop(state.msg.rid, None)
                    self.coordinator.finished(state.rank)
            raise
        return group

    def _place(self, msgs: list[GenerateRequest]) -> list[int]:
        """Each request's replica; all or none are counted as placed."""
        ranks: list[int] = []
        try:
            for m in msgs:
                ranks.append(
                    self.coordinator.place(m.input_ids, m.data_parallel_rank, m.bootstrap_room)
                )
        except PlacementError as e:
            for rank in ranks:
                self.coordinator.finished(rank)
            if self.coordinator.live_ranks:
                raise RequestError(str(e), "data_parallel_rank") from None
            raise ServiceUnavailable(str(e)) from None
        return ranks

    async def generate(self, call: GenerateCall) -> list[dict]:
        """Run a call to completion: one native response dict per sample, in order."""
        group = await self.submit(await self.prepare(call), call.return_text_in_logprobs)
        try:
            await self.wait(group)
        finally:
            self.abort_unfinished(group)
        return [s.result() for s in group.states]

    async def wait(self, group: _Group) -> None:
        """Until every sample finished; raises ServiceUnavailable / RequestFailed."""
        while not all(s.finished for s in group.states):
            await group.updates.get()
        self._raise_failures(group)

    async def stream(self, group: _Group) -> AsyncIterator[tuple[int, dict]]:
        """(sample index, cumulative response) whenever a sample's text grows, and once more
        when it finishes (with its finish_reason). Raises ServiceUnavailable / RequestFailed."""
        pending = {s.index for s in group.states}
        while pending:
            i = await group.updates.get()
            s = group.states[i]
            if i not in pending:
                continue
            if s.finished:
                pending.discard(i)
                if s.unavailable or s.failed_message:
                    self._raise_failures(group)
                yield i, s.result()
            elif len(s.text) > s.sent_len or (s.msg.return_logprob and s.builder.output_ids):
                s.sent_len = len(s.text)
                yield i, s.builder.result(s.text, streaming=True)

    def _raise_failures(self, group: _Group) -> None:
        for s in group.states:
            if s.unavailable:
                raise ServiceUnavailable(s.unavailable)
        for s in group.states:
            if s.failed_message:
                raise RequestFailed(s.failed_message, s.builder.error_status)

    def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        if not self._sends or self.unavailable:
            return
        state = None if rid is None else self.states.get(rid)
        ranks = [state.rank] if state is not None else self.coordinator.live_ranks
        for rank in ranks:
            self._sends[rank].send_pyobj(AbortRequest(rid=rid, abort_all=abort_all))

    def abort_rid(self, rid: str) -> list[str]:
        """Abort a request by the id the client gave (all its samples when n > 1); returns the
        sample ids that were still pending. Their responses end with finish_reason abort."""
        hits = [r for r in self.states if r == rid or r.rsplit("-", 1)[0] == rid]
        for r in hits:
            self.abort(r)
        return hits

    def abort_all(self) -> None:
        self.abort(abort_all=True)

    def abort_unfinished(self, group: _Group) -> None:
        """The client is gone or the handler failed: free what the group still holds."""
        for s in group.states:
            if not s.finished:
                self.abort(s.msg.rid)
                # Nobody waits for it any more, but its final (abort) output still counts in
                # the metrics; the state goes when that output arrives.
                s.finished = s.detached = True

    async def flush_cache(self, timeout: float = 30.0) -> bool:
        if self.unavailable:
            raise ServiceUnavailable(self.unavailable)
        # Every live replica flushes; the flush succeeds when all of them did.
        loop = asyncio.get_running_loop()
        ids = {rank: uuid.uuid4().hex for rank in self.coordinator.live_ranks}
        futs = []
        for rank, request_id in ids.items():
            fut = loop.create_future()
            self._flushes[request_id] = fut
            futs.append(fut)
            await self._sends[rank].send_pyobj(FlushCacheRequest(request_id))
        try:
            ok = all(await asyncio.wait_for(asyncio.gather(*futs), timeout))
        finally:
            for request_id in ids.values():
                self._flushes.pop(request_id, None)
        if ok:
            self.coordinator.clear_cache()
        return ok

    async def shutdown_workers(self) -> None:
        if not self._sends or self.unavailable:
            return
        live = self.coordinator.live_ranks
        for rank in live:
            await self._sends[rank].send_pyobj(ShutdownRequest(replicas=len(live)))

    def fail_replica(self, rank: int, message: str) -> None:
        """Replica ``rank`` died (and ``--dp-tolerate-failure`` is set): its requests get HTTP
        503, new requests go to the others; with none left, the server is unavailable."""
        self.coordinator.mark_dead(rank)
        self.rank_stats.pop(rank, None)
        if not self.coordinator.live_ranks:
            self.fail_all(message)
            return
        self._fail_requests(lambda s: s.rank == rank, message)
        # A flush in flight waits for every replica's answer: it can no longer succeed.
        for fut in self._flushes.values():
            if not fut.done():
                fut.set_result(False)

    def fail_all(self, message: str) -> None:
        """A worker died: every pending and future request gets HTTP 503."""
        self.unavailable = message
        self._fail_requests(lambda s: True, message)
        for fut in self._flushes.values():
            if not fut.done():
                fut.set_exception(ServiceUnavailable(message))

    def _fail_requests(self, which: Callable[[_ReqState], bool], message: str) -> None:
        for rid, s in list(self.states.items()):
            if which(s):
                del self.states[rid]
                s.unavailable = message
                s.finished = True
                s.group.updates.put_nowait(s.index)

    @property
    def num_pending(self) -> int:
        return len(self.states)

    @property
    def stats(self) -> SchedulerStats | None:
        """The whole server's latest scheduler gauges (None before the first report)."""
        parts = list(self.rank_stats.values())
        if len(parts) <= 1:
            return parts[0] if parts else None
        return SchedulerStats.combined(parts)

    # ---- outputs -------------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        while True:
            msg = await self._recv.recv_pyobj()
            try:
                if isinstance(msg, BatchTextOutput):
                    now = time.perf_counter()
                    for t in msg.outputs:
                        self._on_output(t, now)
                elif isinstance(msg, SchedulerStats):
                    self.rank_stats[msg.dp_rank] = msg
                    if self.metrics:
                        self.metrics.set_scheduler_stats(msg)
                elif isinstance(msg, FlushCacheResult):
                    fut = self._flushes.get(msg.request_id)
                    if fut is not None and not fut.done():
                        fut.set_result(msg.success)
            except Exception:  # a bug here must not stop every other request's delivery
                logger.exception("failed to handle %s", type(msg).__name__)

    def _on_output(self, t: TextOutput, now: float) -> None:
        o = t.out
        s = self.states.get(o.rid)
        if s is None:
            return  # aborted by the front end already
        s.builder.absorb(o)
        if t.text is not None:
            s.text = t.text
        if o.new_token_ids:
            self._observe_tokens(s, len(o.new_token_ids), now)
        if o.finished:
            s.finished = True
            del self.states[o.rid]
            self.coordinator.finished(s.rank, _cached_ids(s))
            self.num_finished += 1
            e2e = now - s.created
            if self.metrics:
                self.metrics.request_finished(
                    o.prompt_tokens, o.completion_tokens, o.cached_tokens, e2e
                )
            if self.log_requests:
                logger.info(
                    "request %s: %d prompt (%d cached) + %d completion tokens, %.3fs, %s",
                    o.rid, o.prompt_tokens, o.cached_tokens, o.completion_tokens, e2e,
                    o.finish_reason,
                )  # fmt: skip
        s.group.updates.put_nowait(s.index)

    def _observe_tokens(self, s: _ReqState, n: int, now: float) -> None:
        if self.metrics is None:
            return
        if s.first_token_at is None:
            s.first_token_at = now
            self.metrics.ttft.observe(now - s.created)
            n -= 1
        if n > 0 and s.last_token_at is not None:
            gap = (now - s.last_token_at) / n
            for _ in range(n):
                self.metrics.itl.observe(gap)
        s.last_token_at = now


def _cached_ids(s: _ReqState) -> list[int]:
    """The tokens a finished request left in its replica's cache (prompt + output)."""
    return [*s.msg.input_ids, *s.builder.output_ids]
