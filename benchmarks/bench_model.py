"""Model runner vs HF transformers on the default model, in one run, on the same inputs.

For each dtype and batch size: prefill tokens/s (one forward over B prompts), decode step time
(B sequences, one token each), and end-to-end greedy generation tokens/s (smallm's static batch
vs HF ``generate``), plus the batch-1 memory-bandwidth bound: the bytes of weights read per
decode step divided by the measured read bandwidth.

    python benchmarks/bench_model.py [--dtypes float32,bfloat16] [--batch-sizes 1,16,64]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time

from smallm.runtime.cpu_threads import prefer_passive_openmp

if "openblas" in sys.argv:  # before torch loads; see smallm/runtime/cpu_threads.py
    prefer_passive_openmp()

import numpy as np
import torch


def measure_bandwidth_gbs(mib: int = 1024) -> float:
    """Read bandwidth with torch's threads: the best of a few sums over a large buffer."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class SmallmSide:
    def __init__(self, model_dir: str, dtype: str, max_batch: int, max_len: int, matmul: str):
        from smallm.runtime.model.model_runner import ModelRunner, RunnerConfig
        from smallm.runtime.static_batch import StaticBatchGenerator

        self.runner = ModelRunner(
            RunnerConfig(
                model_path=model_dir,
                dtype=dtype,
                max_total_tokens=max_batch * max_len + 16,
                max_running_requests=max_batch,
                matmul_backend=matmul,
            )
        )
        self.gen = StaticBatchGenerator(self.runner, eos_token_ids=[])
        self.threads = torch.get_num_threads()

    def _extend(self, rows, prefix, toks):
        from smallm.runtime.model.forward_batch import BatchEntry

        entries = []
        for row, p, t in zip(rows, prefix, toks):
            self.runner.req_to_token.write(row, p, self.runner.kv_pool.alloc(len(t)))
            entries.append(BatchEntry(row, p, t))
        return self.runner.forward(entries)

    def prefill_and_decode(self, prompts, steps):
        r = self.runner
        rows = [r.req_to_token.alloc() for _ in prompts]
        t_prefill = timed(lambda: self._extend(rows, [0] * len(rows), prompts))
        lens = [len(p) for p in prompts]
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            self._extend(rows, lens, [[5]] * len(rows))
            times.append(time.perf_counter() - t)
            lens = [n + 1 for n in lens]
        for row, n in zip(rows, lens):
            r.kv_pool.free(r.req_to_token.read(row, 0, n).copy())
            r.req_to_token.free(row)
        return t_prefill, float(np.median(times))

    def generate(self, prompts, new_tokens):
        from smallm.runtime.sampling import SamplingParams

        sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        return timed(lambda: self.gen.generate(prompts, sp))


class HFSide:
    def __init__(self, model_dir: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    @torch.inference_mode()
    def prefill_and_decode(self, prompts, steps):
        from transformers import DynamicCache

        ids = torch.tensor(prompts)
        cache = DynamicCache()
        t = time.perf_counter()
        self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        t_prefill = time.perf_counter() - t
        nxt = torch.full((len(prompts), 1), 5)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            self.model(input_ids=nxt, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
        return t_prefill, float(np.median(times))

    @torch.inference_mode()
    def generate(self, prompts, new_tokens):
        ids = torch.tensor(prompts)
        return timed(
            lambda: self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument(
        "--matmul-backends",
        default="torch,openblas",
        help="comma list of smallm matmul backends to measure (torch, openblas)",
    )
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    from smallm.runtime.model.loader import cpu_has_native_bf16, resolve_model_path

    model_dir = resolve_model_path(args.model_path)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    bw = measure_bandwidth_gbs()
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "?")
    print(
        f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"native bf16: {cpu_has_native_bf16()}, read bandwidth {bw:.1f} GB/s, "
        f"{platform.python_version()}"
    )
    rng = np.random.default_rng(0)
    max_b = max(batch_sizes)
    all_prompts = rng.integers(100, 49000, (max_b, args.prompt_len)).tolist()
    rows = []
    configs = [(d, m) for d in args.dtypes.split(",") for m in args.matmul_backends.split(",")]
    for dtype_name, matmul in configs:
        if dtype_name != "float32" and matmul == "openblas":
            continue
        dtype = getattr(torch, dtype_name)
        ours = SmallmSide(
            model_dir, dtype_name, max_b, args.prompt_len + args.new_tokens + 8, matmul
        )
        wbytes = weight_bytes(ours.runner.model)
        bound_ms = wbytes / (bw * 1e9) * 1e3
        hf = None if args.skip_hf else HFSide(model_dir, dtype)
        for b in batch_sizes:
            # HF runs under the thread count smallm chose last; give it every core.
            torch.set_num_threads(os.cpu_count() or 1)
            prompts = all_prompts[:b]
            # Warm up both (first calls pay one-off kernel selection costs).
            torch.set_num_threads(ours.threads)
            ours.prefill_and_decode(prompts[:1], 2)
            tp, td = ours.prefill_and_decode(prompts, args.decode_steps)
            tg = ours.generate(prompts, args.new_tokens)
            row = {
                "dtype": dtype_name,
                "matmul": ours.runner.matmul_backend,
                "B": b,
                "prefill": b * args.prompt_len / tp,
                "step": td * 1e3,
                "gen": b * args.new_tokens / tg,
            }
            if hf is not None:
                torch.set_num_threads(os.cpu_count() or 1)
                hf.prefill_and_decode(prompts[:1], 2)
                hp, hd = hf.prefill_and_decode(prompts, args.decode_steps)
                hg = hf.generate(prompts, args.new_tokens)
                row.update(
                    hf_prefill=b * args.prompt_len / hp,
                    hf_step=hd * 1e3,
                    hf_gen=b * args.new_tokens / hg,
                )
            if b == 1:
                row["bound_ms"] = bound_ms
            rows.append(row)
            print(_format_row(row), flush=True)
            gc.collect()
        del ours, hf
        gc.collect()
    print()
    print(_table(rows, args))


def _format_row(r: dict) -> str:
    return " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())


def _pair(r: dict, ours: str, theirs: str, fmt: str) -> str:
    return f"{r[ours]:{fmt}} / " + (f"{r[theirs]:{fmt}}" if theirs in r else "-")


def _table(rows: list[dict], args) -> str:
    out = [
        "| dtype | matmul | batch | prefill tok/s smallm / HF | decode step ms smallm / HF | "
        f"generate {args.new_tokens} tok/s smallm / HF | speed-up (generate) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r['gen'] / r['hf_gen']:.2f}x" if "hf_gen" in r else "-"
        out.append(
            f"| {r['dtype']} | {r['matmul']} | {r['B']} | {_pair(r, 'prefill', 'hf_prefill', '.0f')} | "
            f"{_pair(r, 'step', 'hf_step', '.1f')} | {_pair(r, 'gen', 'hf_gen', '.1f')} | "
            f"{speed} |"
        )
    for r in rows:
        if "bound_ms" in r:
            out.append(
                f"\n{r['dtype']} ({r['matmul']}) batch-1 decode step {r['step']:.1f} ms vs bandwidth bound "
                f"{r['bound_ms']:.1f} ms: {r['step'] / r['bound_ms']:.2f}x the bound"
            )
    return "\n".join(out)


if __name__ == "__main__":
    main()
