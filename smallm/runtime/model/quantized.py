"""Weight-only quantized tensors in a kernel-independent form, and where they come from.

A :class:`QuantizedTensor` is what a linear layer's weight [N, K] becomes: ``int8`` (one
symmetric scale per output row) or ``int4`` (unsigned 4-bit codes with a scale and a zero per
group of ``group_size`` inputs, ``w = (q - 8) * scale + zero``: the form torch's CPU int4
kernel computes). They are made by round-to-nearest from float weights, or read straight from
GGUF blocks with no float detour: Q4_0 and Q4_1 are int4 with group 32 exactly, Q8_0 is int8
in blocks of 32 (kept as such: see ``block_scale``). The packing for a particular kernel happens
later, on the machine that runs it (see linear_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QUANT_KINDS = ("int8", "int4")


@dataclass
class QuantizedTensor:
    """A quantized weight [N, K].

    int4: ``q`` uint8 codes 0..15 [N, K]; ``scale`` and ``zero`` float32 [N, K / group_size].
    int8: ``q`` int8 [N, K]; ``scale`` float32 [N] (one per row) or [N, K / group_size] (GGUF
    Q8_0's blocks of 32); ``zero`` None.
    """

    kind: str
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.q.shape[0]), int(self.q.shape[1])

    @property
    def block_scale(self) -> bool:
        """int8 with one scale per block of inputs rather than per row (GGUF Q8_0)."""
        return self.kind == "int8" and self.scale.dim() == 2

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these codes stand for."""
        n, k = self.shape
        if self.kind == "int8" and not self.block_scale:
            return self.q.float() * self.scale.unsqueeze(1)
        g = self.group_size
        codes = self.q.float() - (8.0 if self.kind == "int4" else 0.0)
        w = codes.view(n, k // g, g) * self.scale.unsqueeze(2)
        if self.zero is not None:
            w = w + self.zero.unsqueeze(2)
        return w.view(n, k)

    def rows(self, index: torch.Tensor | slice) -> QuantizedTensor:
        """The same quantization restricted to some output rows (reordering q/k heads)."""
        zero = None if self.zero is None else self.zero[index]
        return QuantizedTensor(self.kind, self.q[index], self.scale[index], zero, self.group_size)

    def to_row_scales(self) -> QuantizedTensor:
        """int8 with one scale per row; block-scaled int8 is requantized (a float round trip:
        torch's int8 kernel takes per-row scales only)."""
        if self.kind != "int8" or not self.block_scale:
            return self
        return quantize_int8(self.dequantize())

    @staticmethod
    def cat(parts: list[QuantizedTensor]) -> QuantizedTensor:
        """Stack along the output dimension (q/k/v into one fused projection)."""
        first = parts[0]
        if any(
            (p.kind, p.group_size, p.block_scale)
            != (first.kind, first.group_size, first.block_scale)
            for p in parts
        ):
            raise ValueError("cannot fuse differently quantized tensors")
        zero = None if first.zero is None else torch.cat([p.zero for p in parts])
        return QuantizedTensor(
            first.kind,
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            zero,
            first.group_size,
        )


def pack_nibbles(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 codes in GGUF's Q4 nibble order for smallm's own kernel: ``qs`` uint8 [N, K / 2]
    (per 32 inputs, 16 bytes: low nibbles inputs 0..15, high 16..31), ``scale`` and ``offset``
    float32 [N, K / 32] with ``w = q * scale + offset``. Larger groups repeat their scale."""
    if qt.kind != "int4" or qt.group_size % 32:
        raise ValueError("pack_nibbles needs int4 codes in groups of a multiple of 32")
    n, k = qt.shape
    q = qt.q.view(n, k // 32, 2, 16)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    reps = qt.group_size // 32
    scale = qt.scale.float().repeat_interleave(reps, dim=1).contiguous()
    offset = (qt.zero.float().repeat_interleave(reps, dim=1) - 8 * scale).contiguous()
    return qs, scale, offset


def quantize_int8(w: torch.Tensor) -> QuantizedTensor:
    """Symmetric per-output-row int8 by round-to-nearest."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return QuantizedTensor("int8", q, scale, None, w.shape[1])


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> QuantizedTensor:
    """Asymmetric int4 per group of ``group_size`` inputs by round-to-nearest (min/max range)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in-features {k} is not a multiple of the group size {group_size}")
    groups = w.float().view(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((groups - lo.unsqueeze(2)) / scale.unsqueeze(2)).clamp(0, 15)
    return QuantizedTensor("int4", q.to(torch.uint8).view(n, k), scale, lo + 8 * scale, group_size)


def quantize(w: torch.Tensor, kind: str, group_size: int = 32) -> QuantizedTensor:
    if kind == "int8":
        return quantize_int8(w)
    if kind == "int4":
        return quantize_int4(w, group_size)
    raise ValueError(f"quantization must be one of {', '.join(QUANT_KINDS)}, got {kind!r}")


# ---- GGUF blocks (llama.cpp's ggml-quants layouts) --------------------------------------------

# bytes per block of 32 weights
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
GGUF_DIRECT_TYPES = tuple(_BLOCK_BYTES)


def from_gguf_blocks(kind: str, raw: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
    """Q4_0 / Q4_1 / Q8_0 data (uint8 [N, K / 32 * block bytes], as GGUFReader gives it) of a
    weight [N, K] as a QuantizedTensor, bit-exact: scales are GGUF's float16 values widened."""
    if kind not in _BLOCK_BYTES:
        raise ValueError(f"GGUF type {kind} cannot be loaded packed; use {GGUF_DIRECT_TYPES}")
    n, k = shape
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // 32, _BLOCK_BYTES[kind])
    d = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    if kind == "Q8_0":
        q = blocks[:, :, 2:].copy().view(np.int8).reshape(n, k)
        return QuantizedTensor("int8", torch.from_numpy(q), torch.from_numpy(d), None, 32)
    start = 2 if kind == "Q4_0" else 4
    packed = blocks[:, :, start:]  # [N, K/32, 16]: low nibbles are weights 0..15, high 16..31
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=2).reshape(n, k)
    if kind == "Q4_0":  # w = d * (q - 8)
        zero = np.zeros_like(d)
    else:  # w = d * q + m = d * (q - 8) + (m + 8 d)
        m = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
        zero = m + 8 * d
    return QuantizedTensor(
        "int4",
        torch.from_numpy(q.astype(np.uint8)),
        torch.from_numpy(d),
        torch.from_numpy(zero),
        32,
    )
