"""How a linear layer multiplies on this CPU: dense float32, prepacked bfloat16, or packed
int8 / int4 weights with a dense fallback for large batches.

Measured on a 2-core Xeon with AMX over the default model's linear weights (docs/benchmarks.md):
torch's weight-only int4/int8 kernels read 4-8x fewer bytes than bfloat16 and win while a pass
has a few rows (batch-1 decode is bound by reading weights), but they dequantize per 4 rows and
use no AMX, so from ~8 rows on the dense bfloat16 matmul is faster. A quantized layer therefore
keeps both: the packed codes for passes of at most ``max_rows`` rows and a dense copy (the
dequantized codes, so both paths compute the same weights) for the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from smallm.runtime.model.quantized import QuantizedTensor


class LinearKernel(ABC):
    """``y = x @ W.T (+ bias)`` for x [M, K] in the model's activation dtype."""

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    @abstractmethod
    def name(self) -> str:
        """Short label for logs: ``float32``, ``bf16-prepacked``, ``int4-g32``, ..."""


class DenseKernel(LinearKernel):
    """A dense weight in the activation dtype. bfloat16 weights are prepacked once into oneDNN's
    blocked layout (AMX tiles where the CPU has them): measured 19 vs 27 ms for the default
    model's linears at 64 rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool):
        self.bias = bias
        self.prepacked = prepack and weight.dtype == torch.bfloat16 and _mkldnn_ok()
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 64)
            if self.prepacked
            else weight
        )

    @property
    def name(self) -> str:
        dtype = str(self.weight.dtype).removeprefix("torch.")
        return f"{dtype}-prepacked" if self.prepacked else dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class QuantizedKernel(LinearKernel):
    """Packed int4 / int8 codes for passes of at most ``max_rows`` rows, ``dense`` above.

    int4 runs torch's kernel, which takes bfloat16 activations (float32 would run its scalar
    fallback): float32 activations are rounded to bfloat16 for it and the result widened back.
    int8 runs smallm's own kernel (``ops.int8_linear``) where the fused ops are built: it keeps
    GGUF Q8_0's per-block scales exactly and reads the weights once per pass (torch's int8 kernel
    ran the default model's LM head at ~5 GB/s at batch 1); without it torch's kernel, whose
    per-row scales need block-scaled codes requantized.
    """

    def __init__(
        self,
        qt: QuantizedTensor,
        bias: torch.Tensor | None,
        dense: LinearKernel | None,
        max_rows: int,
        ops=None,
    ):
        self.kind, self.group_size = qt.kind, qt.group_size
        self.bias = bias
        self.dense = dense
        self.max_rows = max_rows if dense is not None else 1 << 62
        self.ops = ops if qt.kind == "int8" else None
        if self.ops is not None:
            self.packed = qt.q.contiguous()
            self.scales = qt.scale.reshape(qt.shape[0], -1).float().contiguous()
            self.group_size = qt.shape[1] // self.scales.shape[1]
        elif qt.kind == "int4":
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                qt.q.to(torch.int32).contiguous(), 1
            )
            # [K / g, N, 2]: the kernel's layout of (scale, zero) per group and output row.
            self.scale_zero = (
                torch.stack([qt.scale.T, qt.zero.T], dim=-1).to(torch.bfloat16).contiguous()
            )
        else:
            qt = qt.to_row_scales()
            self.packed = qt.q.contiguous()
            self.scales = qt.scale.to(torch.bfloat16)

    @property
    def name(self) -> str:
        label = f"int4-g{self.group_size}" if self.kind == "int4" else "int8"
        if self.dense is not None:
            label += f" (<= {self.max_rows} rows; else {self.dense.name})"
        return label

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return self.dense(x)
        if self.ops is not None:
            out = self.ops.int8_linear(x.contiguous(), self.packed, self.scales, self.group_size)
            return out if self.bias is None else out + self.bias
        xb = x.to(torch.bfloat16)
        if self.kind == "int4":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                xb, self.packed, self.group_size, self.scale_zero
            )
        else:
            out = torch.ops.aten._weight_int8pack_mm(xb, self.packed, self.scales)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)


def _mkldnn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
