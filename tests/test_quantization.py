"""Weight-only quantization: kernels against their dequantized float reference, GGUF blocks read
packed against gguf-py's dequantize, and the default model on its default (quantized) path."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gguf import tiny_gguf

from smallm.kernels.cpu.build import load_fused_ops
from smallm.runtime.model.forward_batch import BatchEntry
from smallm.runtime.model.gguf_loader import read_gguf, read_gguf_quantized
from smallm.runtime.model.linear_kernels import DenseKernel, QuantizedKernel
from smallm.runtime.model.model_runner import ModelRunner, RunnerConfig
from smallm.runtime.model.quantized import (
    QuantizedTensor,
    from_gguf_blocks,
    quantize_int4,
    quantize_int8,
)

OPS = load_fused_ops()


def _reference(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The kernels see bfloat16 activations: the reference multiplies the same rounded inputs by
    # the dequantized weights in float64.
    out = x.to(torch.bfloat16).double() @ qt.dequantize().double().T
    return out if bias is None else out + bias.double()


def _assert_matmul_close(got: torch.Tensor, want: torch.Tensor, k: int) -> None:
    # Tolerance: the output's bfloat16 rounding (2^-8 relative) plus float32 accumulation of k
    # products, scaled to the result's magnitude; a wrong code or scale is off by whole steps.
    scale = float(want.abs().max()) + 1e-6
    err = float((got.double() - want).abs().max())
    assert err <= 2**-7 * scale + 1e-5 * math.sqrt(k), (err, scale)


shapes = st.tuples(
    st.integers(1, 12),  # rows of x (a decode batch)
    st.sampled_from([32, 64, 96]),  # out features
    st.sampled_from([64, 128, 192]),  # in features (a multiple of both group sizes)
    st.booleans(),  # bias
    st.integers(0, 2**16),
)


@settings(max_examples=25, deadline=None)
@given(shapes, st.sampled_from([32, 64]))
def test_int4_kernel_matches_dequantized(shape, group) -> None:
    m, n, k, with_bias, seed = shape
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    qt = quantize_int4(w, group)
    kernel = QuantizedKernel(qt, bias, dense=None, max_rows=16)
    for dtype in (torch.float32, torch.bfloat16):
        got = kernel(x.to(dtype))
        assert got.dtype == dtype and got.shape == (m, n)
        _assert_matmul_close(got, _reference(x, qt, bias), k)


@settings(max_examples=25, deadline=None)
@given(shapes, st.booleans())
def test_int8_kernels_match_dequantized(shape, own_kernel) -> None:
    m, n, k, with_bias, seed = shape
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    qt = quantize_int8(w)
    kernel = QuantizedKernel(qt, bias, None, 16, ops=OPS if own_kernel else None)
    for dtype in (torch.float32, torch.bfloat16):
        _assert_matmul_close(kernel(x.to(dtype)), _reference(x, qt, bias), k)


def test_rtn_quantization_error_bounds() -> None:
    w = torch.randn(64, 256) * 0.1
    err4 = (quantize_int4(w, 32).dequantize() - w).abs()
    groups = w.view(64, 8, 32)
    half_step = ((groups.amax(2) - groups.amin(2)) / 15 / 2).repeat_interleave(32, 1)
    assert bool((err4 <= half_step + 1e-6).all())
    err8 = (quantize_int8(w).dequantize() - w).abs()
    assert bool((err8 <= w.abs().amax(1, keepdim=True) / 127 / 2 + 1e-7).all())


def test_quantized_kernel_switches_to_dense_above_max_rows() -> None:
    w = torch.randn(64, 128) * 0.05
    qt = quantize_int4(w)
    dense = DenseKernel(qt.dequantize().to(torch.bfloat16), None, prepack=True)
    kernel = QuantizedKernel(qt, None, dense, max_rows=4)
    x = torch.randn(9, 128).to(torch.bfloat16)
    # Rows 0..3 alone run the packed codes, all 9 the dense copy: the same weights either way.
    torch.testing.assert_close(kernel(x)[:4], kernel(x[:4]), atol=0.05, rtol=0.02)
    assert kernel.name == "int4-g32 (<= 4 rows; else bfloat16-prepacked)"


# ---- GGUF blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0], ids=lambda q: q.name)
def test_gguf_blocks_equal_gguf_dequantize(qtype) -> None:
    """Codes and scales read from the blocks give gguf-py's dequantized values: bit-exact for
    Q4_0/Q8_0 (w = d * q); Q4_1's ``d * (q - 8) + (m + 8 d)`` regroups ``d * q + m`` in float32,
    a rounding difference of at most a few ulps of the block's magnitude."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 2, (48, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(w.shape))
    qt = from_gguf_blocks(qtype.name, raw, w.shape)
    atol = 0 if qtype != QT.Q4_1 else 4 * torch.finfo(torch.float32).eps * float(want.abs().max())
    torch.testing.assert_close(qt.dequantize(), want, rtol=0, atol=atol)
    # The packed kernel computes with bfloat16 scales: within the activations' tolerance.
    x = torch.randn(3, 256)
    kernel = QuantizedKernel(qt, None, None, 8, ops=OPS)
    _assert_matmul_close(kernel(x), x.to(torch.bfloat16).double() @ want.double().T, 256)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0], ids=lambda q: q.name)
