"""Apply a packed vocabulary bitmask to logits in place (constrained decoding).

Format (the sampler's, see ``smallm.runtime.sampling.batch_info.pack_token_bitmask``): an int32
``[B, ceil(V / 32)]`` tensor where bit j of word w allows token ``w * 32 + j``. Disallowed
logits become -inf; allowed ones are not touched (no read-modify-write of the whole row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smallm.kernels._common import next_power_of_2


@triton.jit
def _apply_bitmask_kernel(
    Logits,
    Bitmask,
    vocab_size,
    stride_lb,
    stride_mb,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < vocab_size
    words = tl.load(Bitmask + b * stride_mb + offs // 32, mask=in_vocab, other=-1)
    # An arithmetic shift still leaves bit j in position 0, so signed words are fine.
    allowed = ((words >> (offs % 32)) & 1) != 0
    tl.store(
        Logits + b * stride_lb + offs,
        tl.full([BLOCK], float("-inf"), dtype=Logits.dtype.element_ty),
        mask=in_vocab & ~allowed,
    )


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, block: int = 1024) -> None:
    """Set ``logits[b, t] = -inf`` where bit ``t % 32`` of ``bitmask[b, t // 32]`` is 0."""
    batch, vocab = logits.shape
    words = (vocab + 31) // 32
    if bitmask.shape != (batch, words) or bitmask.dtype != torch.int32:
        raise ValueError(
            f"bitmask must be int32 {(batch, words)}, got {bitmask.dtype} {tuple(bitmask.shape)}"
        )
    if logits.stride(-1) != 1 or bitmask.stride(-1) != 1:
        raise ValueError("logits and bitmask need a contiguous last dimension")
    if batch == 0:
        return
    block = min(block, next_power_of_2(vocab))
    _apply_bitmask_kernel[(batch, triton.cdiv(vocab, block))](
        logits, bitmask, vocab, logits.stride(0), bitmask.stride(0), BLOCK=block
    )


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The specification of :func:`apply_token_bitmask`: unpack the bits and mask, in place."""
    vocab = logits.shape[1]
    bits = (bitmask.to(torch.int64).unsqueeze(-1) >> torch.arange(32, device=bitmask.device)) & 1
    allowed = bits.flatten(1)[:, :vocab].bool()
    logits.masked_fill_(~allowed, float("-inf"))
