"""Which model class serves which HF architecture name."""

from __future__ import annotations

from torch import nn

from smallm.runtime.model.config import ModelConfig
from smallm.runtime.model.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


class UnsupportedArchitecture(ValueError):
    """The checkpoint's architecture has no model class here."""


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[cfg.architecture]
    except KeyError:
        raise UnsupportedArchitecture(
            f"architecture {cfg.architecture or '(none in config.json)'!r} is not supported; "
            f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
