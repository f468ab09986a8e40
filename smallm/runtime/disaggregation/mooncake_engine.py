"""``MooncakeTransferEngine``: Mooncake's transfer engine (``mooncake-transfer-engine-non-cuda``)
over its TCP transport, peers found by P2P handshake (no metadata server).

What the library does, learnt by running it here (0.3.13.post1):

- ``mooncake.engine`` is a pybind module whose ``engine.so`` links ``libibverbs.so.1`` even for
  TCP; without Debian's ``libibverbs1`` the import fails with ``ImportError: libibverbs.so.1:
  cannot open shared object file``. RDMA devices are not needed ("No RDMA devices found" is a
  warning).
- ``initialize(host, "P2PHANDSHAKE", "tcp", "")`` returns 0 on success and picks a free RPC
  port; the peer's session id is ``f"{host}:{get_rpc_port()}"``.
- Status codes, not exceptions: ``register_memory`` / ``unregister_memory`` return 0 (an unknown
  pointer gives -3); ``batch_transfer_sync_write`` returns 0, or -1 when the peer rejects a
  destination outside its registered buffers, refuses the connection or has died. The reason
  only goes to Mooncake's glog on stderr.
- Over TCP the *source* need not be registered (RDMA would need it); the base class enforces it
  anyway so every backend behaves alike.
- A peer that is alive but stalled (SIGSTOPped, wedged) makes the first write to it hang in the
  handshake forever, whatever ``MC_HANDSHAKE_CONNECT_TIMEOUT`` says; after a successful
  handshake a stalled peer fails the write after ``MC_TRANSFER_TIMEOUT`` seconds (default 30).
  So each write runs on a helper thread that this engine waits for at most ``timeout`` seconds.
- A batch of more than ~2,100-2,500 ranges to one peer fails (status -1, glog "TCP lane
  queue-full rejection"), whatever their sizes (one 256 MiB range is fine; setting
  ``MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER`` did not lift it). So a write goes out in batches of
  at most ``MAX_RANGES_PER_BATCH`` ranges, one after another.
"""

from __future__ import annotations

import math
import os
import threading

from smallm.runtime.disaggregation.transfer import (
    TransferBackendUnavailable,
    TransferEngine,
    TransferError,
    join_session,
)

PIP_PACKAGE = "mooncake-transfer-engine-non-cuda"
MAX_RANGES_PER_BATCH = 1024  # half the queue depth seen to fail; see the module docstring


def explain_import_error(error: ImportError) -> str:
    """What to install, given the ImportError that ``import mooncake.engine`` raised."""
    text = str(error)
    if "libibverbs" in text:
        return (
            f"Mooncake's engine.so cannot load libibverbs.so.1 ({text}); install Debian's "
            "libibverbs1: apt-get install -y libibverbs1 (it needs no RDMA hardware for TCP)"
        )
    if isinstance(error, ModuleNotFoundError) and (error.name or "").startswith("mooncake"):
        return (
            f"the mooncake transfer backend is not installed: pip install {PIP_PACKAGE} "
            "(or pip install 'smallm[pd]'), plus apt-get install -y libibverbs1"
        )
    return f"Mooncake's transfer engine failed to load ({text}); reinstall {PIP_PACKAGE}"


def load_mooncake_engine_class() -> type:
    """``mooncake.engine.TransferEngine``, or TransferBackendUnavailable saying what to install."""
    try:
        from mooncake.engine import TransferEngine as MooncakeEngine
    except ImportError as e:
        raise TransferBackendUnavailable(explain_import_error(e)) from e
    return MooncakeEngine


class MooncakeTransferEngine(TransferEngine):
    """Mooncake's transfer engine on ``host`` with the TCP transport; see the module docstring."""

    def __init__(self, host: str, *, timeout: float = 30.0) -> None:
        super().__init__(timeout)
        engine_class = load_mooncake_engine_class()
        # Mooncake's own limit for a write to a peer it has shaken hands with; read from the
        # environment, so only set it when the operator has not.
        os.environ.setdefault("MC_TRANSFER_TIMEOUT", str(max(1, math.ceil(self.timeout))))
        self._engine = engine_class()
        status = self._engine.initialize(host, "P2PHANDSHAKE", "tcp", "")
        if status != 0:
            raise TransferError(
                f"Mooncake's transfer engine failed to start on {host!r} (status {status}); "
                "is the host an address of this machine?"
            )
        self._session_id = join_session(host, self._engine.get_rpc_port())

    @property
    def session_id(self) -> str:
        return self._session_id

    def _register(self, ptr: int, nbytes: int) -> None:
        status = self._engine.register_memory(ptr, nbytes)
        if status != 0:
            raise TransferError(
                f"Mooncake refused to register [{ptr:#x}, {ptr + nbytes:#x}) (status {status})"
            )

    def _deregister(self, ptr: int) -> None:
        status = self._engine.unregister_memory(ptr)
        if status != 0:
            raise TransferError(f"Mooncake failed to deregister {ptr:#x} (status {status})")

    def _write(
        self, peer_session: str, src_ptrs: list[int], dst_ptrs: list[int], lengths: list[int]
    ) -> None:
        result: list[int | BaseException] = []

        def run() -> None:
            try:
                status = 0
                for i in range(0, len(lengths), MAX_RANGES_PER_BATCH):
                    end = i + MAX_RANGES_PER_BATCH
                    status = self._engine.batch_transfer_sync_write(
                        peer_session, src_ptrs[i:end], dst_ptrs[i:end], lengths[i:end]
                    )
                    if status < 0:
                        break
                result.append(status)
            except BaseException as e:  # handed to the waiting thread below
                result.append(e)

        # A daemon thread, not a pool: a write stuck in Mooncake's handshake cannot be
        # cancelled, and it must neither block the next write nor the interpreter's exit.
        worker = threading.Thread(target=run, name="mooncake-write", daemon=True)
        worker.start()
        worker.join(self.timeout)
        what = f"{len(lengths)} ranges, {sum(lengths)} bytes, to {peer_session}"
        if worker.is_alive():
            raise TransferError(
                f"Mooncake write ({what}) timed out after {self.timeout:g} s: the peer accepts "
                "connections but does not answer"
            )
        outcome = result[0]
        if isinstance(outcome, BaseException):
            raise TransferError(f"Mooncake write ({what}) raised {outcome!r}") from outcome
        if outcome < 0:
            raise TransferError(
                f"Mooncake write ({what}) failed (status {outcome}): the peer is unreachable "
                "or dead, or a destination range is not inside memory it registered "
                "(Mooncake's log on stderr has the detail)"
            )

    def _close(self) -> None:
        # Mooncake has no shutdown call: dropping the last reference stops its threads and
        # listeners (a write still stuck on its helper thread holds one until it returns).
        self._engine = None
