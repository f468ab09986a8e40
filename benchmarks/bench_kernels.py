"""smallm's Triton kernels: speed on a CUDA GPU, correctness everywhere.

On a CUDA machine, times each kernel and its torch reference (or the torch op the CPU runtime
uses) on serving-sized shapes and reports achieved GB/s for the memory-bound kernels (decode
attention, KV store, RMSNorm, rotary, bitmask) and TFLOP/s for extend attention, next to the
device's peak when it is known. On a machine without a GPU it runs a correctness sweep of every
kernel against its reference in Triton's interpreter (TRITON_INTERPRET=1, small shapes) and
says that no performance was measured.

    python benchmarks/bench_kernels.py [--dtype bfloat16] [--batch 64] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

# Peak numbers for a few common GPUs: (HBM GB/s, dense bf16 TFLOP/s).
_PEAKS = {
    "H100": (3350.0, 989.0),
    "A100": (2039.0, 312.0),
    "L4": (300.0, 121.0),
    "A10": (600.0, 125.0),
    "4090": (1008.0, 165.0),
    "T4": (320.0, 65.0),
}


def _peaks(name: str) -> tuple[float, float] | None:
    return next((v for k, v in _PEAKS.items() if k in name), None)


def _time_ms(fn, iters: int = 50) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=iters))


def _report(name: str, ms: float, ref_ms: float, amount: float, unit: str, peak: float | None):
    rate = amount / (ms * 1e-3)
    scale = 1e9 if unit == "GB/s" else 1e12
    peak_s = f" / peak {peak:.0f}" if peak else ""
    print(
        f"{name:<22} {ms * 1e3:9.1f} us  {rate / scale:8.1f} {unit}{peak_s}"
        f"   (torch reference {ref_ms * 1e3:9.1f} us, {ref_ms / ms:5.1f}x)"
    )


def bench_gpu(args: argparse.Namespace) -> None:
    from smallm.kernels.decode_attention import decode_attention
    from smallm.kernels.extend_attention import extend_attention
    from smallm.kernels.kv_store import store_kv
    from smallm.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_reference
    from smallm.kernels.rotary import apply_rotary, apply_rotary_reference
    from smallm.kernels.token_bitmask import apply_token_bitmask
    from smallm.runtime.sampling.batch_info import apply_token_bitmask_

    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name()
    peaks = _peaks(name)
    bw_peak, flop_peak = peaks if peaks else (None, None)
    print(f"device {name}; {args.dtype}; peaks: {peaks or 'unknown'} (GB/s, TFLOP/s)")
    b, n, hq, hk, d = args.batch, args.seq_len, args.q_heads, args.kv_heads, args.head_dim
    el = torch.empty(0, dtype=dtype).element_size()
    slots = b * n + 1
    k_buf = torch.randn(slots, hk, d, dtype=dtype, device=dev)
    v_buf = torch.randn_like(k_buf)
    table = (torch.arange(b * n, device=dev) + 1).view(b, n)
    rows = torch.arange(b, device=dev)
    scale = d**-0.5

    # Decode: one query per request over n cached tokens each.
    q = torch.randn(b, hq, d, dtype=dtype, device=dev)
    lens = torch.full((b,), n, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)

    def sdpa_decode():
        keys = k_buf.index_select(0, table.view(-1)).view(b, n, hk, d).transpose(1, 2)
        values = v_buf.index_select(0, table.view(-1)).view(b, n, hk, d).transpose(1, 2)
        torch.nn.functional.scaled_dot_product_attention(
            q.view(b, hk, hq // hk, d), keys, values, scale=scale
        )

    ms = _time_ms(lambda: decode_attention(q, k_buf, v_buf, table, rows, lens, scale, out=out))
    _report("decode attention", ms, _time_ms(sdpa_decode), 2 * b * n * hk * d * el, "GB/s", bw_peak)

    # Extend: b_ext requests of args.extend_len new tokens, each with a prefix of the same size.
    be, m = max(1, b // 16), args.extend_len
    qe = torch.randn(be * m, hq, d, dtype=dtype, device=dev)
    ke = torch.randn(be * m, hk, d, dtype=dtype, device=dev)
    ve = torch.randn_like(ke)
    pre = torch.full((be,), min(m, n), dtype=torch.int32, device=dev)
    ext = torch.full((be,), m, dtype=torch.int32, device=dev)
    starts = torch.arange(be, device=dev) * m
    flops = 4 * be * hq * d * (m * min(m, n) + m * m / 2)

    def sdpa_extend():
        torch.nn.functional.scaled_dot_product_attention(
            qe.view(be, m, hq, d).transpose(1, 2),
            ke.view(be, m, hk, d).transpose(1, 2),
            ve.view(be, m, hk, d).transpose(1, 2),
            is_causal=True,
            enable_gqa=True,
        )

    ms = _time_ms(
        lambda: extend_attention(
            qe, ke, ve, k_buf, v_buf, table, rows[:be], pre, ext, starts, m, scale
        )
    )
    _report("extend attention", ms, _time_ms(sdpa_extend), flops, "TFLOP/s", flop_peak)

    # KV store of one decode step's worth of tokens per request... times 16 for a measurable size.
    t = b * 16
    loc = torch.randperm(slots - 1, device=dev)[:t] + 1
    k_new = torch.randn(t, hk, d, dtype=dtype, device=dev)
    v_new = torch.randn_like(k_new)

    def index_copy():
        k_buf.index_copy_(0, loc, k_new)
        v_buf.index_copy_(0, loc, v_new)

    ms = _time_ms(lambda: store_kv(k_buf, v_buf, loc, k_new, v_new))
    _report("kv store", ms, _time_ms(index_copy), 4 * t * hk * d * el, "GB/s", bw_peak)

    hidden = args.hidden
    x = torch.randn(t, hidden, dtype=dtype, device=dev)
    res = torch.randn_like(x)
    w = torch.randn(hidden, dtype=dtype, device=dev)
    ms = _time_ms(lambda: fused_add_rms_norm(x, res, w, 1e-6))
    ref = _time_ms(lambda: fused_add_rms_norm_reference(x, res, w, 1e-6))
    _report("add + rmsnorm", ms, ref, 4 * t * hidden * el, "GB/s", bw_peak)

    qr = torch.randn(t, hq, d, dtype=dtype, device=dev)
    kr = torch.randn(t, hk, d, dtype=dtype, device=dev)
    cos = torch.randn(t, d // 2, dtype=dtype, device=dev)
    sin = torch.randn_like(cos)
    ms = _time_ms(lambda: apply_rotary(qr, kr, cos, sin))
    ref = _time_ms(lambda: apply_rotary_reference(qr, kr, cos, sin))
    _report("rotary", ms, ref, 2 * t * (hq + hk) * d * el, "GB/s", bw_peak)

    vocab = 128256
    logits = torch.randn(b, vocab, device=dev)
    mask = torch.randint(-(2**31), 2**31 - 1, (b, (vocab + 31) // 32), device=dev).int()
    ms = _time_ms(lambda: apply_token_bitmask(logits, mask))
    ref = _time_ms(lambda: apply_token_bitmask_(logits, mask))
    _report("token bitmask", ms, ref, b * vocab * 4 + mask.numel() * 4, "GB/s", bw_peak)


def correctness_sweep() -> int:
    """Run tests/test_kernels.py's kernel checks (not the model ones) in the interpreter."""
    import pytest

    here = os.path.dirname(os.path.abspath(__file__))
    test_file = os.path.join(here, os.pardir, "tests", "test_kernels.py")
    kernels_only = "decode or extend or store or bitmask or rms or rotary"
    return pytest.main(["-q", "-p", "no:randomly", test_file, "-k", kernels_only])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--extend-len", type=int, default=1024)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args()
    if torch.cuda.is_available():
        bench_gpu(args)
        return
    print(
        "no CUDA GPU: running the correctness sweep only, every kernel against its torch "
        "reference in Triton's interpreter (TRITON_INTERPRET=1). No performance is measured: "
        "interpreter timings say nothing about GPU speed."
    )
    os.environ["TRITON_INTERPRET"] = "1"
    sys.exit(correctness_sweep())


if __name__ == "__main__":
    main()
