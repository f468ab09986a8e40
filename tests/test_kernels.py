"""smallm's Triton kernels equal their torch references, run in Triton's CPU interpreter.

Shapes are small on purpose: the interpreter executes every program of the grid in Python.
Tolerances: float32 results agree to ~1e-6 (only the summation order differs), so 2e-5.
16-bit inputs and outputs are rounded (and attention's probabilities are rounded to the input
type before multiplying V, as on GPUs): float16 to 5e-3, bfloat16 (8 mantissa bits) to 3e-2 on
values of order 1. Triton 3.9's interpreter also truncates float32 -> bfloat16 casts where GPUs
round to nearest, one more reason bfloat16 is compared with a tolerance, never bit for bit.
"""

from __future__ import annotations

import os

# Before Triton is imported anywhere: it decides at import / decoration time whether to
# interpret. conftest.py sets it too, because other test modules import transformers' model code,
# which imports Triton, before this module is collected.
os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smallm.kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
)
from smallm.kernels.extend_attention import (
    extend_attention,
    extend_attention_reference,
)
from smallm.kernels.kv_store import store_kv, store_kv_reference
from smallm.kernels.rmsnorm import (
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)
from smallm.kernels.rotary import apply_rotary, apply_rotary_reference
from smallm.kernels.token_bitmask import (
    apply_token_bitmask,
    apply_token_bitmask_reference,
)
from smallm.runtime.model.forward_batch import BatchEntry
from smallm.runtime.model.model_runner import ModelRunner, RunnerConfig
from smallm.runtime.sampling.batch_info import pack_token_bitmask

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
DTYPES = [torch.float32, torch.bfloat16]
# (query heads, KV heads): GQA ratios 1, 3 and 4.
HEADS = [(4, 4), (6, 2), (8, 2)]
FEW = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class PagedKV:
    """A random KV pool and request->token table with each request's slots scattered."""

    def __init__(self, seq_lens, num_kv_heads, head_dim, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        total = sum(seq_lens)
        self.slots = total + 8
        shape = (self.slots, num_kv_heads, head_dim)
        self.k = torch.randn(shape, generator=gen).to(dtype)
        self.v = torch.randn(shape, generator=gen).to(dtype)
        max_ctx = max(max(seq_lens), 1) + 3
        self.table = torch.zeros(len(seq_lens) + 3, max_ctx, dtype=torch.int64)
        # Rows out of order and slots shuffled, so any indexing slip reads the wrong keys.
        self.rows = torch.randperm(self.table.shape[0], generator=gen)[: len(seq_lens)]
        perm = torch.randperm(self.slots - 1, generator=gen) + 1
        offset = 0
        for row, n in zip(self.rows.tolist(), seq_lens):
            self.table[row, :n] = perm[offset : offset + n]
            offset += n


def _rand(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- decode attention ---------------------------------------------------------------------


def _check_decode(seq_lens, heads, head_dim, dtype, splits=None, **kw):
    hq, hk = heads
    kv = PagedKV(seq_lens, hk, head_dim, dtype)
    q = _rand((len(seq_lens), hq, head_dim), dtype, 1)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_dim**-0.5
    got = decode_attention(
        q, kv.k, kv.v, kv.table, kv.rows, lens, scale, num_kv_splits=splits, **kw
    )
    want = decode_attention_reference(q, kv.k, kv.v, kv.table, kv.rows, lens, scale, **kw)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_decode_ragged_gqa(heads, dtype):
    _check_decode([1, 2, 7, 33, 100], heads, 64, dtype, splits=4)


def test_decode_head_dim_128_default_splits():
    _check_decode([100, 3], (8, 2), 128, torch.float32)


@pytest.mark.parametrize("splits", [1, 3, 16])
def test_decode_splits_beyond_short_sequences(splits):
    # 16 splits of a 2-token sequence leave most splits empty; they must weigh nothing.
    _check_decode([2, 40], (4, 2), 64, torch.float32, splits=splits)


@pytest.mark.parametrize("kw", [{"logit_cap": 4.0}, {"sliding_window": 9}], ids=str)
def test_decode_soft_cap_and_window(kw):
    _check_decode([1, 8, 50], (6, 2), 64, torch.float32, splits=3, **kw)


@FEW
@given(
    seq_lens=st.lists(st.integers(1, 70), min_size=1, max_size=4),
    heads=st.sampled_from(HEADS),
    head_dim=st.sampled_from([64, 128]),
    splits=st.integers(1, 5),
)
def test_decode_property(seq_lens, heads, head_dim, splits):
    _check_decode(seq_lens, heads, head_dim, torch.float32, splits=splits)


# ---- extend attention ---------------------------------------------------------------------


def _check_extend(prefix_lens, extend_lens, heads, head_dim, dtype, **kw):
    hq, hk = heads
    kv = PagedKV([p + n for p, n in zip(prefix_lens, extend_lens)], hk, head_dim, dtype)
    num_tokens = sum(extend_lens)
    q = _rand((num_tokens, hq, head_dim), dtype, 1)
    k_ext = _rand((num_tokens, hk, head_dim), dtype, 2)
    v_ext = _rand((num_tokens, hk, head_dim), dtype, 3)
    starts = torch.tensor(np.cumsum([0, *extend_lens[:-1]]).tolist())
    meta = (
        kv.table,
        kv.rows,
        torch.tensor(prefix_lens, dtype=torch.int32),
        torch.tensor(extend_lens, dtype=torch.int32),
        starts,
    )
    scale = head_dim**-0.5
    got = extend_attention(
        q, k_ext, v_ext, kv.k, kv.v, *meta, max(extend_lens), scale, block_m=16, block_n=16, **kw
    )
    want = extend_attention_reference(q, k_ext, v_ext, kv.k, kv.v, *meta, scale, **kw)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_extend_ragged_with_prefix(heads, dtype):
    _check_extend([0, 5, 33, 0], [7, 1, 40, 2], heads, 64, dtype)


def test_extend_no_prefix_head_dim_128():
    _check_extend([0, 0], [33, 17], (4, 4), 128, torch.float32)


@pytest.mark.parametrize("kw", [{"logit_cap": 4.0}, {"sliding_window": 7}], ids=str)
def test_extend_soft_cap_and_window(kw):
    _check_extend([0, 20], [19, 12], (6, 2), 64, torch.float32, **kw)


@FEW
@given(
    lens=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 40)), min_size=1, max_size=3),
    heads=st.sampled_from(HEADS),
    head_dim=st.sampled_from([64, 128]),
)
def test_extend_property(lens, heads, head_dim):
    prefix_lens, extend_lens = (list(x) for x in zip(*lens))
    _check_extend(prefix_lens, extend_lens, heads, head_dim, torch.float32)


