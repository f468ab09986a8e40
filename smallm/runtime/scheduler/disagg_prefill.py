"""The prefill side of prefill/decode disaggregation, as a component the scheduler calls.

A prefill server computes each request's prompt (radix cache included) and samples its first
token, like a plain server with ``max_new_tokens = 1``. Then, instead of releasing the request's
memory, the scheduler hands it to ``PrefillManager.hold``; the manager keeps the request's KV
(its table row and cache lock) until the decode server has said where to write it, writes the
KV pages and then the first-token record into the decode server's memory through the transfer
engine, and only then releases the request.

The decode side's messages arrive on a ZMQ PULL socket this manager binds (``tcp://host:port``),
registered with the bootstrap service as the rank's ``rank_ip`` / ``rank_port``, as SGLang does.
Each is one JSON object (see ``disagg_decode``): a transfer request ("room R: write here") or a
cancel ("room R: stop; I gave up on it"). Messages from one decode server arrive in order, so a
cancel always follows its room's transfer request.

Writes run on one transfer thread, in order, so the scheduler keeps computing while KV moves; a
request stays held (its KV pinned) until its write is done. Every room ends with a record the
decode side can see: ``OK`` after the KV, or ``FAILED`` (the request failed or was aborted
here, its prompt differs from the decode side's, the write failed, or the decode side
cancelled). The decode side relies on that: after a cancel it keeps the room's slots until the
record shows the room ended, so no late write lands in memory it has handed out again.

With ``--dp-size N`` each replica runs its own manager, registered with the server's
bootstrap service as data-parallel group ``dp_rank``; the front end sends a request with room
R to replica ``R % N``, where the decode side looks it up.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from smallm.runtime.disaggregation.bootstrap import BootstrapClient, PrefillRankInfo
from smallm.runtime.disaggregation.kv_plan import (
    FailReason,
    FirstToken,
    FirstTokenBuffer,
    FirstTokenLayout,
    FirstTokenStatus,
    KVLayout,
    TransferPlan,
    transfer_plan,
)
from smallm.runtime.disaggregation.peer_messages import prompt_digest
from smallm.runtime.disaggregation.transfer import TransferError, create_transfer_engine
from smallm.runtime.disaggregation.transfer_counters import TransferCounters
from smallm.runtime.scheduler.request import Req

logger = logging.getLogger(__name__)


@dataclass
class Destination:
    """Where the decode side wants room ``room``'s KV and first token written."""

    room: int
    session_id: str
    kv_layout: KVLayout
    slots: list[int]
    first_token: FirstTokenLayout
    record_index: int
    prompt_digest: str | None
    arrival: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Destination:
        return cls(
            room=int(data["room"]),
            session_id=str(data["session_id"]),
            kv_layout=KVLayout.from_dict(data["kv_layout"]),
            slots=[int(s) for s in data["slots"]],
            first_token=FirstTokenLayout.from_dict(data["first_token_layout"]),
            record_index=int(data["record_index"]),
            prompt_digest=data.get("prompt_digest"),
            arrival=time.monotonic(),
        )


@dataclass
class _Held:
    req: Req
    since: float
    logprob: float | None  # the first token's: the scheduler clears pending logprobs


@dataclass
class WriteResult:
    """What the transfer thread did for one room."""

    room: int
    ok: bool
    nbytes: int = 0
    seconds: float = 0.0


