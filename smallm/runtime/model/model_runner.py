"""Runs the model over a ForwardBatch: writes KV into the pool, returns the logits asked for."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from smallm.kernels.cpu.build import load_fused_ops
from smallm.runtime.attention.base import AttentionBackend
from smallm.runtime.attention.registry import create_backend
from smallm.runtime.attention.torch_native import TorchNativeBackend
from smallm.runtime.attention.triton_backend import TritonAttentionBackend
from smallm.runtime.cache.kv_pool import KVPool
from smallm.runtime.cache.req_to_token import ReqToTokenPool
from smallm.runtime.cpu_features import cpu_features
from smallm.runtime.model.config import ModelConfig
from smallm.runtime.model.forward_batch import BatchEntry, ForwardBatch
from smallm.runtime.model.layers import matmul_weight_t, set_kernel_backend, set_matmul_backend
from smallm.runtime.model.linear_setup import setup_linears
from smallm.runtime.model.loader import load_model, resolve_dtype
from smallm.runtime.model.runner_config import RunnerConfig

logger = logging.getLogger(__name__)


@dataclass
class InputLogprobs:
    """Scores of one request's given tokens: ``logprobs[i]`` of ``targets[i]``."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None


@dataclass
class LogitsOutput:
    # [num requests with need_next_logits, V] float32, in batch order of those requests.
    next_token_logits: torch.Tensor | None
    next_rows: list[int]  # which batch entries those rows belong to
    input_logprobs: list[InputLogprobs | None]  # per batch entry
    # Per batch entry with pool_hidden: the float32 sum of its extend's last hidden states.
    hidden_sums: list[torch.Tensor | None] | None = None


