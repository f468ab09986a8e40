"""The decode side of prefill/decode disaggregation, as a component the scheduler calls.

Every request a decode server accepts carries ``bootstrap_host``/``bootstrap_port``/
``bootstrap_room``. The scheduler hands it to ``DecodeManager.accept``, and it moves through
three states, each polled once per scheduler step (nothing here blocks the loop):

1. ``LOOKUP``: the prefill ranks are asked of the bootstrap service, on a worker thread (the
   answer is cached per bootstrap address); the room's rank is group ``room % prefill dp size``.
2. ``RESERVE`` -> ``TRANSFERRING``: once memory allows, the manager reserves a request-table row,
   one KV slot per prompt token, and a first-token record, then sends the prefill rank one JSON
   message over ZMQ PUSH (``peer_messages``: room, this engine's session id, KV layout, slot
   list, first-token buffer layout and record index, a digest of the prompt).
3. The prefill side writes the KV, then the record (status last). A record whose room matches
   and whose status is ``OK`` makes the request a normal decoding request: output = [first
   token], ``kv_len`` = prompt length, its slots private (they enter the radix cache when it
   finishes, like any request's).

A constrained request's grammar compiles (on the scheduler's grammar queue) while its KV
moves; the first token, sampled under the constraint by the prefill side, is fed to it on
arrival (``Scheduler._advance``: stop checks and jump-forward as after any sampled token).

Failures answer the client at once and never hang: ``FAILED`` in the record (503), no answer
within ``--disaggregation-timeout`` of acceptance (504), a prefill server that stops listening
(503; found by a heartbeat to its bootstrap service about once a second while rooms wait on
it), an abort. Who frees what: the decode side owns its reservation from RESERVE until the
request joins the running batch (then the scheduler frees it as usual) or fails. A failed
room whose transfer request was sent may still be written by a prefill side that is alive, so
its slots and record go to quarantine, not back to the pool: the manager sends the prefill side
a cancel and frees them when the record shows the room ended (the prefill side writes a record
after any write in flight), or after another timeout (a prefill side that died), or at once
when the prefill server is known to be gone.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from smallm.runtime.cache.slot_allocator import SlotAllocator
from smallm.runtime.disaggregation.bootstrap import BootstrapClient, BootstrapError
from smallm.runtime.disaggregation.kv_plan import (
    FirstToken,
    FirstTokenBuffer,
    FirstTokenStatus,
    KVLayout,
    KVLayoutMismatch,
    plan_bytes,
)
from smallm.runtime.disaggregation.peer_messages import (
    encode_cancel,
    encode_transfer_request,
    prompt_digest,
)
from smallm.runtime.disaggregation.transfer import create_transfer_engine, join_session
from smallm.runtime.disaggregation.transfer_counters import TransferCounters
from smallm.runtime.scheduler.grammar_queue import grammar_spec
from smallm.runtime.scheduler.request import Phase, Req

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0


@dataclass
class _Pending:
    req: Req
    since: float
    address: str  # the bootstrap service, "host:port"
    lookup: Future
    target: str | None = None  # the prefill rank's ZMQ address, once known
    record: int = -1  # first-token record index, once reserved
    slots: np.ndarray | None = None
    sent_at: float | None = None  # when the transfer request went out
    grammar_ready: bool = True  # a constrained request's grammar, compiled beside the transfer


@dataclass
class _Quarantined:
    """A failed room's slots and record, kept until no late write can land in them."""

    room: int
    slots: np.ndarray
    record: int
    since: float


