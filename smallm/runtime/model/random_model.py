"""Small random HF checkpoints, made on the fly for tests and benchmarks (no download)."""

from __future__ import annotations

import shutil
from pathlib import Path

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def make_tiny_model(out: Path, kind: str, vocab_size: int = 512, seed: int = 0, **extra) -> Path:
    """Save a random HF model of family ``kind`` (llama | qwen2 | qwen3) into ``out``."""
    import torch
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    torch.manual_seed(seed)
    cfg = config_cls(**{**TINY, "vocab_size": vocab_size, **extra})
    model = model_cls(cfg).eval()
    model.save_pretrained(out)
    return out


def make_tiny_chat_model(out: Path, tokenizer_dir: str | Path) -> Path:
    """A tiny random Llama with the tokenizer (and chat template) of ``tokenizer_dir``: text
    in, (gibberish) text out, at almost no compute."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tokenizer_dir).vocab_size
    out = make_tiny_model(Path(out), "llama", vocab_size=vocab)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name in (
            "chat_template.jinja",
            "special_tokens_map.json",
        ):
            shutil.copy(f, out / f.name)
    return out
