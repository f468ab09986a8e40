"""Gives every linear layer of a loaded model (and its LM head) the kernel it runs on.

``quantization``:
- ``auto``: a model converted from GGUF keeps the file's own quantization (Q4_0/Q4_1 as int4
  g32 and Q8_0 as int8, read from the file's blocks; other quantized types requantized, float
  tensors dense); a safetensors checkpoint stays dense.
- ``none``: dense weights in the activation dtype.
- ``int8`` / ``int4``: round-to-nearest quantization of the dense weights at load.
The embedding lookup always stays exact; a tied LM head gets its own quantized copy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from smallm.runtime.model.gguf_loader import gguf_origin, read_gguf_quantized
from smallm.runtime.model.layers import Linear
from smallm.runtime.model.linear_kernels import DenseKernel, LinearKernel, QuantizedKernel
from smallm.runtime.model.quantized import QuantizedTensor, quantize

QUANTIZATION_CHOICES = ("auto", "none", "int8", "int4")


@dataclass
class LinearSetup:
    """What was chosen, for the start-up log line."""

    quantization: str  # resolved: none | int8 | int4 | gguf
    lm_head: LinearKernel
    kinds: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        kinds = ", ".join(f"{n}x {k}" for k, n in self.kinds.most_common())
        return f"quantization {self.quantization} [{kinds}; lm_head {self.lm_head.name}]"


def setup_linears(
    model: nn.Module,
    model_dir: str | Path,
    quantization: str,
    group_size: int,
    dtype: torch.dtype,
    prepack: bool,
    max_rows: int,
    ops=None,
) -> LinearSetup:
    """Attach a kernel to each ``Linear`` of ``model`` and build the LM head's. ``ops``: the
    fused CPU ops module, whose int8 kernel int8 weights use when given."""
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(
            f"--quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {quantization!r}"
        )
    source = gguf_origin(model_dir) if quantization == "auto" else None
    mode = "gguf" if source is not None else ("none" if quantization == "auto" else quantization)
    gguf = read_gguf_quantized(source) if source is not None else {}
    stacked = getattr(model, "stacked_params", {})

    def kernel_for(weight: torch.Tensor, bias: torch.Tensor | None, parts: list[str]):
        qt = _quantized(weight, parts, mode, gguf, group_size)
        if qt is None:
            return DenseKernel(weight, bias, prepack)
        dense = DenseKernel(qt.dequantize().to(dtype), bias, prepack)
        return QuantizedKernel(qt, bias, dense, max_rows, ops)

    setup = LinearSetup(mode, lm_head=None)  # type: ignore[arg-type]
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            module.kernel = kernel_for(module.weight, module.bias, _checkpoint_names(name, stacked))
            setup.kinds[module.kernel.name] += 1
    tied = getattr(model.config, "tie_word_embeddings", False)
    head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    setup.lm_head = kernel_for(model.lm_head_weight, None, [head_name])
    return setup


def _checkpoint_names(module_name: str, stacked: dict[str, tuple[str, object]]) -> list[str]:
    """HF weight names whose rows make up a (possibly fused) module's weight, in order."""
    prefix, _, leaf = module_name.rpartition(".")
    parts = [hf for hf, (fused, _) in stacked.items() if fused == leaf]
    return [f"{prefix}.{p}.weight" for p in parts] if parts else [f"{module_name}.weight"]


def _quantized(
    weight: torch.Tensor,
    parts: list[str],
    mode: str,
    gguf: dict[str, QuantizedTensor | str | None],
    group_size: int,
) -> QuantizedTensor | None:
    if mode == "none":
        return None
    if mode in ("int8", "int4"):
        return quantize(weight, mode, group_size)
    found = [gguf.get(p) for p in parts]
    if all(isinstance(f, QuantizedTensor) for f in found):
        kinds = {(f.kind, f.block_scale) for f in found}
        if len(kinds) == 1:
            return QuantizedTensor.cat(found)
    # Requantize: int8 if any part was wider than 4 bits, int4 if all were, dense if all float.
    wanted = {f if isinstance(f, str) or f is None else f.kind for f in found}
    if wanted == {None}:
        return None
    return quantize(weight, "int8" if "int8" in wanted else "int4", 32)