def test_read_gguf_quantized_matches_float_reader(tmp_path, arch, qtype) -> None:
    """Packed reading names, shapes and row order (llama's q/k un-permuting) agree with the
    float reader for every linear weight of a tiny model."""
    _, path = tiny_gguf(tmp_path, arch, qtype)
    packed = read_gguf_quantized(path)
    dense = read_gguf(path).tensors
    linears = {n for n, t in dense.items() if t.dim() == 2}
    assert linears <= packed.keys()
    for name in linears:
        qt = packed[name]
        assert isinstance(qt, QuantizedTensor), name
        torch.testing.assert_close(qt.dequantize(), dense[name], rtol=0, atol=1e-6, msg=name)


# ---- the default model on its default path ------------------------------------------------

PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It "
    "is named after the engineer Gustave Eiffel, whose company designed and built the tower from "
    "1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece of the "
    "1889 World's Fair, and to crown the centennial anniversary of the French Revolution. "
    "Although initially criticised by some of France's leading artists and intellectuals for its "
    "design, it has since become a global cultural icon of France and one of the most "
    "recognisable structures in the world."
)


def _perplexity(runner: ModelRunner, ids: list[int]) -> float:
    row = runner.req_to_token.alloc()
    runner.req_to_token.write(row, 0, runner.kv_pool.alloc(len(ids)))
    out = runner.forward([BatchEntry(row, 0, ids, logprob_start=0, logprob_targets=ids[1:])])
    return math.exp(-float(np.mean(out.input_logprobs[0].logprobs)))


def test_default_path_perplexity_within_2_percent(
    default_model_dir, default_tokenizer, hf_default_model
) -> None:
    ids = default_tokenizer.encode(PASSAGE)
    with torch.no_grad():
        logits = hf_default_model(torch.tensor([ids])).logits[0, :-1].double()
    ref = math.exp(-float(torch.log_softmax(logits, -1)[range(len(ids) - 1), ids[1:]].mean()))
    runner = ModelRunner(
        RunnerConfig(model_path=default_model_dir, max_total_tokens=1024, max_running_requests=2)
    )
    assert runner.linear_setup.quantization == "gguf"
    got = _perplexity(runner, ids)
    print(f"perplexity: HF float32 {ref:.3f}, default path {got:.3f}")
    assert abs(got / ref - 1) < 0.02, (got, ref)
    # The same passage scored a token at a time (the packed kernels' decode regime).
    row = runner.req_to_token.alloc()
    lps = []
    for i, tok in enumerate(ids[:-1]):
        runner.req_to_token.write(row, i, runner.kv_pool.alloc(1))
        out = runner.forward([BatchEntry(row, i, [tok])])
        lps.append(float(torch.log_softmax(out.next_token_logits[0].double(), -1)[ids[i + 1]]))
    stepwise = math.exp(-float(np.mean(lps)))
    print(f"perplexity token by token {stepwise:.3f}")
    assert abs(stepwise / ref - 1) < 0.02, (stepwise, ref)
