"""Process-level CPU thread policy, applied by entry points before torch is imported."""

from __future__ import annotations

import os
import sys


def prefer_passive_openmp() -> bool:
    """Make torch's OpenMP threads sleep, not spin, between parallel regions: only for the
    ``openblas`` matmul backend.

    With float32 matmuls in OpenBLAS (its own thread pool) and the remaining ops in torch, two
    spinning pools on two cores made a decode step several times slower; with torch's threads
    passive each pool gets the cores when it works. Everywhere else passive threads are a loss:
    waking them costs ~40 us per parallel region (measured: a 3072x576 int4 matmul at batch 1
    took 89 us passive vs 45 us spinning), and a decode step has hundreds of regions. libgomp reads the policy once, when torch
    loads it, so this only takes effect before ``import torch``; returns whether it did. A policy
    already set in the environment is respected.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def pin_replica(dp_rank: int, dp_size: int, torch_threads: int | None) -> int | None:
    """Give data-parallel replica ``dp_rank`` of ``dp_size`` its share of the cores: pin this
    process to a disjoint slice of the ones it may use (two replicas' spinning OpenMP pools on
    the same cores would each run at a fraction of their speed) and return its torch thread
    count (``--torch-threads`` split evenly, at least 1). A single replica keeps every core.
    Call before ``import torch``: OpenMP reads the affinity when it starts."""
    if dp_size <= 1:
        return torch_threads
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (not Linux): split the count only
        cores = list(range(os.cpu_count() or 1))
    else:
        if len(cores) >= dp_size:
            per = len(cores) // dp_size
            mine = cores[dp_rank * per : (dp_rank + 1) * per]
        else:  # more replicas than cores: they share, round-robin
            mine = [cores[dp_rank % len(cores)]]
        os.sched_setaffinity(0, mine)
        cores = mine
    if torch_threads is None:
        return len(cores)
    return max(torch_threads // dp_size, 1)