def test_float16_attention():
    # float16 is the one dtype whose tl.dot runs natively in the interpreter with the GPU's
    # default input precision (float32 asks for IEEE; bfloat16 is upcast, see _tl_helpers).
    _check_decode([1, 33, 70], (6, 2), 64, torch.float16, splits=3)
    _check_extend([0, 21], [9, 30], (6, 2), 64, torch.float16)


# ---- KV store, bitmask, norm, rotary ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv_matches_index_copy(dtype):
    num_tokens, hk, d = 13, 2, 64
    k_buf = torch.zeros(40, hk, d, dtype=dtype)
    v_buf = torch.zeros(40, hk, d, dtype=dtype)
    loc = torch.randperm(39)[:num_tokens] + 1
    # k and v as the model produces them: strided views of one fused projection (the backend
    # casts them to the pool's dtype first, so the kernel copies without converting).
    qkv = _rand((num_tokens, 3 * hk * d), dtype, 0)
    k = qkv[:, hk * d : 2 * hk * d].view(num_tokens, hk, d)
    v = qkv[:, 2 * hk * d :].view(num_tokens, hk, d)
    want_k, want_v = k_buf.clone(), v_buf.clone()
    store_kv(k_buf, v_buf, loc, k, v)
    store_kv_reference(want_k, want_v, loc, k, v)
    assert torch.equal(k_buf, want_k) and torch.equal(v_buf, want_v)


@pytest.mark.parametrize("vocab", [1, 31, 32, 100, 2051])
def test_token_bitmask(vocab):
    gen = torch.Generator().manual_seed(vocab)
    allowed = torch.rand(3, vocab, generator=gen) < 0.5
    allowed[0] = True  # a row allowing all, including the high (sign) bit of each word
    packed = pack_token_bitmask(allowed)
    logits = torch.randn(3, vocab, generator=gen)
    got, want = logits.clone(), logits.clone()
    apply_token_bitmask(got, packed, block=64)
    apply_token_bitmask_reference(want, packed)
    assert torch.equal(got, want)
    assert torch.equal(got, logits.masked_fill(~allowed, float("-inf")))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm_and_fused_residual(dtype, hidden):
    x = _rand((2, 5, hidden), dtype, 0)
    residual = _rand((2, 5, hidden), dtype, 1)
    weight = _rand((hidden,), dtype, 2)
    torch.testing.assert_close(
        rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6), **TOL[dtype]
    )
    got_out, got_h = fused_add_rms_norm(x, residual, weight, 1e-6)
    want_out, want_h = fused_add_rms_norm_reference(x, residual, weight, 1e-6)
    if dtype == torch.float32:
        assert torch.equal(got_h, want_h)  # the residual stream is exactly torch's add
    torch.testing.assert_close(got_h, want_h, **TOL[dtype])
    torch.testing.assert_close(got_out, want_out, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "head_dim"), [((4, 2), 64), ((6, 2), 128), ((3, 1), 32)])
