"""The decode side of prefill/decode disaggregation, as a component the scheduler calls.

Every request a decode server accepts carries ``bootstrap_host``/``bootstrap_port``/
``bootstrap_room``. The scheduler hands it to ``DecodeManager.accept``, and it moves through
three states, each polled once per scheduler step (nothing here blocks the loop):

1. ``LOOKUP``: the prefill rank for the room is asked of the bootstrap service, on a worker
   thread (the answer is cached per bootstrap address).
2. ``RESERVE`` -> ``TRANSFERRING``: once memory allows, the manager reserves a request-table row,
   one KV slot per prompt token, and a first-token record, then sends the prefill rank one JSON
   message over ZMQ PUSH (``TransferRequest``: room, this engine's session id, KV layout, slot
   list, first-token buffer layout and record index).
3. The prefill side writes the KV, then the record (status last). A record whose room matches
   and whose status is ``OK`` makes the request a normal decoding request: output = [first
   token], ``kv_len`` = prompt length, its slots private (they enter the radix cache when it
   finishes, like any request's). ``FAILED``, or no answer within ``--disaggregation-timeout``
   of acceptance, fails the request with an error and frees its row, slots and record.

Who frees what: the decode side owns its reservation from RESERVE until the request either
joins the running batch (then the scheduler frees it as usual) or fails (then this manager does).
The prefill side frees its own copy once it has written (or failed to write) the room.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from smallm.runtime.cache.slot_allocator import SlotAllocator
from smallm.runtime.disaggregation.bootstrap import BootstrapClient, BootstrapError
from smallm.runtime.disaggregation.kv_plan import (
    FirstTokenBuffer,
    FirstTokenStatus,
    KVLayout,
    KVLayoutMismatch,
    plan_bytes,
)
from smallm.runtime.disaggregation.transfer import create_transfer_engine
from smallm.runtime.scheduler.request import Phase, Req

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    req: Req
    since: float
    lookup: Future | None = None
    target: str | None = None  # the prefill rank's ZMQ address, once known
    record: int = -1  # first-token record index, once reserved
    slots: np.ndarray | None = None
    sent: bool = False


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
        self.layout = KVLayout.of(pool)
        self.engine.register(self.layout.base_ptr, pool.nbytes)
        n = scheduler.table.max_requests
        self.records = FirstTokenBuffer(n)
        self.engine.register(self.records.layout().base_ptr, self.records.nbytes)
        self.free_records = SlotAllocator(n)
        self.lookups = ThreadPoolExecutor(1, thread_name_prefix="pd-bootstrap")
        self.targets: dict[str, Future] = {}  # bootstrap "host:port" -> lookup of rank 0
        self.ctx = zmq.Context()
        self.sockets: dict[str, Any] = {}
        self.pending: list[_Pending] = []
        self.transfers = 0  # requests whose KV arrived
        self.transfer_bytes = 0  # ... and its size

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
        if r.grammar is not None or _constrained(msg.params):
            out.append(_error(r, "constrained decoding is not supported with disaggregation yet"))
            return True
        host = f"[{msg.bootstrap_host}]" if ":" in msg.bootstrap_host else msg.bootstrap_host
        address = f"{host}:{msg.bootstrap_port}"
        lookup = self.targets.get(address)
        if lookup is None or (lookup.done() and lookup.exception() is not None):
            lookup = self.lookups.submit(self._lookup, address)
            self.targets[address] = lookup
        self.pending.append(_Pending(r, time.monotonic(), lookup))
        return True

    def has_work(self) -> bool:
        return bool(self.pending)

    def hold(self, r: Req) -> bool:
        """A finished request: the scheduler releases it as usual."""
        return False

    def poll(self, out: list) -> None:
        """Advance every pending request by what has happened since the last step."""
        now = time.monotonic()
        for p in list(self.pending):
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
                    p.target = p.lookup.result()
                except (BootstrapError, KVLayoutMismatch, ValueError, KeyError) as e:
                    self._fail(p, out, f"bootstrap failed: {e}")
                    continue
            if not p.sent:
                if not self._reserve(p):
                    continue  # no memory yet: try again next step
                self._send(p)
                continue
            record = self.records.get(p.record)
            if record.room != p.req.msg.bootstrap_room or record.status is FirstTokenStatus.PENDING:
                continue
            if record.status is FirstTokenStatus.FAILED:
                self._fail(p, out, "the prefill server failed to compute or send this request")
                continue
            self._start_decoding(p, record.token_id, record.logprob, out)

    # ---- steps -------------------------------------------------------------------------

    def _lookup(self, address: str) -> str:
        client = BootstrapClient(address, timeout=min(self.timeout, 5.0))
        try:
            info = client.lookup(0, 0, 0)
        finally:
            client.close()
        if info.kv_layout is not None:
            KVLayout.from_dict(info.kv_layout).check_compatible(self.layout)
        host = f"[{info.rank_ip}]" if ":" in info.rank_ip else info.rank_ip
        return f"tcp://{host}:{info.rank_port}"

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
        p.slots = s.pool.alloc(n)
        s.table.write(r.req_pool_index, 0, p.slots)
        p.record = int(self.free_records.alloc(1)[0])
        self.records.clear(p.record)
        return True

    def _send(self, p: _Pending) -> None:
        import zmq

        sock = self.sockets.get(p.target)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.connect(p.target)
            self.sockets[p.target] = sock
        message = {
            "room": p.req.msg.bootstrap_room,
            "session_id": self.engine.session_id,
            "kv_layout": self.layout.to_dict(),
            "slots": p.slots.tolist(),
            "first_token_layout": self.records.layout().to_dict(),
            "record_index": p.record,
        }
        # PUSH queues the message until the prefill rank is connected; never blocks here.
        sock.send(json.dumps(message).encode())
        p.sent = True

    def _start_decoding(self, p: _Pending, token: int, logprob: float | None, out: list) -> None:
        s = self.scheduler
        r = p.req
        self.pending.remove(p)
        self._free_record(p)
        r.locked_node = s.cache.root
        s.cache.lock(r.locked_node)
        r.kv_len = len(r.prompt_ids)
        r.admitted_once = True
        r.output_ids.append(token)
        r.pending_ids.append(token)
        if r.msg.return_logprob and logprob is not None:
            r.pending_logprobs.append((logprob, token))
        self.transfers += 1
        self.transfer_bytes += plan_bytes(self.layout, r.kv_len)
        r.finish_reason = s._check_finished(r, token)
        if r.finish_reason is not None:
            s._release(r)
            r.phase = Phase.FINISHED
        else:
            r.phase = Phase.DECODE
            s.running.append(r)
        out.append(s._output(r))

    def _fail(self, p: _Pending, out: list, message: str, status: int = 503) -> None:
        """Fail a pending request (503: its KV did not arrive; the client is not at fault)."""
        s = self.scheduler
        self.pending.remove(p)
        if p.sent:
            # A late write may still land in these slots; nothing reads them before they are
            # handed out and overwritten again (the record's room guards the record).
            s.pool.free(p.slots)
            s.table.free(p.req.req_pool_index)
            p.req.req_pool_index = -1
            self._free_record(p)
        logger.warning("request %s (room %s): %s", p.req.rid, p.req.msg.bootstrap_room, message)
        out.append(_error(p.req, message, status))

    def _free_record(self, p: _Pending) -> None:
        if p.record >= 0:
            self.records.clear(p.record)
            self.free_records.free([p.record])
            p.record = -1

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


def _constrained(params: Any) -> bool:
    return any(
        getattr(params, name, None) is not None
        for name in ("regex", "json_schema", "ebnf", "structural_tag")
    )


def _error(r: Req, message: str, status: int = 400):
    from smallm.runtime.scheduler.scheduler import _abort_output

    return _abort_output(r.msg, message, status)
