"""smallm's fused C++ CPU ops against the plain torch code they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from smallm.kernels.cpu.build import build_key, load_fused_ops
from smallm.runtime.cpu_features import cpu_features
from smallm.runtime.model.layers import RMSNorm
from smallm.runtime.model.rotary import _rotate

OPS = load_fused_ops()
DTYPES = [torch.float32, torch.bfloat16]
# float32: summation order only; bfloat16: one rounding of the output (2^-8 relative), where
# torch rounds after every op (so a result may differ by an ulp or two).
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def test_built_for_this_cpu() -> None:
    assert OPS is not None, "the fused ops did not build (is a C++ compiler installed?)"
    assert len(build_key()) == 12
    assert cpu_features().isa in cpu_features().summary()


def _rand(*shape, dtype, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_norms(dtype, rows) -> None:
    x, res = _rand(rows, 576, dtype=dtype, seed=1), _rand(rows, 576, dtype=dtype, seed=2)
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data = _rand(576, dtype=dtype, seed=3)
    torch.testing.assert_close(OPS.rms_norm(x, norm.weight, 1e-5), norm(x), **TOL[dtype])
    want_norm, want_res = norm.add_and_norm(x, res)
    got_res = res.clone()
    got_norm = OPS.add_rms_norm(x, got_res, norm.weight, 1e-5)
    assert torch.equal(got_res, want_res)  # the residual add is one rounded op either way
    torch.testing.assert_close(got_norm, want_norm, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype) -> None:
    gu = _rand(5, 2 * 1536, dtype=dtype) * 4
    gate, up = gu.split(1536, -1)
    torch.testing.assert_close(OPS.silu_mul(gu), F.silu(gate) * up, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store(dtype) -> None:
    t, hq, hk, d = 6, 9, 3, 64
    qkv = _rand(t, (hq + 2 * hk) * d, dtype=dtype)
    positions = torch.tensor([0, 5, 6, 7, 100, 2047])
    freqs = torch.outer(torch.arange(2048.0), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos, sin = freqs.cos(), freqs.sin()
    k_pool, v_pool = torch.zeros(40, hk, d, dtype=dtype), torch.zeros(40, hk, d, dtype=dtype)
    slots = torch.tensor([3, 9, 1, 30, 39, 17])
    q = OPS.rope_store(qkv, positions, cos, sin, k_pool, v_pool, slots, hq, hk)
    qr, kr, vr = qkv.float().split([hq * d, hk * d, hk * d], -1)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    torch.testing.assert_close(q.float(), _rotate(qr.view(t, hq, d), c, s), **TOL[dtype])
    torch.testing.assert_close(
        k_pool[slots].float(), _rotate(kr.view(t, hk, d), c, s), **TOL[dtype]
    )
    assert torch.equal(v_pool[slots], vr.view(t, hk, d).to(dtype))
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots] = False
    assert not k_pool[untouched].any() and not v_pool[untouched].any()
    with pytest.raises(RuntimeError, match="slot"):
        OPS.rope_store(qkv, positions, cos, sin, k_pool, v_pool, slots + 100, hq, hk)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 70), st.integers(1, 4)), min_size=1, max_size=5),
    st.sampled_from([(4, 4), (9, 3), (8, 1)]),
    st.sampled_from(DTYPES),
    st.sampled_from([32, 64, 128]),  # 64 and 128 take the AVX-512 loops where the CPU has them
    st.integers(0, 1000),
)
def test_paged_attention_matches_sdpa(reqs, heads, dtype, d, seed) -> None:
    """Query tokens of several requests (decodes and short extends) over a shuffled pool: each
    equals SDPA over that request's gathered keys, causal within its own new tokens."""
    hq, hk = heads
    gen = torch.Generator().manual_seed(seed)
    total = sum(n for n, _ in reqs)
    k_pool = torch.randn(total + 1, hk, d, generator=gen).to(dtype)
    v_pool = torch.randn(total + 1, hk, d, generator=gen).to(dtype)
    perm = torch.randperm(total, generator=gen) + 1
    table = torch.zeros(len(reqs) + 2, 80, dtype=torch.int64)
    rows, lens, want = [], [], []
    q = torch.randn(sum(w for _, w in reqs), hq, d, generator=gen).to(dtype)
    used = qi = 0
    for r, (n, width) in enumerate(reqs):
        slots = perm[used : used + n]
        used += n
        table[r + 1, :n] = slots
        keys = k_pool[slots].float().transpose(0, 1)  # [Hk, n, D]
        vals = v_pool[slots].float().transpose(0, 1)
        for j in range(width):  # the request's last `width` tokens are the new ones
            kv_len = max(1, n - width + 1 + j)
            rows.append(r + 1)
            lens.append(kv_len)
            out = F.scaled_dot_product_attention(
                q[qi].float().unsqueeze(1),  # [Hq, 1, D]
                keys[:, :kv_len].repeat_interleave(hq // hk, 0),
                vals[:, :kv_len].repeat_interleave(hq // hk, 0),
                scale=d**-0.5,
            )
            want.append(out.squeeze(1))
            qi += 1
    got = OPS.paged_attention(
        q, k_pool, v_pool, table, torch.tensor(rows), torch.tensor(lens), d**-0.5
    )
    torch.testing.assert_close(got.float(), torch.stack(want), **TOL[dtype])
