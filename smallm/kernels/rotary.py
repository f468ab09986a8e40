"""Rotary embedding in the rotate-half layout of HF checkpoints (``smallm.runtime.model.rotary``).

For each token t and head, with ``x1, x2`` the two halves of the head dimension and
``c, s = cos[t], sin[t]`` (``[T, D / 2]``, already looked up by position):
``out = concat(x1 * c - x2 * s, x2 * c + x1 * s)``. Computed in float32 and rounded once.
Layout: q [T, Hq, D], k [T, Hk, D], each head's D values contiguous; one program per token
rotates all its query and key heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smallm.kernels._common import next_power_of_2


@triton.jit
def _rotate_heads(
    X,
    Out,
    t,
    cos,
    sin,
    num_heads,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    src = X + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = Out + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    ty = Out.dtype.element_ty
    tl.store(dst, (x1 * cos[None, :] - x2 * sin[None, :]).to(ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, Cos, Sin, Q_out, K_out,
    num_q_heads, num_k_heads,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cos, stride_sin,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    cos = tl.load(Cos + t * stride_cos + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(Sin + t * stride_sin + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    _rotate_heads(Q, Q_out, t, cos, sin, num_q_heads, stride_qt, stride_qh, stride_qot,
                  stride_qoh, HALF, BLOCK_HQ, BLOCK_HALF)  # fmt: skip
    _rotate_heads(K, K_out, t, cos, sin, num_k_heads, stride_kt, stride_kh, stride_kot,
                  stride_koh, HALF, BLOCK_HK, BLOCK_HALF)  # fmt: skip


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [T, Hq, D] and ``k`` [T, Hk, D] by per-token ``cos`` / ``sin`` [T, D / 2]
    (a middle broadcast dimension of size 1, as the model keeps them, is accepted).
    Returns new contiguous tensors; the inputs may be strided views."""
    num_tokens, num_q_heads, head_dim = q.shape
    half = head_dim // 2
    cos2, sin2 = cos.reshape(num_tokens, half), sin.reshape(num_tokens, half)
    for name, t in (("q", q), ("k", k), ("cos", cos2), ("sin", sin2)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension")
    q_out, k_out = (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
    )
    if num_tokens:
        _rope_kernel[(num_tokens,)](
            q, k, cos2, sin2, q_out, k_out,
            num_q_heads, k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos2.stride(0), sin2.stride(0),
            HALF=half,
            BLOCK_HQ=next_power_of_2(num_q_heads),
            BLOCK_HK=next_power_of_2(k.shape[1]),
            BLOCK_HALF=next_power_of_2(half),
        )  # fmt: skip
    return q_out, k_out


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification of :func:`apply_rotary`, in float32 then rounded."""
    half = q.shape[-1] // 2
    c = cos.reshape(q.shape[0], 1, half).float()
    s = sin.reshape(q.shape[0], 1, half).float()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)
