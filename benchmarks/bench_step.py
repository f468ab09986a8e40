"""Where a decode step's time goes: matmuls vs everything else, per engine configuration.

Runs the model runner alone (no scheduler) on the default model: prefills ``--batch`` prompts,
then times ``--steps`` decode steps. Then it times the same step's matmuls on their own: every
linear layer's kernel and the LM head, called in the model's order on inputs of the step's
shape (the fused decode pass runs its layer loop in C++, where a Python timer cannot reach).
Reports the step time, that matmul time and the share that is not matmul (norms, rotary, KV
writes, attention, Python and dispatch) — the overhead the fused CPU ops exist to cut (issue
12's aim: under 25% at batch 1). Configurations run one after the
other in this process, each in turn for several rounds, so background load hits them alike.

    python benchmarks/bench_step.py [--batch 1] [--steps 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from smallm.runtime.cpu_features import cpu_features
from smallm.runtime.model.default_model import default_model_path
from smallm.runtime.model.forward_batch import BatchEntry
from smallm.runtime.model.layers import Linear
from smallm.runtime.model.model_runner import ModelRunner, RunnerConfig

CONFIGS = {
    # What issue 12 started from: float32, dense, eager torch ops, gathered attention.
    "before: float32 dense unfused": {
        "dtype": "float32",
        "quantization": "none",
        "disable_fused_kernels": True,
    },
    "default": {},
    "default fused-off": {"disable_fused_kernels": True},
    "default quantization-none": {"quantization": "none"},
}


def _matmul_seconds(runner: ModelRunner, rows: int, reps: int = 5) -> float:
    """The best time of one pass of the step's matmuls alone, in the model's order."""
    calls = []
    for module in runner.model.modules():
        if isinstance(module, Linear):
            fn = module.kernel or module
            calls.append((fn, torch.randn(rows, module.in_features).to(runner.dtype)))
    head_in = torch.randn(rows, runner.model_config.hidden_size).to(runner.dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(reps):
            t = time.perf_counter()
            for fn, x in calls:
                fn(x)
            runner._lm_head(head_in)
            best = min(best, time.perf_counter() - t)
    return best


def _setup(kw: dict, batch: int, prompt_len: int, steps: int):
    runner = ModelRunner(
        RunnerConfig(
            model_path=default_model_path(),
            max_total_tokens=batch * (prompt_len + steps + 8) + 16,
            max_running_requests=batch,
            **kw,
        )
    )
    return runner


def _run(runner: ModelRunner, batch: int, prompt_len: int, steps: int):
    """Prefill, then decode ``steps`` tokens; returns per-step seconds and the matmul time."""
    rows = [runner.req_to_token.alloc() for _ in range(batch)]
    prompts = [[100 + (i * 7 + j) % 30000 for j in range(prompt_len)] for i in range(batch)]
    entries = []
    for row, p in zip(rows, prompts):
        runner.req_to_token.write(row, 0, runner.kv_pool.alloc(len(p)))
        entries.append(BatchEntry(row, 0, p))
    runner.forward(entries)
    totals = []
    for step in range(steps):
        entries = []
        for row in rows:
            runner.req_to_token.write(row, prompt_len + step, runner.kv_pool.alloc(1))
            entries.append(BatchEntry(row, prompt_len + step, [5]))
        t = time.perf_counter()
        runner.forward(entries)
        totals.append(time.perf_counter() - t)
    for row in rows:
        runner.kv_pool.free(runner.req_to_token.read(row, 0, prompt_len + steps).copy())
        runner.req_to_token.free(row)
    return totals, [_matmul_seconds(runner, batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    ap.add_argument("--out-json", default=None)
    args = ap.parse_args()
    print(f"# CPU: {cpu_features().summary()}")
    print(f"# torch {torch.__version__}, batch {args.batch}, prompt {args.prompt_len}")
    names = [n.strip() for n in args.configs.split(",")]
    setups = {n: _setup(CONFIGS[n], args.batch, args.prompt_len, args.steps) for n in names}
    results: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for _ in range(args.rounds):
        for name in names:
            totals, matmuls = _run(setups[name], args.batch, args.prompt_len, args.steps)
            results[name][0].extend(totals)
            results[name][1].extend(matmuls)
    print(
        "\n| configuration | step ms (median) | tok/s | matmul ms | not matmul ms | not-matmul share |"
    )
    print("|---|---|---|---|---|---|")
    rows = []
    for name in names:
        totals, matmuls = results[name]
        t, m = statistics.median(totals), statistics.median(matmuls)
        share = (t - m) / t
        rows.append({"config": name, "step_ms": t * 1e3, "matmul_ms": m * 1e3, "share": share})
        print(
            f"| {name} | {t * 1e3:.2f} | {args.batch / t:.1f} | {m * 1e3:.2f} | "
            f"{(t - m) * 1e3:.2f} | {share * 100:.0f}% |"
        )
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"cpu": cpu_features().summary(), "batch": args.batch, "rows": rows}, f)


if __name__ == "__main__":
    main()
