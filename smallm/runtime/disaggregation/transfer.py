"""The KV transfer engine contract, the registered-memory bookkeeping, and the backend factory.

A ``TransferEngine`` moves bytes from memory registered in this process into memory a peer
process registered with its own engine, addressed by the peer's ``session_id``. The prefill
server writes KV pages (and the first sampled token) straight into the slots the decode server
reserved; the decode side only registers its pools and waits to be told the write is done
(that notification travels elsewhere, not through the engine).

Implementations: ``MooncakeTransferEngine`` (``mooncake_engine.py``: Mooncake's transfer engine,
TCP transport, no metadata server) and ``FakeTransferEngine`` (``fake_engine.py``: a plain socket,
for plumbing tests). A NIXL engine (UCX over TCP) would be a third subclass.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

TRANSFER_BACKENDS = ("mooncake", "fake")


class TransferError(RuntimeError):
    """A transfer, registration or engine start failed or timed out; the message says why."""


class TransferBackendUnavailable(TransferError):
    """The backend's library (or a system library it loads) is not installed here."""


@dataclass(frozen=True)
class MemoryRegion:
    """``nbytes`` bytes of this process's memory starting at address ``ptr``."""

    ptr: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.ptr + self.nbytes


class RegionTable:
    """The registered regions of one engine, sorted by address; thread-safe.

    Regions may not overlap, so a range is inside registered memory exactly when it lies
    within the single region that starts at or before it.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: dict[int, MemoryRegion] = {}
        self._lock = threading.Lock()

    def add(self, ptr: int, nbytes: int) -> MemoryRegion:
        if not isinstance(ptr, int) or not isinstance(nbytes, int) or ptr <= 0 or nbytes <= 0:
            raise TransferError(f"cannot register ptr={ptr!r} nbytes={nbytes!r}: both must be > 0")
        region = MemoryRegion(ptr, nbytes)
        with self._lock:
            i = bisect.bisect_right(self._starts, ptr)
            before = self._regions[self._starts[i - 1]] if i > 0 else None
            after = self._regions[self._starts[i]] if i < len(self._starts) else None
            if (before is not None and before.end > ptr) or (
                after is not None and after.ptr < region.end
            ):
                raise TransferError(
                    f"cannot register [{ptr:#x}, {region.end:#x}): it overlaps a registered region"
                )
            self._starts.insert(i, ptr)
            self._regions[ptr] = region
        return region

    def remove(self, ptr: int) -> MemoryRegion:
        with self._lock:
            region = self._regions.pop(ptr, None)
            if region is None:
                raise TransferError(f"cannot deregister {ptr:#x}: no region starts there")
            self._starts.remove(ptr)
        return region

    def contains(self, ptr: int, nbytes: int) -> bool:
        """Whether ``[ptr, ptr + nbytes)`` lies inside one registered region."""
        with self._lock:
            i = bisect.bisect_right(self._starts, ptr)
            if i == 0:
                return False
            region = self._regions[self._starts[i - 1]]
        return ptr + nbytes <= region.end

    def regions(self) -> list[MemoryRegion]:
        with self._lock:
            return [self._regions[s] for s in self._starts]


class TransferEngine(ABC):
    """Moves bytes from this process's registered memory into a peer's registered memory.

    Contract, the same for every backend:

    - ``session_id`` is how a peer addresses this engine (``"host:port"``); it is what the
      prefill side is told to write to, and what goes into the bootstrap service.
    - ``register(ptr, nbytes)`` makes a region usable as a write source here and as a write
      destination for peers; regions may not overlap. ``deregister(ptr)`` takes back the region
      that starts at ``ptr``. Both raise ``TransferError`` on bad input.
    - ``write(peer_session, src_ptrs, dst_ptrs, lengths)`` copies ``lengths[i]`` bytes from
      ``src_ptrs[i]`` (registered here) to ``dst_ptrs[i]`` (registered by the peer), for every i,
      and returns only when all of them have landed. It raises ``TransferError`` with a message
      when a range is not registered on either side, the peer is unreachable or dead, or the
      batch takes longer than ``timeout`` seconds: it never hangs. After a failure, any subset of
      the batch may have been written.
    - ``close()`` deregisters everything and stops the engine; it is idempotent.
    """

    def __init__(self, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"transfer timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self._regions = RegionTable()
        self._closed = False

    # ---- the contract ------------------------------------------------------------------

    @property
    @abstractmethod
    def session_id(self) -> str:
        """How a peer addresses this engine, ``"host:port"``."""

    def register(self, ptr: int, nbytes: int) -> None:
        """Make ``[ptr, ptr + nbytes)`` a source for writes and a destination for peers."""
        self._check_open()
        self._regions.add(ptr, nbytes)
        try:
            self._register(ptr, nbytes)
        except BaseException:
            self._regions.remove(ptr)
            raise

    def deregister(self, ptr: int) -> None:
        """Take back the region registered at ``ptr``."""
        self._check_open()
        self._regions.remove(ptr)
        self._deregister(ptr)

    def write(
        self,
        peer_session: str,
        src_ptrs: Sequence[int],
        dst_ptrs: Sequence[int],
        lengths: Sequence[int],
    ) -> None:
        """Copy each ``src_ptrs[i]`` range into the peer's ``dst_ptrs[i]``; synchronous."""
        self._check_open()
        if not (len(src_ptrs) == len(dst_ptrs) == len(lengths)):
            raise TransferError(
                f"write needs as many src_ptrs ({len(src_ptrs)}), dst_ptrs ({len(dst_ptrs)}) "
                f"and lengths ({len(lengths)})"
            )
        if not isinstance(peer_session, str):
            raise TransferError(f"peer session {peer_session!r} is not 'host:port'")
        split_session(peer_session)  # TransferError if malformed
        for src, n in zip(src_ptrs, lengths):
            if n <= 0:
                raise TransferError(f"write lengths must be > 0, got {n}")
            if not self._regions.contains(src, n):
                raise TransferError(
                    f"source range [{src:#x}, {src + n:#x}) is not inside memory registered "
                    "with this engine"
                )
        if not lengths:
            return
        self._write(peer_session, list(src_ptrs), list(dst_ptrs), list(lengths))

    def close(self) -> None:
        """Deregister every region and stop the engine; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for region in self._regions.regions():
            self._regions.remove(region.ptr)
            # closing anyway: the engine's memory goes with it
            with contextlib.suppress(TransferError):
                self._deregister(region.ptr)
        self._close()

    def registered_regions(self) -> list[MemoryRegion]:
        """The regions registered now, by address."""
        return self._regions.regions()

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.session_id
        return f"{type(self).__name__}({state})"

    # ---- what a backend implements -----------------------------------------------------

    @abstractmethod
    def _register(self, ptr: int, nbytes: int) -> None: ...

    @abstractmethod
    def _deregister(self, ptr: int) -> None: ...

    @abstractmethod
    def _write(
        self, peer_session: str, src_ptrs: list[int], dst_ptrs: list[int], lengths: list[int]
    ) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"{type(self).__name__} is closed")


def split_session(session: str) -> tuple[str, int]:
    """``"host:port"`` (``"[v6]:port"`` too) -> ``(host, port)``; TransferError if malformed."""
    host, _, port = session.rpartition(":")
    if not host or not port.isdigit():
        raise TransferError(f"peer session {session!r} is not 'host:port'")
    return host.strip("[]"), int(port)


def join_session(host: str, port: int) -> str:
    """``(host, port)`` -> ``"host:port"``, bracketing an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def create_transfer_engine(backend: str, host: str, *, timeout: float = 30.0) -> TransferEngine:
    """The engine for ``--disaggregation-transfer-backend``, listening on ``host``.

    ``timeout`` bounds every ``write`` (``--disaggregation-timeout``). Raises
    ``TransferBackendUnavailable`` naming what to install when the backend cannot load, and
    ``ValueError`` for an unknown backend.
    """
    if backend == "mooncake":
        from smallm.runtime.disaggregation.mooncake_engine import MooncakeTransferEngine

        return MooncakeTransferEngine(host, timeout=timeout)
    if backend == "fake":
        from smallm.runtime.disaggregation.fake_engine import FakeTransferEngine

        return FakeTransferEngine(host, timeout=timeout)
    raise ValueError(
        f"unknown transfer backend {backend!r}: choose one of {', '.join(TRANSFER_BACKENDS)}"
    )