class DecodeManager:
    """Requests whose prompt KV comes from a prefill server, until it has arrived."""

    def __init__(self, scheduler: Any, args: Any) -> None:
        import zmq

        self.scheduler = scheduler
        self.timeout = float(args.disaggregation_timeout)
        self.engine = create_transfer_engine(
            args.disaggregation_transfer_backend, args.host, timeout=self.timeout
        )
        pool = scheduler.pool
        # Reserve each prompt's slots in runs of consecutive ids: a decode server's own
        # one-slot-per-step growth interleaves requests, and scattered slots cost Mooncake one
        # range per token (about 100x slower; see docs/benchmarks.md, bench_pd).
        self.contiguous = not args.disable_pd_contiguous_kv
        self.layout = KVLayout.of(pool)
        self.engine.register(self.layout.base_ptr, pool.nbytes)
        n = scheduler.table.max_requests
        self.records = FirstTokenBuffer(n)
        self.engine.register(self.records.layout().base_ptr, self.records.nbytes)
        self.free_records = SlotAllocator(n)
        self.lookups = ThreadPoolExecutor(1, thread_name_prefix="pd-bootstrap")
        # bootstrap "host:port" -> lookup of its ranks (one per data-parallel group)
        self.targets: dict[str, Future] = {}
        self.heartbeats: dict[str, tuple[float, Future | None]] = {}  # address -> (last, check)
        self.ctx = zmq.Context()
        self.sockets: dict[str, Any] = {}
        self.pending: list[_Pending] = []
        self.quarantine: list[_Quarantined] = []
        self.counters = TransferCounters()  # for /metrics

    # ---- scheduler hooks ---------------------------------------------------------------

    def accept(self, r: Req, out: list) -> bool:
        """Take every new request (True); one without bootstrap fields fails at once."""
        msg = r.msg
        if msg.bootstrap_room is None:
            out.append(
                _error(
                    r,
                    "this is a decode server (--disaggregation-mode decode): "
                    "requests need bootstrap_host, bootstrap_port and bootstrap_room",
                )
            )
            return True
        constraint = grammar_spec(msg.params)
        if constraint is not None:
            # The prefill side samples the first token under the constraint; the grammar
            # compiles here meanwhile and takes that token when the KV arrives.
            error = self.scheduler.grammars.add(r, *constraint)
            if error:
                out.append(_error(r, error))
                return True
        address = join_session(msg.bootstrap_host, msg.bootstrap_port)
        lookup = self.targets.get(address)
        if lookup is None or (lookup.done() and lookup.exception() is not None):
            lookup = self.lookups.submit(self._lookup, address)
            self.targets[address] = lookup
        self.pending.append(
            _Pending(r, time.monotonic(), address, lookup, grammar_ready=constraint is None)
        )
        return True

    def grammar_compiled(self, r: Req, error: str | None, out: list) -> bool:
        """A grammar finished compiling: True when it was one of the pending requests' (then
        it is this manager's: ready, or failed with ``error``, a 400)."""
        for p in self.pending:
            if p.req is r:
                if error is None:
                    p.grammar_ready = True
                else:
                    self._fail(p, out, error, status=400)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.pending or self.quarantine)

    @property
    def wake_sockets(self) -> list:
        """(Nothing arrives on sockets here: KV and records land in memory; see ``poll``.)"""
        return []

    def hold(self, r: Req) -> bool:
        """A finished request: the scheduler releases it as usual."""
        return False

    def fail_room(self, room: int | None) -> None:
        """(The prefill side's hook; a decode server's running requests own their KV.)"""

    def poll(self, out: list) -> None:
        """Advance every pending request by what has happened since the last step."""
        now = time.monotonic()
        self._release_quarantine(now)
        gone = self._heartbeat(now)
        for p in list(self.pending):
            if p.address in gone:
                self._fail(p, out, f"the prefill server at {p.address} is gone", dead=True)
                continue
            if now - p.since > self.timeout:
                self._fail(
                    p,
                    out,
                    f"no KV from the prefill server within "
                    f"{self.timeout:g} s (--disaggregation-timeout)",
                    status=504,
                )
                continue
            if p.target is None:
                if not p.lookup.done():
                    continue
                try:
                    targets = p.lookup.result()
                    p.target = targets[p.req.msg.bootstrap_room % len(targets)]
                except (BootstrapError, KVLayoutMismatch, ValueError, KeyError) as e:
                    self.counters.bootstrap_failures += 1
                    self._fail(p, out, f"bootstrap failed: {e}")
                    continue
            if p.sent_at is None:
                if not self._reserve(p):
                    continue  # no memory yet: try again next step
                self._send(p)
                continue
            record = self._outcome(p.record, p.req.msg.bootstrap_room)
            if record is None:
                continue
            if record.status is FirstTokenStatus.OK and not p.grammar_ready:
                continue  # the KV is here; the grammar that takes its first token is not yet
            if record.status is FirstTokenStatus.FAILED:
                # The record is final: nothing more is written for this room, free it all.
                self._fail(p, out, record.reason.explain())
                continue
            self._start_decoding(p, record.token_id, record.logprob, out)

    # ---- steps -------------------------------------------------------------------------

    def _lookup(self, address: str) -> list[str]:
        """Every data-parallel group's prefill rank at ``address``: their ZMQ addresses, by
        group (room R is computed by group R % len)."""
        client = BootstrapClient(address, timeout=min(self.timeout, 5.0))
        targets = []
        try:
            for group in range(client.parallel_info().prefill_dp_size):
                info = client.lookup(0, group, 0)
                if info.kv_layout is not None:
                    KVLayout.from_dict(info.kv_layout).check_compatible(self.layout)
                targets.append(f"tcp://{join_session(info.rank_ip, info.rank_port)}")
        finally:
            client.close()
        return targets

    def _heartbeat(self, now: float) -> set[str]:
        """Check, about once a second, that each prefill server with rooms in flight still
        listens; return the addresses found gone (their cached lookups are dropped: a
        restarted prefill server registers a new rank address)."""
        waiting = {p.address for p in self.pending if p.sent_at is not None}
        gone = set()
        for address in waiting:
            last, check = self.heartbeats.get(address, (now, None))
            if check is None:
                if now - last >= HEARTBEAT_INTERVAL_S:
                    last, check = now, self.lookups.submit(self._alive, address)
                self.heartbeats[address] = (last, check)
            elif check.done():
                self.heartbeats[address] = (now, None)
                if not check.result():
                    gone.add(address)
                    self._forget(address)
        for address, (_, check) in list(self.heartbeats.items()):
            if address not in waiting and check is None:
                del self.heartbeats[address]
        return gone

    def _alive(self, address: str) -> bool:
        client = BootstrapClient(address, timeout=min(self.timeout, 5.0))
        try:
            return client.alive()
        finally:
            client.close()

    def _forget(self, address: str) -> None:
        lookup = self.targets.pop(address, None)
        if lookup is not None and lookup.done() and lookup.exception() is None:
            for target in lookup.result():
                sock = self.sockets.pop(target, None)
                if sock is not None:
                    sock.close(linger=0)

    def _reserve(self, p: _Pending) -> bool:
        s = self.scheduler
        n = len(p.req.prompt_ids)
        committed = sum(s._reserve(o) + o.seq_len - o.kv_len for o in s.running)
        if (
            s.table.num_free == 0
            or len(s.running) >= s.max_running
            or self.free_records.num_free == 0
            or n + s._reserve(p.req) + committed > s.pool.num_free + s.cache.evictable_size
            or not s._ensure_free(n)
        ):
            return False
        r = p.req
        r.req_pool_index = s.table.alloc()
        p.slots = s.pool.alloc(n, contiguous=self.contiguous)
        s.table.write(r.req_pool_index, 0, p.slots)
        p.record = int(self.free_records.alloc(1)[0])
        self.records.clear(p.record)
        return True

    def _socket(self, target: str):
        import zmq

        sock = self.sockets.get(target)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(target)
            self.sockets[target] = sock
        return sock

    def _send(self, p: _Pending) -> None:
        message = encode_transfer_request(
            p.req.msg.bootstrap_room,
            self.engine.session_id,
            self.layout.to_dict(),
            p.slots.tolist(),
            self.records.layout().to_dict(),
            p.record,
            prompt_digest(p.req.prompt_ids),
        )
        # PUSH queues the message until the prefill rank is connected; never blocks here.
        self._socket(p.target).send(message)
        p.sent_at = time.monotonic()

    def _start_decoding(self, p: _Pending, token: int, logprob: float | None, out: list) -> None:
        s = self.scheduler
        r = p.req
        self.pending.remove(p)
        self._free_record(p.record)
        r.locked_node = s.cache.root
        s.cache.lock(r.locked_node)
        r.kv_len = len(r.prompt_ids)
        r.admitted_once = True
        r.output_ids.append(token)
        r.pending_ids.append(token)
        if r.msg.return_logprob and logprob is not None:
            r.pending_logprobs.append((logprob, token))
        r.phase = Phase.DECODE
        s._advance(r, token)  # grammar, stop conditions, jump-forward (which may set PREFILL)
        self.counters.succeeded(plan_bytes(self.layout, r.kv_len), time.monotonic() - p.sent_at)
        if r.finish_reason is not None:
            s._release(r)
            r.phase = Phase.FINISHED
        else:
            s.running.append(r)
        out.append(s._output(r))

    def _fail(
        self, p: _Pending, out: list, message: str, status: int = 503, dead: bool = False
    ) -> None:
        """Fail a pending request (503: its KV did not arrive; the client is not at fault).
        ``dead``: its prefill server is gone, so nothing can write into its slots any more."""
        s = self.scheduler
        self.pending.remove(p)
        if not p.grammar_ready:  # still compiling: it must not come back as a local request
            s.grammars.remove(lambda r: r is p.req)
        if p.slots is not None:
            s.table.free(p.req.req_pool_index)  # only this side writes the table
            p.req.req_pool_index = -1
            room = p.req.msg.bootstrap_room
            final = p.sent_at is not None and self._outcome(p.record, room) is not None
            if p.sent_at is None or final or dead:
                s.pool.free(p.slots)
                self._free_record(p.record)
            else:
                sock = self.sockets.get(p.target)
                if sock is not None:
                    sock.send(encode_cancel(room))
                self.quarantine.append(_Quarantined(room, p.slots, p.record, time.monotonic()))
            if p.sent_at is not None:
                self.counters.transfer_failures += 1
        logger.warning("request %s (room %s): %s", p.req.rid, p.req.msg.bootstrap_room, message)
        out.append(_error(p.req, message, status))

    def _release_quarantine(self, now: float) -> None:
        for q in list(self.quarantine):
            ended = self._outcome(q.record, q.room) is not None
            if ended or now - q.since > self.timeout:
                if not ended:
                    logger.warning(
                        "room %d: no word from the prefill server %g s after the cancel; "
                        "reusing its %d slots",
                        q.room,
                        self.timeout,
                        len(q.slots),
                    )
                self.quarantine.remove(q)
                self.scheduler.pool.free(q.slots)
                self._free_record(q.record)

    def report(self, stats) -> None:
        """Fill ``stats``' disaggregation fields (see ``TransferCounters.report``)."""
        self.counters.report(stats)
        sent = sum(1 for p in self.pending if p.sent_at is not None)
        stats.pd_prealloc_queue_reqs = len(self.pending) - sent
        stats.pd_transfer_queue_reqs = sent
        stats.kv_quarantined_tokens = sum(len(q.slots) for q in self.quarantine)

    def _outcome(self, record: int, room: int) -> FirstToken | None:
        """Record ``record``'s final word on ``room`` (OK or FAILED: nothing more will be
        written for it), or None while it is pending or holds an older room's record."""
        token = self.records.get(record)
        if token.room != room or token.status is FirstTokenStatus.PENDING:
            return None
        return token

    def _free_record(self, record: int) -> None:
        if record >= 0:
            self.records.clear(record)
            self.free_records.free([record])

    def remove(self, hit) -> list[Req]:
        """Drop pending requests ``hit`` selects (aborts), freeing what they reserved."""
        dropped = []
        for p in [p for p in self.pending if hit(p.req)]:
            self._fail(p, [], "aborted")
            dropped.append(p.req)
        return dropped

    def close(self) -> None:
        self.lookups.shutdown(wait=False, cancel_futures=True)
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.ctx.term()
        self.engine.close()


def _error(r: Req, message: str, status: int = 400):
    from smallm.runtime.scheduler.scheduler import _abort_output

    return _abort_output(r.msg, message, status)
