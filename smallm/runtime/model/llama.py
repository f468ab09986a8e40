"""Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3).

The variants differ only in flags read from the config: q/k/v biases (Qwen2), per-head q/k
RMSNorm before rotary (Qwen3), an explicit head_dim, and tied embeddings.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from smallm.runtime.attention.base import AttentionBackend
from smallm.runtime.model.config import ModelConfig
from smallm.runtime.model.forward_batch import ForwardBatch
from smallm.runtime.model.layers import GatedMLP, Linear, RMSNorm
from smallm.runtime.model.rotary import RotaryEmbedding, apply_rotary


class Attention(nn.Module):
    use_triton: bool = False  # rotary through smallm's kernel (see layers.set_kernel_backend)

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_triton:
            from smallm.kernels.dispatch import apply_rotary as rotary_kernel

            q, k = rotary_kernel(q, k, cos, sin)
        else:
            q, k = apply_rotary(q, k, cos, sin)
        return self.o_proj(backend.forward(q, k, v, self.layer_id, batch))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_id)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, batch, backend) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(h), cos, sin, batch, backend)
        x, h = self.post_attention_layernorm.add_and_norm(attn, h)
        return h + self.mlp(x)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Returns final hidden states; the runner applies ``lm_head`` only to the rows it needs."""

    # HF checkpoint names that load into a slice of one fused parameter: (fused name, shard).
    stacked_params: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None
        # The compiled module of smallm/kernels/cpu/fused_ops.cpp, set by the runner when the
        # fused path is on; None runs the plain torch ops below.
        self.fused_ops = None

    def init_rotary(self, max_positions: int, dtype: torch.dtype) -> None:
        cfg = self.config
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions, dtype)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    @property
    def can_fuse(self) -> bool:
        """Whether ``forward_fused`` covers this variant (per-head q/k norms are not fused)."""
        return not self.config.qk_norm

    def forward(self, batch: ForwardBatch, backend: AttentionBackend) -> torch.Tensor:
        assert self.rotary is not None, "call init_rotary() before forward"
        if self.fused_ops is not None:
            return self.forward_fused(batch, backend)
        cos, sin = self.rotary.lookup(batch.positions)
        h = self.model.embed_tokens(batch.input_ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin, batch, backend)
        return self.model.norm(h)

    def forward_fused(self, batch: ForwardBatch, backend: AttentionBackend) -> torch.Tensor:
        """The same computation with the work between matmuls in a few fused C++ ops per
        layer: norm + residual add, rotary + KV store, SiLU * up; attention reads the paged
        pool in place (the backend's ``attend``)."""
        ops, cfg, layers = self.fused_ops, self.config, self.model.layers
        eps, hq, hk = cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads
        pool = backend.kv_pool
        positions, slots = batch.positions, batch.out_cache_loc
        cos, sin = self.rotary.cos32, self.rotary.sin32
        residual = self.model.embed_tokens(batch.input_ids)
        x = ops.rms_norm(residual, layers[0].input_layernorm.weight, eps)
        t = residual.shape[0]
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            # Kernels are called directly: nn.Module.__call__ costs microseconds a call, which
            # at 4 matmuls x 30 layers is a visible share of a batch-1 step.
            qkv = _linear(attn.qkv_proj)(x)
            q = ops.rope_store(qkv, positions, cos, sin, pool.k(i), pool.v(i), slots, hq, hk)
            o = _linear(attn.o_proj)(backend.attend(q, i, batch).reshape(t, -1))
            x = ops.add_rms_norm(o, residual, layer.post_attention_layernorm.weight, eps)
            down = _linear(mlp.down_proj)(ops.silu_mul(_linear(mlp.gate_up_proj)(x)))
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            x = ops.add_rms_norm(down, residual, norm.weight, eps)
        return x

    def shard_slice(self, fused: str, shard: str | int) -> slice:
        """Rows of fused parameter ``fused`` that HF shard ``shard`` loads into."""
        cfg = self.config
        if fused == "qkv_proj":
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            start = {"q": 0, "k": q, "v": q + kv}[shard]
            return slice(start, start + (q if shard == "q" else kv))
        n = cfg.intermediate_size
        return slice(shard * n, (shard + 1) * n)


def _linear(module: nn.Module):
    """The callable that multiplies for a Linear: its kernel when one was attached."""
    return module.kernel or module
