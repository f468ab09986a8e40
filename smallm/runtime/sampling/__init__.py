"""Sampling: per-request parameters, per-step batch tensors, and the batched sampler.

Names load lazily: the HTTP front end needs only ``SamplingParams`` (torch-free), the scheduler
the tensor parts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smallm.runtime.sampling.batch_info import (
        SamplingBatchInfo,
        apply_token_bitmask_,
        bitmask_words,
        pack_token_bitmask,
        seeded_uniform,
    )
    from smallm.runtime.sampling.params import SamplingParams, SamplingParamsError
    from smallm.runtime.sampling.sampler import SampleOutput, Sampler

_WHERE = {
    "SamplingBatchInfo": "batch_info",
    "apply_token_bitmask_": "batch_info",
    "bitmask_words": "batch_info",
    "pack_token_bitmask": "batch_info",
    "seeded_uniform": "batch_info",
    "SamplingParams": "params",
    "SamplingParamsError": "params",
    "SampleOutput": "sampler",
    "Sampler": "sampler",
}

__all__ = [
    "SampleOutput",
    "Sampler",
    "SamplingBatchInfo",
    "SamplingParams",
    "SamplingParamsError",
    "apply_token_bitmask_",
    "bitmask_words",
    "pack_token_bitmask",
    "seeded_uniform",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
