"""The prefill side of prefill/decode disaggregation, as a component the scheduler calls.

A prefill server computes each request's prompt (radix cache included) and samples its first
token, like a plain server with ``max_new_tokens = 1``. Then, instead of releasing the request's
memory, the scheduler hands it to ``PrefillManager.hold``; the manager keeps the request's KV
(its table row and cache lock) until the decode server has said where to write it, writes the
KV pages and then the first-token record into the decode server's memory through the transfer
engine, and only then releases the request.

The decode side's message ("room R: write here") arrives on a ZMQ PULL socket this manager binds
(``tcp://host:port``), registered with the bootstrap service as the rank's ``rank_ip`` /
``rank_port``, as SGLang does. It is one JSON object (see ``disagg_decode.TransferRequest``).

Limits of this first slice: one rank (dp 1, tp 1); the write runs on the scheduler's thread
(bounded by ``--disaggregation-timeout``), not on a transfer thread.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from smallm.runtime.disaggregation.bootstrap import (
    BootstrapClient,
    BootstrapServer,
    PrefillRankInfo,
)
from smallm.runtime.disaggregation.kv_plan import (
    FirstToken,
    FirstTokenBuffer,
    FirstTokenLayout,
    FirstTokenStatus,
    KVLayout,
    transfer_plan,
)
from smallm.runtime.disaggregation.transfer import TransferError, create_transfer_engine
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
            arrival=time.monotonic(),
        )


class PrefillManager:
    """Bootstrap service, transfer engine and the requests whose KV waits for a destination."""

    def __init__(self, scheduler: Any, args: Any) -> None:
        import zmq

        self.scheduler = scheduler
        self.timeout = float(args.disaggregation_timeout)
        self.host = args.host
        self.engine = create_transfer_engine(
            args.disaggregation_transfer_backend, self.host, timeout=self.timeout
        )
        pool = scheduler.pool
        self.layout = KVLayout.of(pool)
        self.engine.register(self.layout.base_ptr, pool.nbytes)
        # One staging record suffices: writes are synchronous, one at a time.
        self.staging = FirstTokenBuffer(1)
        self.engine.register(self.staging.layout().base_ptr, self.staging.nbytes)
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.port = self.inbox.bind_to_random_port(f"tcp://{self.host}")
        # SGLang runs the bootstrap service beside the prefill server; here it runs on a thread
        # of the (single) scheduler process.
        self.bootstrap = BootstrapServer(self.host, args.disaggregation_bootstrap_port)
        self.bootstrap.start_in_thread()
        client = BootstrapClient(f"{self.host}:{self.bootstrap.port}")
        client.register(
            PrefillRankInfo(
                rank_ip=self.host,
                rank_port=self.port,
                session_id=self.engine.session_id,
                kv_layout=self.layout.to_dict(),
            )
        )
        client.close()
        self.destinations: dict[int, Destination] = {}
        # room -> (request, since, first token's logprob): the scheduler clears the request's
        # pending logprobs when it reports them, so the logprob is kept here.
        self.held: dict[int, tuple[Req, float, float | None]] = {}
        self.transfer_bytes = 0
        self.transfers = 0

    # ---- scheduler hooks ---------------------------------------------------------------

    def accept(self, r: Req, out: list) -> bool:
        """A new request: compute its prompt and first token only. Never consumes it."""
        if r.msg.bootstrap_room is None:
            return False  # no decode side waits for it: served as a plain request
        r.msg.params.max_new_tokens = min(r.msg.params.max_new_tokens, 1)
        return False

    def hold(self, r: Req) -> bool:
        """r finished its prefill (first token sampled): keep its KV until it is written.
        True when the manager took r (the scheduler must not release it)."""
        room = r.msg.bootstrap_room
        if room is None or r.req_pool_index < 0 or not r.output_ids:
            if room is not None:
                self._fail_room(room)
            return False
        logprob = r.pending_logprobs[0][0] if r.pending_logprobs else None
        dest = self.destinations.pop(room, None)
        if dest is not None:
            self._send(r, logprob, dest)
            return False  # written (or failed): the scheduler releases r now
        self.held[room] = (r, time.monotonic(), logprob)
        return True

    def has_work(self) -> bool:
        return bool(self.held)

    def remove(self, hit) -> list[Req]:
        """Aborts: a request held for its transfer has already answered its client."""
        return []

    def poll(self, out: list) -> None:
        """Take the decode side's messages; write held requests whose destination arrived;
        release what waited longer than the timeout."""
        import zmq

        while True:
            try:
                raw = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                dest = Destination.from_json(json.loads(raw))
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("ignoring a malformed transfer request: %s", e)
                continue
            held = self.held.pop(dest.room, None)
            if held is not None:
                self._send(held[0], held[2], dest)
                self.scheduler._release(held[0])
            else:
                self.destinations[dest.room] = dest
        now = time.monotonic()
        for room, (r, since, _) in list(self.held.items()):
            if now - since > self.timeout:
                logger.warning("room %d: no decode server asked for its KV; dropping it", room)
                del self.held[room]
                self.scheduler._release(r)
        for room, dest in list(self.destinations.items()):
            if now - dest.arrival > self.timeout:
                del self.destinations[room]

    # ---- the write -----------------------------------------------------------------------

    def _send(self, r: Req, logprob: float | None, dest: Destination) -> None:
        room = dest.room
        n = len(r.prompt_ids)
        try:
            if len(dest.slots) != n:
                raise ValueError(f"the decode side reserved {len(dest.slots)} slots for {n}")
            src = self.scheduler.table.read(r.req_pool_index, 0, n)
            plan = transfer_plan(self.layout, src, dest.kv_layout, dest.slots)
            self.engine.write(dest.session_id, *plan.as_lists())
            token = FirstToken(room, FirstTokenStatus.OK, r.output_ids[0], logprob)
            self._write_record(token, dest)
        except (TransferError, ValueError) as e:
            logger.warning("room %d: KV transfer failed: %s", room, e)
            self._write_record(FirstToken(room, FirstTokenStatus.FAILED), dest)
            return
        self.transfer_bytes += plan.nbytes
        self.transfers += 1

    def _write_record(self, token: FirstToken, dest: Destination) -> None:
        self.staging.put(0, token)
        plan = self.staging.plan(0, dest.first_token, dest.record_index)
        try:
            self.engine.write(dest.session_id, *plan.as_lists())
        except TransferError as e:
            # The decode side times the room out and frees its slots.
            logger.warning("room %d: cannot write the first-token record: %s", dest.room, e)

    def _fail_room(self, room: int) -> None:
        dest = self.destinations.pop(room, None)
        if dest is not None:
            self._write_record(FirstToken(room, FirstTokenStatus.FAILED), dest)

    def close(self) -> None:
        self.bootstrap.close()
        self.inbox.close(linger=0)
        self.ctx.term()
        self.engine.close()
