"""Served throughput vs the in-process Engine on the same workload, and ITL under load.

1. The Engine (no HTTP, no processes) runs all N requests at once: the baseline.
2. A smallm server subprocess on the same model and flags gets the same requests (same token
   ids, ``ignore_eos``, same lengths) from ``bench_serving.py``'s load generator at fixed
   concurrency C (streaming, native API); then at each concurrency in ``--itl-concurrency`` to
   show how inter-token latency behaves as streams are added.

    python benchmarks/bench_server_vs_engine.py [--num-prompts 64] [--input-len 128]
        [--output-len 64] [--concurrency 64] [--itl-concurrency 1,16,64] [--model-path DIR]

Run on an otherwise idle machine: a concurrent process changes the numbers several-fold.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smallm.runtime.cpu_threads import prefer_passive_openmp

if "openblas" in sys.argv:  # before torch loads; see smallm/runtime/cpu_threads.py
    prefer_passive_openmp()

import bench_serving as bs

from smallm.lang import Runtime


def run_engine(model_path: str, specs: list, server_flags: dict) -> tuple[float, int]:
    from smallm.runtime.engine import Engine

    with Engine(model_path, **server_flags) as engine:
        engine.generate(input_ids=[specs[0].input_ids], sampling_params={"max_new_tokens": 4})
        engine.flush_cache()
        params = [
            {"max_new_tokens": s.output_len, "temperature": 0, "ignore_eos": True} for s in specs
        ]
        t0 = time.perf_counter()
        outs = engine.generate(input_ids=[s.input_ids for s in specs], sampling_params=params)
        dt = time.perf_counter() - t0
    return dt, sum(o["meta_info"]["completion_tokens"] for o in outs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="default: the default model")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--itl-concurrency", default="1,16,64")
    p.add_argument("--max-total-tokens", type=int, default=32768)
    args = p.parse_args()

    from smallm.runtime.model.loader import resolve_model_path

    model_path = str(resolve_model_path(args.model_path))
    cfg = bs.BenchmarkConfig(
        num_prompts=args.num_prompts,
        random_input_len=args.input_len,
        random_output_len=args.output_len,
        max_concurrency=args.concurrency,
        tokenizer=model_path,
        disable_tqdm=True,
    )
    tokenizer = bs.load_tokenizer(model_path)
    specs = bs.build_requests(cfg, tokenizer)
    flags = {"max_total_tokens": args.max_total_tokens}

    print(f"Engine: {len(specs)} requests x {args.input_len} in / {args.output_len} out ...")
    engine_s, engine_tokens = run_engine(model_path, specs, flags)
    engine_tps = engine_tokens / engine_s

    # The server subprocess on a free port, stopped with SIGTERM when done.
    server = Runtime(model_path, max_total_tokens=args.max_total_tokens, log_level="warning")
    try:
        cfg.base_url = server.base_url
        warm = bs.BenchmarkConfig(**{**vars(cfg), "num_prompts": 2, "max_concurrency": 2})
        asyncio.run(bs.run_benchmark(warm, specs[:2], tokenizer=tokenizer))
        server.flush_cache()
        served = asyncio.run(bs.run_benchmark(cfg, specs, tokenizer=tokenizer))
        print(bs.format_result(served))
        itl_rows = []
        for c in [int(x) for x in args.itl_concurrency.split(",") if x]:
            server.flush_cache()
            n = max(c, min(len(specs), 2 * c))
            run_cfg = bs.BenchmarkConfig(**{**vars(cfg), "num_prompts": n, "max_concurrency": c})
            r = asyncio.run(bs.run_benchmark(run_cfg, specs[:n], tokenizer=tokenizer))
            itl_rows.append((c, r))
    finally:
        server.shutdown()

    print()
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print()
    print("| run | output tok/s | vs Engine |")
    print("|---|---|---|")
    print(f"| Engine, in-process, all {len(specs)} at once | {engine_tps:.1f} | 1.00x |")
    tps = served.output_throughput
    print(
        f"| server, {args.concurrency} concurrent streams | {tps:.1f} | {tps / engine_tps:.2f}x |"
    )
    print()
    print(
        "| concurrent streams | output tok/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms | E2E p99 ms |"
    )
    print("|---|---|---|---|---|---|")
    for c, r in itl_rows:
        print(
            f"| {c} | {r.output_throughput:.1f} | {r.ttft.p50_ms:.0f} | {r.itl.p50_ms:.1f} "
            f"| {r.itl.p99_ms:.1f} | {r.e2e.p99_ms:.0f} |"
        )  # fmt: skip


if __name__ == "__main__":
    main()
