"""Shared fixtures: tiny random models made on the fly, and the default model."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports Triton (transformers' model code does): Triton decides at import time
# whether its own library functions run in the CPU interpreter, which the kernel tests need.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from smallm.runtime.model.random_model import (
    make_tiny_chat_model,
    make_tiny_model,
)

TINY_VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
}


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        name: make_tiny_model(root / name, kind, **extra)
        for name, (kind, extra) in TINY_VARIANTS.items()
    }


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from smallm.runtime.model.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_default_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir):
    from smallm.runtime.tokenizer import load_tokenizer

    return load_tokenizer(default_model_dir)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A tiny random Llama with the default model's tokenizer (vocabulary 49,152), for fast
    runtime tests that need text in and text out."""
    return make_tiny_chat_model(tmp_path_factory.mktemp("tinychat") / "m", default_model_dir)


# A few thousand KV slots keep the servers' memory small; the tests never need more.
TINY_SERVER_FLAGS = (
    "--max-total-tokens", "8192", "--max-running-requests", "64", "--max-request-bytes", "1000000"
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_server(tiny_chat_model_dir):
    """A real server subprocess on the tiny random chat model (fast; text is gibberish)."""
    from server_process import ServerProcess

    with ServerProcess(tiny_chat_model_dir, *TINY_SERVER_FLAGS) as server:
        yield server


@pytest.fixture(scope="session")
def default_server(default_model_dir):
    """A real server subprocess on the default model (SmolLM2-135M-Instruct)."""
    from server_process import ServerProcess

    with ServerProcess(None, "--max-total-tokens", "16384") as server:
        yield server


# The exact path: dense float32 weights. The default path (bfloat16 activations, int4 codes for
# passes of a few rows, a dense copy for larger ones) is fast but not batch-invariant: how a
# request's tokens are batched (prefix-cache hits, co-running requests) picks the kernel, and a
# near-tie may go either way. Tests that assert identical text across batchings use this one.
EXACT_FLAGS = ("--dtype", "float32", "--quantization", "none")


@pytest.fixture(scope="session")
def exact_server(default_model_dir):
    """A real server subprocess on the default model's exact float32 path."""
    from server_process import ServerProcess

    with ServerProcess(None, "--max-total-tokens", "16384", *EXACT_FLAGS) as server:
        yield server
