"""``--attention-backend`` names -> backend classes."""

from __future__ import annotations

from smallm.runtime.attention.base import AttentionBackend
from smallm.runtime.attention.torch_native import TorchNativeBackend
from smallm.runtime.cache.kv_pool import KVPool
from smallm.runtime.cache.req_to_token import ReqToTokenPool

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch_native": TorchNativeBackend,
}


def create_backend(
    name: str, kv_pool: KVPool, req_to_token: ReqToTokenPool, scale: float
) -> AttentionBackend:
    try:
        cls = ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"--attention-backend {name!r} is not available; choose from "
            f"{', '.join(sorted(ATTENTION_BACKENDS))}"
        ) from None
    return cls(kv_pool, req_to_token, scale)
