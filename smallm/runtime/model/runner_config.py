"""``RunnerConfig``: what the model runner needs from the server flags (torch-free, so the
HTTP front end can read its defaults without loading the model stack)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunnerConfig:
    """The subset of server arguments the model runner needs."""

    model_path: str
    dtype: str = "auto"
    context_length: int | None = None
    max_total_tokens: int | None = None
    max_running_requests: int = 256
    mem_fraction_static: float = 0.25
    # auto | torch_native | triton (auto: triton for a model on a CUDA GPU, torch_native on CPU).
    attention_backend: str = "auto"
    # torch | openblas (float32 only; see layers.Linear: faster on a quiet machine, much slower
    # when another process competes for the cores, so not the default).
    matmul_backend: str = "torch"
    # torch intra-op threads for this process; None: every core. With OpenBLAS matmuls, start
    # the process through cpu_threads.prefer_passive_openmp() so the two pools don't spin.
    torch_threads: int | None = None
    # torch_native: extends of at most this many tokens (e.g. jump-forward's) are batched like
    # decodes instead of one attention call per request; 0 turns that off.
    batched_extend_max_tokens: int = 16
    # auto | none | int8 | int4 (see linear_setup.py): auto keeps a GGUF's own quantization.
    quantization: str = "auto"
    quantization_group_size: int = 32  # int4 from a safetensors checkpoint: 32 or 64
    # Passes of at most this many rows use the packed quantized kernels, larger ones the dense
    # copy (measured crossover on AMX: int4 wins up to ~8 rows; see linear_kernels.py).
    quantized_max_rows: int = 8
    # Switches that measure each speed-up against its absence: the fused C++ ops between the
    # matmuls (smallm/kernels/cpu), and prepacking dense bfloat16 weights for oneDNN.
    disable_fused_kernels: bool = False
    disable_weight_prepack: bool = False
