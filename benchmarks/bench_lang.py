"""Prompt-program throughput: compiled vs interpreted ``run_batch``, and SGLang's frontend.

One smallm server (default model) serves three drivers in turn, on the same programs:

* ``compiled``: ``run_batch(..., compiled=True)``: the constant prefix prefilled once, then the
  programs step-aligned, one batched ``/generate`` per round of gens across the batch;
* ``interpreted``: ``run_batch(...)``: a thread per program, one request per gen;
* ``sglang``: the ``sglang==0.5.2`` frontend (``sgl.RuntimeEndpoint`` + its ``run_batch``,
  which also prefills the traced prefix once) driving the same server.

Workloads: ``few_shot`` (N few-shot QA programs sharing a few-shot prefix, two gens each),
``tot`` (a tree of thought: fork 3 plans, fork 2 answers under each, then a final answer) and
``classify`` (N programs with two 3-way selects each: little compute per request).

``--tiny`` serves a tiny random model with the default tokenizer instead (gibberish text, almost
no compute per token): it stands in for a server whose model steps are cheap next to the cost of
a request, as on a GPU, where per-request overhead decides.
Greedy decoding, the prefix cache flushed before each run. HTTP requests are counted on the
client (smallm's endpoint counter; sglang's ``http_request`` wrapped), and so is the client's
CPU time (it shares the machine's cores with the server).

    python benchmarks/bench_lang.py [--few-shot 200] [--tot 24] [--classify 200] [--tiny]
        [--drivers compiled,interpreted,sglang]

Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from smallm.runtime.cpu_threads import prefer_passive_openmp

if "openblas" in sys.argv:  # before torch loads; see smallm/runtime/cpu_threads.py
    prefer_passive_openmp()

import smallm as sl

FEW_SHOT = (
    "Answer each question in a few words.\n\n"
    "Q: What is the capital of Italy?\nA: Rome\n"
    "Q: How many legs does a spider have?\nA: Eight\n"
    "Q: What colour is grass?\nA: Green\n"
    "Q: What is 3 plus 4?\nA: 7\n"
    "Q: Which animal says moo?\nA: A cow\n"
    "Q: What is the opposite of hot?\nA: Cold\n"
)
COUNTRIES = [
    "France", "Germany", "Spain", "Japan", "Canada", "Egypt", "Brazil", "India", "Kenya",
    "Norway", "Peru", "Greece", "Chile", "Cuba", "Ireland", "Poland", "Sweden", "Turkey",
    "Mexico", "China",
]  # fmt: skip


def questions(n: int) -> list[str]:
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(f"What is the capital of {COUNTRIES[(i // 2) % len(COUNTRIES)]}?")
        else:
            out.append(f"What is {i % 17} plus {i % 11 + 2}?")
    return out


def define_programs(lang):
    """The two programs, written once against an SGLang-compatible module (smallm or sglang)."""

    @lang.function
    def few_shot_qa(s, question):
        s += FEW_SHOT
        s += "Q: " + question + "\nA:" + lang.gen("answer", max_tokens=12, stop="\n")
        s += "\nQ: Say that again in one word.\nA:" + lang.gen("again", max_tokens=6, stop="\n")

    @lang.function
    def tree_of_thought(s, question):
        s += "Think step by step and answer the question.\nQuestion: " + question + "\n"
        plans = s.fork(3)
        plans += lambda i: f"Idea {i + 1}:" + lang.gen("plan", max_tokens=16, stop="\n")
        for plan in plans:
            answers = plan.fork(2)
            answers += lambda j: f"\nAnswer {j + 1}:" + lang.gen("answer", max_tokens=8, stop="\n")
            answers.join()
        plans.join()
        s += "Final answer:" + lang.gen("final", max_tokens=12, stop="\n")

    @lang.function
    def classify(s, question):
        s += FEW_SHOT + "Q: " + question + "\n"
        s += "Topic:" + lang.select("topic", [" geography", " arithmetic", " animals"])
        s += "\nAnswer length:" + lang.select("length", [" one word", " a number", " a sentence"])

    return {"few_shot": few_shot_qa, "tot": tree_of_thought, "classify": classify}


def run_smallm(url: str, workload: str, args: list[dict], compiled: bool) -> dict:
    endpoint = sl.RuntimeEndpoint(url)
    endpoint.flush_cache()
    program = define_programs(sl)[workload]
    endpoint.requests_sent = 0
    t0, c0 = time.perf_counter(), time.process_time()
    states = program.run_batch(args, backend=endpoint, temperature=0, compiled=compiled)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    errors = [s.error() for s in states if s.error() is not None]
    return {"seconds": dt, "cpu": cpu, "requests": endpoint.requests_sent,
            "texts": [s.text() for s in states], "errors": errors}  # fmt: skip


def run_sglang(url: str, workload: str, args: list[dict]) -> dict:
    import sglang
    import sglang.lang.backend.runtime_endpoint as rte

    backend = sglang.RuntimeEndpoint(url, chat_template_name="chatml")
    backend.flush_cache()
    count = [0]
    original = rte.http_request

    def counting(*a, **kw):
        count[0] += 1
        return original(*a, **kw)

    rte.http_request = counting
    try:
        program = define_programs(sglang)[workload]
        t0, c0 = time.perf_counter(), time.process_time()
        states = program.run_batch(args, backend=backend, temperature=0)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        rte.http_request = original
    errors = [s.error() for s in states if s.error() is not None]
    return {"seconds": dt, "cpu": cpu, "requests": count[0], "texts": [s.text() for s in states],
            "errors": errors}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="default: the default model")
    p.add_argument("--few-shot", type=int, default=200, help="few-shot QA programs")
    p.add_argument("--tot", type=int, default=24, help="tree-of-thought programs")
    p.add_argument("--classify", type=int, default=200, help="select-only programs")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (cheap steps)")
    p.add_argument("--drivers", default="compiled,interpreted,sglang")
    p.add_argument("--max-total-tokens", type=int, default=65536)
    p.add_argument("--url", default=None, help="use a running server instead of starting one")
    a = p.parse_args()
    drivers = a.drivers.split(",")
    workloads = {
        "few_shot": [{"question": q} for q in questions(a.few_shot)],
        "tot": [{"question": q} for q in questions(a.tot)],
        "classify": [{"question": q} for q in questions(a.classify)],
    }
    runtime = None
    url = a.url
    model_path = a.model_path
    if a.tiny:
        from smallm.runtime.model.default_model import default_model_path
        from smallm.runtime.model.random_model import make_tiny_chat_model

        tiny_dir = Path(tempfile.mkdtemp()) / "tiny"
        model_path = str(make_tiny_chat_model(tiny_dir, default_model_path()))
    if url is None:
        runtime = sl.Runtime(model_path=model_path, max_total_tokens=a.max_total_tokens)
        url = runtime.base_url
    try:
        # One untimed program so every driver meets a warm server.
        run_smallm(url, "few_shot", workloads["few_shot"][:2], compiled=False)
        results: dict[tuple[str, str], dict] = {}
        for workload, args in workloads.items():
            if not args:
                continue
            for driver in drivers:
                if driver == "sglang":
                    r = run_sglang(url, workload, args)
                else:
                    r = run_smallm(url, workload, args, compiled=driver == "compiled")
                results[workload, driver] = r
                print(f"{workload:9s} {driver:12s} {r['seconds']:7.1f} s  "
                      f"{r['requests']:5d} requests  {len(r['errors'])} errors", flush=True)  # fmt: skip
    finally:
        if runtime is not None:
            runtime.shutdown()

    model = "tiny random model" if a.tiny else (a.model_path or "default model")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {model}; "
          f"few_shot={a.few_shot}, tot={a.tot}, classify={a.classify} programs\n")  # fmt: skip
    print("| workload | driver | programs/s | seconds | client CPU s | HTTP requests | "
          "vs interpreted | same text as interpreted |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (workload, driver), r in results.items():
        n = len(workloads[workload])
        base = results.get((workload, "interpreted"))
        speed = f"{base['seconds'] / r['seconds']:.2f}x" if base else "-"
        same = "-"
        if base:
            same = f"{sum(x == y for x, y in zip(r['texts'], base['texts']))}/{n}"
        print(f"| {workload} | {driver} | {n / r['seconds']:.2f} | {r['seconds']:.1f} | "
              f"{r['cpu']:.1f} | {r['requests']} | {speed} | {same} |")  # fmt: skip
    for (workload, driver), r in results.items():
        for e in r["errors"][:3]:
            print(f"error ({workload}, {driver}): {e!r}")


if __name__ == "__main__":
    main()
