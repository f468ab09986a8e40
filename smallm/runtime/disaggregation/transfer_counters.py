"""What a prefill or decode server counts of its KV transfers, for ``/metrics``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TransferCounters:
    """Cumulative counts, plus each transfer's seconds since the last report (for the
    histogram). A transfer's time is the write on a prefill server and, on a decode server,
    the wait from its transfer request to the KV's arrival."""

    transfers: int = 0  # rooms whose KV was written (prefill) or arrived (decode)
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    transfer_failures: int = 0  # rooms that failed after their transfer request went out
    bootstrap_failures: int = 0  # requests that never found their prefill rank (decode)
    latencies: list[float] = field(default_factory=list)

    def succeeded(self, nbytes: int, seconds: float) -> None:
        self.transfers += 1
        self.transfer_bytes += nbytes
        self.transfer_seconds += seconds
        self.latencies.append(seconds)

    def report(self, stats: Any) -> None:
        """Fill a ``SchedulerStats``' transfer fields; hands over the latencies recorded
        since the last report."""
        stats.kv_transfers = self.transfers
        stats.kv_transfer_bytes = self.transfer_bytes
        stats.kv_transfer_seconds = self.transfer_seconds
        stats.kv_transfer_failures = self.transfer_failures
        stats.kv_bootstrap_failures = self.bootstrap_failures
        stats.kv_transfer_latencies, self.latencies = self.latencies, []
