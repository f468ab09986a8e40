"""Constrained JSON extraction: unconstrained vs constrained vs constrained + jump-forward.

One run on the default model: N short synthetic documents (a person each), extracted into a
schema with 6 fixed keys, all handed to one ``Engine.generate`` call (continuous batching),
greedy, three ways:

1. unconstrained: the prompt asks for the JSON object, nothing enforces it;
2. constrained (``json_schema``), jump-forward off;
3. constrained, jump-forward on (the default).

Then the per-token mask cost (one batch of grammar rows filled and applied to logits, vs the
decode step measured in run 3) and the compile time (p50/p99, cold and cached).

    python benchmarks/bench_json.py [--num-docs 100] [--max-new-tokens 96] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time

from smallm.runtime.cpu_threads import prefer_passive_openmp

if "openblas" in sys.argv:  # before torch loads; see smallm/runtime/cpu_threads.py
    prefer_passive_openmp()

import jsonschema
import torch

from smallm.runtime.constrained import GrammarCompiler, create_grammar_backend
from smallm.runtime.engine import Engine
from smallm.runtime.sampling import apply_token_bitmask_, bitmask_words

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "occupation": {"type": "string", "maxLength": 40},
        "has_children": {"type": "boolean"},
        "email": {"type": "string", "maxLength": 60},
    },
    "required": ["name", "age", "city", "occupation", "has_children", "email"],
    "additionalProperties": False,
}
FIRST = [
    "Ada",
    "Ben",
    "Chloe",
    "Dan",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Liam",
    "Mona",
    "Nils",
    "Olga",
    "Pablo",
]
LAST = [
    "Smith",
    "Garcia",
    "Muller",
    "Rossi",
    "Novak",
    "Silva",
    "Tanaka",
    "Dubois",
    "Jensen",
    "Kowalski",
]
CITIES = [
    "Paris",
    "Berlin",
    "Madrid",
    "Rome",
    "Lisbon",
    "Vienna",
    "Prague",
    "Oslo",
    "Dublin",
    "Athens",
]
JOBS = ["teacher", "nurse", "engineer", "baker", "pilot", "lawyer", "farmer", "chef", "painter"]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        kids = rng.random() < 0.5
        docs.append(
            f"{first} {last} is {rng.randint(19, 80)} years old and works as a "
            f"{rng.choice(JOBS)} in {rng.choice(CITIES)}. "
            f"{'They have two children.' if kids else 'They have no children.'} "
            f"Contact: {first.lower()}.{last.lower()}@example.com"
        )
    return docs


def prompt(engine: Engine, doc: str) -> str:
    keys = ", ".join(SCHEMA["properties"])
    text = f"Extract {keys} from this text as a JSON object.\n\nText: {doc}"
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def run(engine: Engine, prompts: list[str], params: dict, jump_forward: bool) -> dict:
    engine.flush_cache()
    engine.scheduler.config.disable_jump_forward = not jump_forward
    steps0 = engine.scheduler.forward_steps
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    dt = time.perf_counter() - t0
    steps = engine.scheduler.forward_steps - steps0
    engine.scheduler.config.disable_jump_forward = False
    valid = 0
    for o in outs:
        try:
            jsonschema.validate(json.loads(o["text"]), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    forced = sum(o["meta_info"].get("jump_forward_tokens") or 0 for o in outs)
    return {
        "seconds": dt,
        "requests_per_s": len(outs) / dt,
        "output_tokens": tokens,
        "output_tok_per_s": tokens / dt,
        "forced_tokens": forced,
        "forward_steps": steps,
        "valid": valid,
        "n": len(outs),
    }


def mask_cost(engine: Engine, batch: int) -> float:
    """Seconds to fill and apply one step's bitmask for ``batch`` constrained rows."""
    backend = create_grammar_backend("llguidance", engine.tokenizer, engine.vocab_size)
    template = backend.compile("json_schema", json.dumps(SCHEMA))
    grammars = [template.copy() for _ in range(batch)]
    for g in grammars:  # mid-object states, where masks are the most expensive
        g.accept_string('{"name": "Ada Smith", "age": 3')
    mask = torch.full((batch, bitmask_words(engine.vocab_size)), -1, dtype=torch.int32)
    logits = torch.randn(batch, engine.vocab_size)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        for j, g in enumerate(grammars):
            g.fill_bitmask(mask, j)
        apply_token_bitmask_(logits, mask)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compile_times(engine: Engine, n: int) -> dict:
    compiler = GrammarCompiler(
        {"llguidance": create_grammar_backend("llguidance", engine.tokenizer, engine.vocab_size)}
    )
    cold, cached = [], []
    for i in range(n):
        spec = json.dumps({**SCHEMA, "title": f"variant {i}"})
        t0 = time.perf_counter()
        compiler.submit("llguidance", "json_schema", spec).result()
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        compiler.submit("llguidance", "json_schema", spec).result()
        cached.append(time.perf_counter() - t0)
    compiler.shutdown()

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    return {
        "cold_p50_ms": pct(cold, 0.5),
        "cold_p99_ms": pct(cold, 0.99),
        "cached_p50_ms": pct(cached, 0.5),
        "cached_p99_ms": pct(cached, 0.99),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-docs", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--model-path", default=None)
    p.add_argument("--quick", action="store_true", help="8 documents, to check the script")
    p.add_argument(
        "--max-running-requests",
        type=int,
        default=None,
        help="cap the batch (default: every document at once); small batches are bound by "
        "reading the weights, not by compute, which is where saving steps pays most",
    )
    p.add_argument(
        "--whitespace-pattern",
        default="",
        help='JSON whitespace regex (default "": compact JSON, the server default; try "[ ]?")',
    )
    args = p.parse_args()
    n = 8 if args.quick else args.num_docs

    flags = {"max_total_tokens": 32768, "grammar_whitespace_pattern": args.whitespace_pattern}
    if args.max_running_requests:
        flags["max_running_requests"] = args.max_running_requests
    with Engine(args.model_path, **flags) as engine:
        docs = documents(n)
        prompts = [prompt(engine, d) for d in docs]
        base = {"max_new_tokens": args.max_new_tokens, "temperature": 0}
        constrained = {**base, "json_schema": json.dumps(SCHEMA)}
        engine.generate(prompts[:2], constrained)  # warm up: compile, first forward passes
        rows = {
            "unconstrained": run(engine, prompts, base, jump_forward=False),
            "constrained, no jump-forward": run(engine, prompts, constrained, False),
            "constrained + jump-forward": run(engine, prompts, constrained, True),
        }
        jf = rows["constrained + jump-forward"]
        step_s = jf["seconds"] / max(jf["forward_steps"], 1)
        mask_s = mask_cost(engine, n)
        compiles = compile_times(engine, 100)

    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{n} documents, schema with {len(SCHEMA['properties'])} fixed keys, greedy, "
          f"max_new_tokens {args.max_new_tokens}, max running requests "
          f"{args.max_running_requests or n}, default grammar backend (llguidance)\n")  # fmt: skip
    print(
        "| mode | seconds | req/s | output tok/s | output tokens | forced | forward steps | valid |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['seconds']:.1f} | {r['requests_per_s']:.2f} | "
            f"{r['output_tok_per_s']:.1f} | {r['output_tokens']} | {r['forced_tokens']} | "
            f"{r['forward_steps']} | {r['valid']}/{r['n']} |"
        )
    off = rows["constrained, no jump-forward"]["seconds"]
    free = rows["unconstrained"]["seconds"]
    print(f"\njump-forward speed-up (end to end, constrained): {off / jf['seconds']:.2f}x")
    print(f"constrained + jump-forward vs unconstrained: {free / jf['seconds']:.2f}x")
    print(
        f"mask for {n} rows (fill + apply): {mask_s * 1000:.2f} ms = "
        f"{100 * mask_s / step_s:.1f}% of a decode step ({step_s * 1000:.0f} ms at this batch)"
    )
    print(
        "compile (llguidance, 100 schema variants): cold p50 {cold_p50_ms:.2f} ms, p99 "
        "{cold_p99_ms:.2f} ms; cached p50 {cached_p50_ms:.3f} ms, p99 {cached_p99_ms:.3f} ms".format(
            **compiles
        )
    )


if __name__ == "__main__":
    main()
