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
