"""Sampling: per-request parameters, per-step batch tensors, and the batched sampler."""

from __future__ import annotations

from smallm.runtime.sampling.batch_info import (
    SamplingBatchInfo,
    apply_token_bitmask_,
    bitmask_words,
    pack_token_bitmask,
    seeded_uniform,
)
from smallm.runtime.sampling.params import SamplingParams, SamplingParamsError
from smallm.runtime.sampling.sampler import SampleOutput, Sampler

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