def test_rotary_matches_model_rotation(dtype, heads, head_dim):
    from smallm.runtime.model.config import RopeConfig
    from smallm.runtime.model.rotary import RotaryEmbedding
    from smallm.runtime.model.rotary import apply_rotary as model_apply_rotary

    hq, hk = heads
    num_tokens = 9
    rope = RotaryEmbedding(RopeConfig(), head_dim, 64, dtype)
    positions = torch.tensor([0, 1, 2, 3, 17, 18, 40, 5, 63])
    qkv = _rand((num_tokens, (hq + 2 * hk) * head_dim), dtype, 0)
    q = qkv[:, : hq * head_dim].view(num_tokens, hq, head_dim)  # strided, like the model's
    k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(num_tokens, hk, head_dim)
    cos, sin = rope.lookup(positions)
    got_q, got_k = apply_rotary(q, k, cos, sin)
    want_q, want_k = apply_rotary_reference(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    torch.testing.assert_close(got_k, want_k, **TOL[dtype])
    # And the model's own rotation (which rounds per op in bfloat16) agrees to tolerance.
    model_q, model_k = model_apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(got_q, model_q, **TOL[dtype])
    torch.testing.assert_close(got_k, model_k, **TOL[dtype])


# ---- the backend inside the whole model ---------------------------------------------------


def _runner(path, backend: str) -> ModelRunner:
    return ModelRunner(
        RunnerConfig(
            model_path=str(path),
            dtype="float32",
            max_total_tokens=512,
            max_running_requests=4,
            attention_backend=backend,
        )
    )


def _run(runner: ModelRunner, rows, prefix_lens, new_tokens):
    entries = []
    for row, p, toks in zip(rows, prefix_lens, new_tokens):
        runner.req_to_token.write(row, p, runner.kv_pool.alloc(len(toks)))
        entries.append(BatchEntry(row, p, toks))
    return runner.forward(entries).next_token_logits


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_model_with_triton_backend_equals_torch_native(variant, tiny_model_dirs):
    """Prefill a ragged batch, then one pass mixing extends (with and without a prefix) and
    decodes, then a decode-only pass: logits equal torch_native's at every step."""
    from smallm.runtime.attention.triton_backend import TritonAttentionBackend

    runners = {b: _runner(tiny_model_dirs[variant], b) for b in ("torch_native", "triton")}
    assert isinstance(runners["triton"].attn_backend, TritonAttentionBackend)
    assert runners["triton"].model.model.norm.use_triton
    assert not runners["torch_native"].model.model.norm.use_triton
    rng = np.random.default_rng(0)
    vocab = runners["triton"].model_config.vocab_size
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 17, 1, 40)]
    steps = [
        ([0, 0, 0, 0], prompts),
        ([5, 17, 1, 40], [[1, 2, 3], [7], [9, 10], [11]]),  # extends and decodes together
        ([8, 18, 3, 41], [[5], [6], [7], [8]]),  # decode only
    ]
    outputs = {}
    for name, runner in runners.items():
        rows = [runner.req_to_token.alloc() for _ in prompts]
        outputs[name] = [_run(runner, rows, p, toks) for p, toks in steps]
    for got, want in zip(outputs["triton"], outputs["torch_native"]):
        torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_triton_without_gpu_or_interpreter_is_a_clear_error(tiny_model_dirs, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _runner(tiny_model_dirs["llama"], "triton")


def test_auto_backend_is_torch_native_on_cpu(tiny_model_dirs):
    from smallm.runtime.attention.torch_native import TorchNativeBackend

    runner = _runner(tiny_model_dirs["llama"], "auto")
    assert isinstance(runner.attn_backend, TorchNativeBackend)
    assert not runner.model.model.norm.use_triton


def test_runtime_import_does_not_import_triton():
    import subprocess
    import sys

    code = (
        "import sys, smallm.runtime.engine, smallm.runtime.model.model_runner, "
        "smallm.runtime.attention.registry, smallm.kernels.dispatch; "
        "assert 'triton' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
