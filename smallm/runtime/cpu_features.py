"""What the CPU this process runs on can do, read at run time.

Test machines differ (AVX2-only EPYC, AVX-512/AMX Xeon), so compute paths are chosen from this,
never from where the code was written, and every benchmark prints ``summary()``.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuFeatures:
    model_name: str
    flags: frozenset[str]

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags and "amx_tile" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bfloat16 arithmetic in hardware (AMX tiles or AVX-512 BF16); elsewhere torch emulates
        it at about an eighth of float32's matmul speed."""
        return self.amx or "avx512_bf16" in self.flags

    @property
    def isa(self) -> str:
        """The widest relevant instruction set, e.g. ``AMX``, ``AVX512-BF16``, ``AVX2``."""
        if self.amx:
            return "AMX"
        if "avx512_bf16" in self.flags:
            return "AVX512-BF16"
        if self.avx512:
            return "AVX512"
        return "AVX2" if self.avx2 else "baseline"

    def summary(self) -> str:
        """One line for logs and benchmark headers."""
        import torch

        shown = [
            f
            for f in (
                "avx2",
                "fma",
                "avx512f",
                "avx512_vnni",
                "avx512_bf16",
                "amx_tile",
                "amx_bf16",
            )
            if f in self.flags
        ]
        return (
            f"{self.model_name} | ISA {self.isa} ({' '.join(shown) or 'none'}) | torch "
            f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
        )


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's CPU, from /proc/cpuinfo (empty flags where it cannot be read)."""
    name, flags = platform.processor() or "unknown CPU", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    name = value.strip()
                elif key == "flags":
                    flags = frozenset(value.split())
                if key == "flags" and name != "unknown CPU":
                    break
    except OSError:
        pass
    return CpuFeatures(name, flags)
