"""Load HF safetensors checkpoints into smallm's (fused) model parameters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

# Buffers some checkpoints carry that smallm recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into ``model``; every parameter must be covered exactly."""
    params = dict(model.named_parameters())
    stacked: dict[str, tuple[str, object]] = getattr(model, "stacked_params", {})
    tied = getattr(model.config, "tie_word_embeddings", False)
    loaded: dict[str, int] = {}
    for name, tensor in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        target, rows = _target(name, stacked, model)
        if target not in params:
            raise KeyError(f"checkpoint tensor {name!r} has no parameter in the model")
        param = params[target]
        dest = param.data if rows is None else param.data[rows]
        if dest.shape != tensor.shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(dest.shape)}"
            )
        dest.copy_(tensor)
        loaded[target] = loaded.get(target, 0) + (dest.shape[0] if rows is not None else -1)
    missing = [n for n in params if n not in loaded]
    partial = [n for n, rows in loaded.items() if rows >= 0 and rows != params[n].shape[0]]
    if missing or partial:
        raise ValueError(f"checkpoint does not cover parameters: {sorted(missing + partial)[:8]}")


def _target(name: str, stacked: dict, model: nn.Module) -> tuple[str, slice | None]:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in stacked:
            fused, shard = stacked[part]
            parts[i] = fused
            return ".".join(parts), model.shard_slice(fused, shard)
    return name, None
