"""``--attention-backend`` names -> backend classes."""

from __future__ import annotations

import torch

from smallm.kernels._common import triton_installed
from smallm.runtime.attention.base import AttentionBackend
from smallm.runtime.attention.torch_native import TorchNativeBackend
from smallm.runtime.attention.triton_backend import TritonAttentionBackend
from smallm.runtime.cache.kv_pool import KVPool
from smallm.runtime.cache.req_to_token import ReqToTokenPool

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch_native": TorchNativeBackend,
    "triton": TritonAttentionBackend,
}

# Not a backend itself: picks one for the device (see resolve_backend_name).
AUTO = "auto"


def resolve_backend_name(name: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> ``triton`` for a model on a CUDA device (with Triton installed), else
    ``torch_native``; other names unchanged."""
    if name != AUTO:
        return name
    return (
        "triton" if torch.device(device).type == "cuda" and triton_installed() else "torch_native"
    )


def create_backend(
    name: str, kv_pool: KVPool, req_to_token: ReqToTokenPool, scale: float
) -> AttentionBackend:
    try:
        cls = ATTENTION_BACKENDS[resolve_backend_name(name, kv_pool.buffer.device)]
    except KeyError:
        raise ValueError(
            f"--attention-backend {name!r} is not available; choose from "
            f"{', '.join(sorted([*ATTENTION_BACKENDS, AUTO]))}"
        ) from None
    return cls(kv_pool, req_to_token, scale)