class PrefillManager:
    """Bootstrap service, transfer engine and the requests whose KV waits for a destination."""

    def __init__(self, scheduler: Any, args: Any, dp_rank: int = 0) -> None:
        import zmq

        self.scheduler = scheduler
        self.timeout = float(args.disaggregation_timeout)
        self.host = args.host
        self.engine = create_transfer_engine(
            args.disaggregation_transfer_backend, self.host, timeout=self.timeout
        )
        pool = scheduler.pool
        scheduler.contiguous_prefill_kv = not args.disable_pd_contiguous_kv
        self.layout = KVLayout.of(pool)
        self.engine.register(self.layout.base_ptr, pool.nbytes)
        # One staging record suffices: the one transfer thread writes one room at a time.
        self.staging = FirstTokenBuffer(1)
        self.engine.register(self.staging.layout().base_ptr, self.staging.nbytes)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="pd-transfer")
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.port = self.inbox.bind_to_random_port(f"tcp://{self.host}")
        # The server's front end runs the bootstrap service (launch.py); this replica
        # registers as data-parallel group dp_rank, where decode servers look up the rooms
        # with room % dp_size == dp_rank (the front end routes those rooms here).
        client = BootstrapClient.for_request(self.host, args.disaggregation_bootstrap_port)
        try:
            client.register(
                PrefillRankInfo(
                    rank_ip=self.host,
                    rank_port=self.port,
                    system_dp_size=args.dp_size,
                    system_dp_rank=dp_rank,
                    session_id=self.engine.session_id,
                    kv_layout=self.layout.to_dict(),
                )
            )
        finally:
            client.close()
        self.destinations: dict[int, Destination] = {}  # arrived before their request finished
        self.held: dict[int, _Held] = {}  # finished, waiting for their destination
        self.writing: dict[int, tuple[Future, Req | None]] = {}  # on the transfer thread
        # Rooms that will never be written (failed here, or cancelled by the decode side),
        # kept for a timeout so a destination or request arriving later ends at once.
        self.dead_rooms: dict[int, tuple[float, FailReason]] = {}
        # For /metrics; updated on the scheduler's thread only (see _finished_write).
        self.counters = TransferCounters()

    # ---- scheduler hooks ---------------------------------------------------------------

    def accept(self, r: Req, out: list) -> bool:
        """A new request: compute its prompt and first token only. Never consumes it."""
        if r.msg.bootstrap_room is None:
            return False  # no decode side waits for it: served as a plain request
        r.msg.params.max_new_tokens = min(r.msg.params.max_new_tokens, 1)
        return False

    def hold(self, r: Req) -> bool:
        """r finished here: keep its KV until it is written (True: the manager took it, the
        scheduler must not release it). A request that failed or produced no token fails its
        room instead."""
        room = r.msg.bootstrap_room
        if room is None:
            return False
        failed = r.req_pool_index < 0 or not r.output_ids or _aborted(r)
        if failed or self.dead_rooms.pop(room, None) is not None:
            if failed:
                self.fail_room(room)
            return False
        logprob = r.pending_logprobs[0][0] if r.pending_logprobs else None
        held = _Held(r, time.monotonic(), logprob)
        dest = self.destinations.pop(room, None)
        if dest is not None:
            self._start_write(held, dest)
        else:
            self.held[room] = held
        return True

    def fail_room(self, room: int | None) -> None:
        """The request for ``room`` ended here without a first token (refused, aborted):
        tell its decode side, now or when its destination arrives."""
        if room is None:
            return
        dest = self.destinations.pop(room, None)
        if dest is not None:
            self._submit_failure(dest, FailReason.REFUSED)
        else:
            self.dead_rooms[room] = (time.monotonic(), FailReason.REFUSED)

    def grammar_compiled(self, r: Req, error: str | None, out: list) -> bool:
        """(The decode side's hook: a prefill server's constrained requests run as usual.)"""
        return False

    def has_work(self) -> bool:
        # A decode server's message waiting counts: a transfer request or cancel may come
        # while this server has nothing else to do.
        return bool(self.held or self.writing or self.destinations or self.inbox.poll(0))

    @property
    def wake_sockets(self) -> list:
        """Sockets the scheduler process's idle wait should wake up for."""
        return [self.inbox]

    def remove(self, hit) -> list[Req]:
        """Aborts: a request held for its transfer has already answered its client."""
        return []

    def poll(self, out: list) -> None:
        """Take the decode side's messages, start writes whose destination arrived, release
        requests whose write is done, and expire what waited longer than the timeout."""
        import zmq

        while True:
            try:
                raw = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                data = json.loads(raw)
                if data.get("kind") == "cancel":
                    self._cancel(int(data["room"]))
                else:
                    self._destination(Destination.from_json(data))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                logger.warning("ignoring a malformed message from a decode server: %s", e)
        for room, (future, req) in list(self.writing.items()):
            if future.done():
                del self.writing[room]
                self._finished_write(future, req)
        now = time.monotonic()
        for room, held in list(self.held.items()):
            if now - held.since > self.timeout:
                logger.warning("room %d: no decode server asked for its KV; dropping it", room)
                del self.held[room]
                self.scheduler._release(held.req)
        for room, dest in list(self.destinations.items()):
            # The decode side gives up on the room after the timeout and cancels it: keep the
            # destination a while longer, so that the cancel finds it and is answered.
            if now - dest.arrival > 2 * self.timeout:
                del self.destinations[room]
        for room, (since, _) in list(self.dead_rooms.items()):
            if now - since > self.timeout:
                del self.dead_rooms[room]

    def _destination(self, dest: Destination) -> None:
        room = dest.room
        dead = self.dead_rooms.pop(room, None)
        if dead is not None:
            self._submit_failure(dest, dead[1])
        elif room in self.held:
            self._start_write(self.held.pop(room), dest)
        else:
            self.destinations[room] = dest

    def _cancel(self, room: int) -> None:
        """The decode side gave up on ``room``: write nothing more there but the FAILED record
        it waits for. A write already on the transfer thread ends with its own record."""
        if room in self.writing:
            return
        # A request still computing for the room ends at hold().
        self.dead_rooms[room] = (time.monotonic(), FailReason.CANCELLED)
        dest = self.destinations.pop(room, None)
        if dest is not None:
            self._submit_failure(dest, FailReason.CANCELLED)
        held = self.held.pop(room, None)
        if held is not None:  # (unreachable while messages arrive in order; kept for safety)
            self.scheduler._release(held.req)

    # ---- the write -----------------------------------------------------------------------

    def _start_write(self, held: _Held, dest: Destination) -> None:
        """Plan on this thread (the request's slots are stable while it is held), write on
        the transfer thread."""
        r = held.req
        n = len(r.prompt_ids)
        reason, problem = FailReason.PROMPT_MISMATCH, None
        if len(dest.slots) != n:
            problem = f"the decode side reserved {len(dest.slots)} slots for {n}"
        elif dest.prompt_digest is not None and dest.prompt_digest != prompt_digest(r.prompt_ids):
            problem = "the decode side's prompt differs from this side's"
        else:
            try:
                src = self.scheduler.table.read(r.req_pool_index, 0, n)
                plan = transfer_plan(self.layout, src, dest.kv_layout, dest.slots)
            except ValueError as e:  # a destination this pool cannot write (a bad layout)
                reason, problem = FailReason.TRANSFER_FAILED, str(e)
        if problem is not None:
            logger.warning("room %d: cannot transfer: %s", dest.room, problem)
            self.scheduler._release(r)
            self._submit_failure(dest, reason)
            return
        token = FirstToken(dest.room, FirstTokenStatus.OK, r.output_ids[0], held.logprob)
        future = self.writer.submit(self._write, plan, token, dest)
        self.writing[dest.room] = (future, r)

    def _submit_failure(self, dest: Destination, reason: FailReason) -> None:
        token = FirstToken(dest.room, FirstTokenStatus.FAILED, reason=reason)
        future = self.writer.submit(self._write, None, token, dest)
        self.writing[dest.room] = (future, None)

    def _write(
        self, plan: TransferPlan | None, token: FirstToken, dest: Destination
    ) -> WriteResult:
        """On the transfer thread: the KV (if any), then the record; a failed KV write still
        writes a FAILED record, so the decode side learns of it before its timeout."""
        start = time.monotonic()
        ok = plan is not None
        if plan is not None:
            try:
                self.engine.write(dest.session_id, *plan.as_lists())
            except TransferError as e:
                logger.warning("room %d: KV transfer failed: %s", dest.room, e)
                ok = False
                token = FirstToken(
                    dest.room, FirstTokenStatus.FAILED, reason=FailReason.TRANSFER_FAILED
                )
        self.staging.put(0, token)
        record = self.staging.plan(0, dest.first_token, dest.record_index)
        try:
            self.engine.write(dest.session_id, *record.as_lists())
        except TransferError as e:
            # The decode side times the room out and frees its slots.
            logger.warning("room %d: cannot write the first-token record: %s", dest.room, e)
            ok = False
        nbytes = plan.nbytes if ok and plan is not None else 0
        return WriteResult(dest.room, ok, nbytes, time.monotonic() - start)

    def _finished_write(self, future: Future, req: Req | None) -> None:
        if req is not None:
            self.scheduler._release(req)
        try:
            result: WriteResult = future.result()
        except Exception:  # a bug, not a transfer failure: keep serving, say so
            logger.exception("the KV transfer thread failed")
            self.counters.transfer_failures += 1
            return
        if req is None:
            return  # a FAILED record for a room that had no KV to send
        if result.ok:
            self.counters.succeeded(result.nbytes, result.seconds)
        else:
            self.counters.transfer_failures += 1

    def report(self, stats) -> None:
        """Fill ``stats``' disaggregation fields (see ``TransferCounters.report``)."""
        self.counters.report(stats)
        stats.pd_transfer_queue_reqs = len(self.held) + sum(
            1 for _, req in self.writing.values() if req is not None
        )

    def close(self) -> None:
        self.writer.shutdown(wait=True, cancel_futures=True)
        self.inbox.close(linger=0)
        self.ctx.term()
        self.engine.close()


def _aborted(r: Req) -> bool:
    return bool(r.finish_reason) and r.finish_reason.get("type") == "abort"
