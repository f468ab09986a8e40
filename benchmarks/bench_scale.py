"""Scale-out on a shared-prefix workload: one replica vs two, placed round-robin or cache-aware,
by smallm's own coordinator (``--dp-size 2``) and by SGLang's router in front of two servers.

The workload is many requests over a few long prefixes (``bench_serving.py``'s shared-prefix
dataset, sent as text so the router can route on it, in a shuffled order), streamed through the
native ``/generate`` at a fixed concurrency. For each set-up the table gives output throughput, TTFT p50/p99 and the
prefix-cache hit rate: cached prompt tokens / prompt tokens, from the servers' own
``sglang:cached_tokens`` and ``sglang:prompt_tokens`` counters (summed over the servers behind a
router), measured over the timed run only.

    python benchmarks/bench_scale.py [--num-prompts 128] [--num-groups 8] [--prefix-len 1024]
        [--question-len 32] [--output-len 16] [--concurrency 8] [--only dp2-cache_aware,...]

Every set-up gets the same cores: one server with all of them, two replicas (or two servers)
with half each. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shlex
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving as bs
from bench_process import BenchProcess

from smallm.lang.backends.runtime import free_port
from smallm.runtime.cpu_features import cpu_features


@dataclass
class Setup:
    name: str
    servers: list[list[str]]  # extra flags per smallm server
    router_policy: str | None = None  # sglang-router in front of the servers


def setups(cores: int) -> list[Setup]:
    half = str(max(cores // 2, 1))
    two = [["--torch-threads", half]] * 2
    return [
        Setup("1 replica", [[]]),
        Setup("dp2-round_robin", [["--dp-size", "2", "--load-balance-method", "round_robin"]]),
        Setup("dp2-cache_aware", [["--dp-size", "2", "--load-balance-method", "cache_aware"]]),
        Setup("router-round_robin", two, "round_robin"),
        Setup("router-cache_aware", two, "cache_aware"),
    ]


def _start_server(flags: list[str], max_total_tokens: int) -> BenchProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "smallm.launch_server", "--port", str(port)]
    cmd += ["--max-total-tokens", str(max_total_tokens), "--log-level", "warning", *flags]
    return BenchProcess(cmd, f"http://127.0.0.1:{port}", log_prefix="bench-scale-")


def _start_router(workers: list[str], policy: str) -> BenchProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--policy", policy, "--worker-urls", *workers]
    cmd += ["--log-level", "warn"]
    return BenchProcess(cmd, f"http://127.0.0.1:{port}", log_prefix="bench-scale-")


_COUNTER = re.compile(r"^(sglang:(?:cached|prompt)_tokens)_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def _cache_counters(urls: list[str]) -> tuple[float, float]:
    cached = prompt = 0.0
    for url in urls:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        for name, value in _COUNTER.findall(text):
            if name == "sglang:cached_tokens":
                cached += float(value)
            else:
                prompt += float(value)
    return cached, prompt


def run_setup(setup: Setup, cfg: bs.BenchmarkConfig, specs: list, max_total: int) -> dict:
    servers = [_start_server(f, max_total) for f in setup.servers]
    router = None
    try:
        for s in servers:
            s.wait_ready()
        urls = [s.url for s in servers]
        target = urls[0]
        if setup.router_policy is not None:
            router = _start_router(urls, setup.router_policy)
            router.wait_ready(120)
            target = router.url
        run_cfg = bs.BenchmarkConfig(**{**vars(cfg), "base_url": target})
        # Warm every replica's kernels with prompts unlike the workload's, then start cold.
        warm = bs.BenchmarkConfig(
            **{**vars(run_cfg), "dataset": "random", "num_prompts": 8, "random_input_len": 64}
        )
        asyncio.run(bs.run_benchmark(warm))
        for url in urls:
            urllib.request.urlopen(urllib.request.Request(url + "/flush_cache", method="POST"))
        c0, p0 = _cache_counters(urls)
        result = asyncio.run(bs.run_benchmark(run_cfg, specs))
        c1, p1 = _cache_counters(urls)
    finally:
        if router is not None:
            router.stop()
        for s in servers:
            s.stop()
    return {
        "name": setup.name,
        "result": result,
        "hit_rate": (c1 - c0) / (p1 - p0) if p1 > p0 else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--num-groups", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--question-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-total-tokens", type=int, default=16384, help="per server")
    p.add_argument("--only", default="", help="comma-separated set-up names to run")
    p.add_argument("--seed", type=int, default=1, help="the arrival order's shuffle")
    args = p.parse_args()

    cfg = bs.BenchmarkConfig(
        backend="smallm",
        dataset="shared-prefix",
        num_prompts=args.num_prompts,
        num_groups=args.num_groups,
        shared_prefix_len=args.prefix_len,
        question_len=args.question_len,
        random_output_len=args.output_len,
        max_concurrency=args.concurrency,
        disable_tqdm=True,
    )
    specs = bs.build_requests(cfg)
    # bench_serving interleaves the groups (prompt i is group i % G): with an even G and two
    # replicas, round-robin would send every group to one replica by accident. Shuffle.
    random.Random(args.seed).shuffle(specs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    chosen = [s for s in setups(cores or 1) if not args.only or s.name in args.only.split(",")]
    rows = []
    for setup in chosen:
        print(f"running {setup.name} ...", flush=True)
        rows.append(run_setup(setup, cfg, specs, args.max_total_tokens))

    print()
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"machine: {cpu_features().summary()}, {cores} cores")
    print(
        f"workload: {args.num_prompts} requests over {args.num_groups} prefixes of "
        f"~{args.prefix_len} tokens + ~{args.question_len}-token questions, {args.output_len} "
        f"output tokens, {args.concurrency} in flight, streamed /generate"
    )
    print()
    print("| set-up | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | cache hit rate | failed |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        r = row["result"]
        print(
            f"| {row['name']} | {r.output_throughput:.1f} | {r.request_throughput:.2f} | "
            f"{r.ttft.p50_ms:.0f} | {r.ttft.p99_ms:.0f} | {row['hit_rate']:.1%} | {r.failed} |"
        )


if __name__ == "__main__":
    main()