class ModelRunner:
    """Owns the model and its KV memory; one ``forward`` per scheduler step."""

    def __init__(self, config: RunnerConfig):
        self.config = config
        self.model_dir = config.model_path
        cfg = ModelConfig.from_path(config.model_path)
        self.dtype = resolve_dtype(config.dtype, cfg)
        self.model_config, self.model = load_model(config.model_path, self.dtype)
        self.matmul_backend = _matmul_backend(config.matmul_backend, self.dtype)
        set_matmul_backend(self.model, self.matmul_backend)
        self._openblas = self.matmul_backend == "openblas"
        torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)
        self.linear_setup = None
        ops = None if config.disable_fused_kernels else load_fused_ops()
        if self._openblas:
            if config.quantization not in ("auto", "none"):
                raise ValueError("--matmul-backend openblas runs dense float32 only")
        else:
            self.linear_setup = setup_linears(
                self.model,
                config.model_path,
                config.quantization,
                _group_size(config.quantization_group_size),
                self.dtype,
                prepack=not config.disable_weight_prepack,
                max_rows=config.quantized_max_rows,
                ops=ops,
            )
        if self._openblas and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            logger.warning(
                "OpenBLAS matmuls with torch's OpenMP threads spinning are much slower: start the "
                "process with OMP_WAIT_POLICY=PASSIVE (smallm's entry points do), or use "
                "matmul_backend='torch'"
            )
        self.context_length = _context_length(config.context_length, self.model_config)
        self.model.init_rotary(self.context_length, self.dtype)
        capacity = config.max_total_tokens or self._default_capacity()
        self.kv_pool = KVPool(
            capacity,
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.dtype,
        )
        self.req_to_token = ReqToTokenPool(config.max_running_requests, self.context_length)
        self.attn_backend: AttentionBackend = create_backend(
            config.attention_backend,
            self.kv_pool,
            self.req_to_token,
            scale=1.0 / math.sqrt(cfg.head_dim),
        )
        if hasattr(self.attn_backend, "batched_extend_max"):
            self.attn_backend.batched_extend_max = config.batched_extend_max_tokens
        # The norm / rotary kernels follow the attention backend: Triton only when it was chosen.
        set_kernel_backend(
            self.model,
            "triton" if isinstance(self.attn_backend, TritonAttentionBackend) else "torch",
        )
        self.fused = self._enable_fused_ops(ops)
        logger.info(
            "model %s loaded: %s, %s matmuls, %s, %s, %s attention; %d layers, KV pool %d tokens "
            "(%.1f MiB), context %d | CPU %s",
            cfg.architecture,
            str(self.dtype).removeprefix("torch."),
            self.matmul_backend,
            self.linear_setup.describe() if self.linear_setup else "quantization none",
            "fused CPU ops" if self.fused else "unfused ops",
            type(self.attn_backend).__name__,
            cfg.num_layers,
            capacity,
            self.kv_pool.nbytes / 2**20,
            self.context_length,
            cpu_features().summary(),
        )

    def _enable_fused_ops(self, ops) -> bool:
        """Turn on the fused C++ ops where they apply: torch-native attention on the CPU, a
        model variant they cover, and a compiler that could build them."""
        if (
            self.config.disable_fused_kernels
            or not isinstance(self.attn_backend, TorchNativeBackend)
            or not getattr(self.model, "can_fuse", False)
            or self.kv_pool.buffer.device.type != "cpu"
            or ops is None
        ):
            return False
        self.model.fused_ops = ops
        self.attn_backend.fused_ops = ops
        return True

    def _lm_head(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of hidden-state rows."""
        if self.linear_setup is None:
            return matmul_weight_t(rows, self.model.lm_head_weight, self._openblas).float()
        return self.linear_setup.lm_head(rows).float()

    def _default_capacity(self) -> int:
        per_token = self.model_config.kv_bytes_per_token(torch.empty(0, dtype=self.dtype).itemsize)
        budget = int(_available_memory() * self.config.mem_fraction_static)
        # Never less than one full-context request, never more than the table can address.
        tokens = max(budget // per_token, self.context_length)
        return min(tokens, self.config.max_running_requests * self.context_length)

    @torch.inference_mode()
    def forward(self, entries: list[BatchEntry]) -> LogitsOutput:
        """Run one pass; the entries' new-token slots must already be in the req->token table."""
        batch = ForwardBatch.build(entries, self.req_to_token.table_np)
        self.attn_backend.prepare(batch)
        hidden = self.model(batch, self.attn_backend)
        return self._logits(hidden, batch)

    def _logits(self, hidden: torch.Tensor, batch: ForwardBatch) -> LogitsOutput:
        next_rows = [i for i, e in enumerate(batch.entries) if e.need_next_logits]
        next_logits = None
        if next_rows:
            last = [batch.extend_starts[i] + batch.extend_lens[i] - 1 for i in next_rows]
            rows = hidden[last] if len(last) != hidden.shape[0] else hidden
            next_logits = self._lm_head(rows)
        input_lp: list[InputLogprobs | None] = [None] * batch.batch_size
        spans = [
            (i, batch.extend_starts[i] + e.logprob_start, len(e.logprob_targets))
            for i, e in enumerate(batch.entries)
            if e.logprob_start is not None and e.logprob_targets
        ]
        if spans:
            self._input_logprobs(hidden, batch, spans, input_lp)
        sums = None
        if any(e.pool_hidden for e in batch.entries):
            sums = [
                hidden[s : s + n].float().sum(dim=0) if e.pool_hidden else None
                for e, s, n in zip(batch.entries, batch.extend_starts, batch.extend_lens)
            ]
        return LogitsOutput(next_logits, next_rows, input_lp, sums)

    # Rows of prompt logprobs projected at once: one pass over the LM head's weight serves a
    # whole chunk (per request, a select's 600 short prompts re-read it 600 times), while the
    # chunk's logits (rows x vocab floats) stay a few tens of MB.
    _LOGPROB_ROWS = 256

    def _input_logprobs(
        self,
        hidden: torch.Tensor,
        batch: ForwardBatch,
        spans: list[tuple[int, int, int]],
        out: list[InputLogprobs | None],
    ) -> None:
        rows = torch.cat([torch.arange(start, start + n) for _, start, n in spans])
        targets = torch.tensor([t for i, _, _ in spans for t in batch.entries[i].logprob_targets])
        chosen: list[float] = []
        tops: list[tuple[torch.Tensor, torch.Tensor]] = []
        want_top = max(batch.entries[i].top_logprobs_num for i, _, _ in spans)
        for lo in range(0, len(rows), self._LOGPROB_ROWS):
            part = slice(lo, lo + self._LOGPROB_ROWS)
            logits = self._lm_head(hidden[rows[part]])
            norm = torch.logsumexp(logits, -1, keepdim=True)
            chosen += (logits.gather(1, targets[part].unsqueeze(1)) - norm).squeeze(1).tolist()
            if want_top:
                vals, ids = logits.topk(want_top, dim=-1)
                tops.append((vals - norm, ids))
        top_vals = torch.cat([v for v, _ in tops]) if tops else None
        top_ids = torch.cat([i for _, i in tops]) if tops else None
        offset = 0
        for i, _, n in spans:
            k = batch.entries[i].top_logprobs_num
            top = None
            if k > 0 and top_vals is not None and top_ids is not None:
                ids = top_ids[offset : offset + n, :k].tolist()
                vals = top_vals[offset : offset + n, :k].tolist()
                top = [list(zip(r_ids, r_vals)) for r_ids, r_vals in zip(ids, vals)]
            out[i] = InputLogprobs(chosen[offset : offset + n], top)
            offset += n


def _matmul_backend(name: str, dtype: torch.dtype) -> str:
    if name == "openblas" and dtype != torch.float32:
        raise ValueError("matmul_backend='openblas' needs --dtype float32")
    return name


def _group_size(size: int) -> int:
    if size not in (32, 64):
        raise ValueError(f"--quantization-group-size must be 32 or 64, got {size}")
    return size


def _context_length(requested: int | None, cfg: ModelConfig) -> int:
    if requested is None:
        return cfg.max_position_embeddings
    if requested <= 0:
        raise ValueError(f"--context-length must be positive, got {requested}")
    if requested > cfg.max_position_embeddings:
        logger.warning(
            "context length %d exceeds the model's %d; quality may degrade",
            requested,
            cfg.max_position_embeddings,
        )
    return requested


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30
