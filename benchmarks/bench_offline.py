"""Offline batch throughput of ``smallm.Engine``: vs HF transformers, and the radix cache on vs off.

Part 1: N prompts of varied length, greedy, M new tokens each (``ignore_eos``), all handed to
one ``Engine.generate`` call (continuous batching) vs HF ``generate`` in left-padded batches.
Part 2: R requests sharing a ~P-token few-shot prefix, each with its own short question, on a
fresh Engine with the radix cache on, then on one with it off (same memory and batch limits).

Prompts are synthetic English-like text (sentences from a fixed word list, seeded RNG),
tokenized once by the model's tokenizer; both sides get the same token ids (``input_ids``).

    python benchmarks/bench_offline.py [--quick] [--skip-hf] [--dtype float32]
        [--num-prompts 256] [--new-tokens 128] [--hf-batch-size 64]
        [--shared-requests 128] [--shared-prefix-tokens 1000] [--shared-new-tokens 32]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass

from smallm.runtime.cpu_threads import prefer_passive_openmp

if "openblas" in sys.argv:  # before torch loads; see smallm/runtime/cpu_threads.py
    prefer_passive_openmp()

import numpy as np
import torch

_WORD_TEXT = (
    "the a an one some every other this that their our people time year way day man woman "
    "child world life hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information school face others level office door health person art war history "
    "party result change morning reason research girl guy moment air teacher force education "
    "is was has had made said went saw knew took came thought looked wanted gave used found "
    "told asked worked seemed felt tried left called kept began showed heard played ran moved "
    "lived believed brought happened wrote provided sat stood lost paid met included continued "
    "good new first last long great little own old big high different small large next early "
    "young important few public bad same able quiet bright simple strange open green cold "
    "in on at with from into over after under between through during without about against "
    "and but or so because while when where before since until although"
)
WORDS = _WORD_TEXT.split()

FULL = {
    "num_prompts": 256,
    "new_tokens": 128,
    "prompt_min_tokens": 32,
    "prompt_max_tokens": 160,
    "hf_batch_size": 64,
    "shared_requests": 128,
    "shared_prefix_tokens": 1000,
    "shared_new_tokens": 32,
    "question_min_tokens": 10,
    "question_max_tokens": 20,
}
QUICK = {
    "num_prompts": 8,
    "new_tokens": 8,
    "prompt_min_tokens": 16,
    "prompt_max_tokens": 64,
    "hf_batch_size": 4,
    "shared_requests": 8,
    "shared_prefix_tokens": 200,
    "shared_new_tokens": 4,
    "question_min_tokens": 10,
    "question_max_tokens": 20,
}


# ---- prompts -----------------------------------------------------------------------------


def sentence(rng: np.random.Generator, lo: int = 6, hi: int = 14, end: str = ".") -> str:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(lo, hi + 1)))]
    return " ".join(words).capitalize() + end


def text_prompts(tokenizer, rng: np.random.Generator, n: int, lo: int, hi: int) -> list[list[int]]:
    """n prompts of lo..hi tokens (uniform): sentences, tokenized, cut to the drawn length."""
    prompts = []
    for target in rng.integers(lo, hi + 1, n):
        text, ids = "", []
        while len(ids) < target:
            text += (" " if text else "") + sentence(rng)
            ids = tokenizer.encode(text)
        prompts.append(ids[: int(target)])
    return prompts


def shared_prefix_prompts(
    tokenizer, rng: np.random.Generator, n: int, prefix_tokens: int, q_lo: int, q_hi: int
) -> tuple[list[list[int]], int]:
    """n prompts = one few-shot Q/A block (whole pairs, >= prefix_tokens) + a question each.

    The block and each question are tokenized separately and the ids concatenated, so every
    prompt starts with exactly the same ids. Returns the prompts and the block's length."""
    text = "Answer each question in a few words.\n\n"
    while len(tokenizer.encode(text)) < prefix_tokens:
        text += f"Question: {sentence(rng, end='?')}\nAnswer: {sentence(rng, 2, 5)}\n\n"
    prefix = tokenizer.encode(text)
    prompts = []
    for target in rng.integers(q_lo, q_hi + 1, n):
        words: list[str] = []
        while True:
            words.append(WORDS[int(rng.integers(0, len(WORDS)))])
            q = tokenizer.encode(f"Question: {' '.join(words).capitalize()}?\nAnswer:")
            if len(q) >= target:
                break
        prompts.append(prefix + q)
    return prompts, len(prefix)


def common_prefix_len(prompts: list[list[int]]) -> int:
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for p in prompts[1:]:
        a, b = np.asarray(first[:n]), np.asarray(p[:n])
        diff = np.flatnonzero(a != b)
        n = int(diff[0]) if len(diff) else n
    return n


# ---- smallm ------------------------------------------------------------------------------


@dataclass
class EngineRun:
    seconds: float
    outputs: list[list[int]]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    forward_steps: int
    retractions: int


def make_engine(dtype: str, max_total_tokens: int, max_running: int, **kw):
    from smallm.runtime.engine import Engine

    engine = Engine(
        dtype=dtype,
        max_total_tokens=max_total_tokens,
        max_running_requests=max_running,
        **{k: v for k, v in kw.items() if v is not None},
    )
    # Warm up (first calls pay one-off kernel selection costs), then empty the prefix cache so
    # the measured run starts cold.
    engine.generate(
        input_ids=[[100 + i for i in range(24)], [200 + i for i in range(40)]],
        sampling_params={"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
    )
    if not engine.flush_cache():
        raise RuntimeError("could not flush the prefix cache after warm-up")
    return engine


def run_engine(engine, prompts: list[list[int]], new_tokens: int) -> EngineRun:
    steps0 = engine.scheduler.forward_steps
    retr0 = engine.scheduler.num_retractions
    sp = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    t = time.perf_counter()
    results = engine.generate(input_ids=prompts, sampling_params=sp)
    seconds = time.perf_counter() - t
    errors = [r["meta_info"].get("error") for r in results if r["meta_info"].get("error")]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    meta = [r["meta_info"] for r in results]
    return EngineRun(
        seconds=seconds,
        outputs=[r["output_ids"] for r in results],
        prompt_tokens=sum(m["prompt_tokens"] for m in meta),
        cached_tokens=sum(m["cached_tokens"] for m in meta),
        completion_tokens=sum(m["completion_tokens"] for m in meta),
        forward_steps=engine.scheduler.forward_steps - steps0,
        retractions=engine.scheduler.num_retractions - retr0,
    )


def close_engine(engine) -> None:
    engine.shutdown()
    del engine
    gc.collect()


# ---- HF ----------------------------------------------------------------------------------


@torch.inference_mode()
def hf_generate(
    model,
    prompts: list[list[int]],
    new_tokens: int,
    batch_size: int,
    pad_id: int,
    verbose: bool = True,
) -> tuple[float, list[list[int]]]:
    """Left-padded batched greedy ``generate``; exactly new_tokens per prompt. Returns the total
    time of all batches and each prompt's new tokens (in the given order)."""
    outputs: list[list[int]] = []
    seconds = 0.0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        t = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        seconds += time.perf_counter() - t
        outputs.extend(out[:, width:].tolist())
        if not verbose:
            continue
        print(
            f"  HF batch {start // batch_size + 1}: {len(batch)} prompts, width {width}, "
            f"{seconds:.1f} s so far",
            flush=True,
        )
    return seconds, outputs


def compare_outputs(
    ours: list[list[int]], theirs: list[list[int]], eos_ids: set[int]
) -> tuple[int, float, int]:
    """(identical outputs, mean common-prefix length, mismatches where smallm chose an EOS id
    at the first difference: HF's min_new_tokens bans EOS, smallm's ignore_eos does not)."""
    same, prefix_lens, at_eos = 0, [], 0
    for a, b in zip(ours, theirs):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix_lens.append(n)
        if a == b:
            same += 1
        elif n < len(a) and a[n] in eos_ids:
            at_eos += 1
    return same, float(np.mean(prefix_lens)), at_eos


# ---- the two parts -----------------------------------------------------------------------


def part1(args, model_dir: str, tokenizer, eos_ids: set[int]) -> dict:
    rng = np.random.default_rng(args.seed)
    prompts = text_prompts(
        tokenizer, rng, args.num_prompts, args.prompt_min_tokens, args.prompt_max_tokens
    )
    lens = [len(p) for p in prompts]
    m = args.new_tokens
    total = args.max_total_tokens or sum(lens) + len(prompts) * m + 64
    running = args.max_running_requests or len(prompts)
    print(
        f"part 1: {len(prompts)} prompts of {min(lens)}-{max(lens)} tokens ({sum(lens)} total), "
        f"{m} new tokens each; smallm max_running_requests={running}, max_total_tokens={total}",
        flush=True,
    )
    engine = make_engine(args.dtype, total, running, chunked_prefill_size=args.chunked_prefill_size)
    threads = torch.get_num_threads()
    run = run_engine(engine, prompts, m)
    close_engine(engine)
    row = {
        "prompts": len(prompts),
        "lens": lens,
        "smallm_s": run.seconds,
        "smallm_tps": run.completion_tokens / run.seconds,
        "smallm_tokens": run.completion_tokens,
        "cached": run.cached_tokens,
    }
    print(
        f"  smallm: {run.seconds:.1f} s, {run.completion_tokens} tokens, "
        f"{row['smallm_tps']:.1f} tok/s, {run.forward_steps} forward steps, "
        f"{run.retractions} retractions, {run.cached_tokens} cached prompt tokens",
        flush=True,
    )
    if args.skip_hf:
        return row
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    hf_generate(model, prompts[:2], 2, 2, pad_id, verbose=False)  # warm-up
    order = sorted(range(len(prompts)), key=lambda i: lens[i]) if args.hf_sort else None
    hf_prompts = [prompts[i] for i in order] if order else prompts
    seconds, outs = hf_generate(model, hf_prompts, m, args.hf_batch_size, pad_id)
    if order:
        unsorted: list[list[int]] = [[] for _ in prompts]
        for i, out in zip(order, outs):
            unsorted[i] = out
        outs = unsorted
    del model
    gc.collect()
    hf_tokens = sum(len(o) for o in outs)
    same, mean_prefix, at_eos = compare_outputs(run.outputs, outs, eos_ids)
    row.update(
        hf_s=seconds,
        hf_tps=hf_tokens / seconds,
        hf_tokens=hf_tokens,
        same=same,
        mean_prefix=mean_prefix,
        at_eos=at_eos,
    )
    print(
        f"  HF: {seconds:.1f} s, {hf_tokens} tokens, {row['hf_tps']:.1f} tok/s; "
        f"identical greedy outputs {same}/{len(prompts)}, mean common prefix "
        f"{mean_prefix:.1f}/{m} tokens, {at_eos} mismatches start where smallm chose EOS",
        flush=True,
    )
    return row


def part2(args, tokenizer) -> list[dict]:
    rng = np.random.default_rng(args.seed + 1)
    prompts, prefix_len = shared_prefix_prompts(
        tokenizer,
        rng,
        args.shared_requests,
        args.shared_prefix_tokens,
        args.question_min_tokens,
        args.question_max_tokens,
    )
    lens = [len(p) for p in prompts]
    lcp = common_prefix_len(prompts)
    new = args.shared_new_tokens
    ideal = (len(prompts) - 1) * lcp / sum(lens)
    total = args.shared_max_total_tokens or sum(lens) + len(prompts) * new + 64
    running = args.max_running_requests or len(prompts)
    print(
        f"part 2: {len(prompts)} requests, few-shot prefix {prefix_len} tokens (common prefix "
        f"{lcp}), questions {min(lens) - prefix_len}-{max(lens) - prefix_len} tokens, {new} new "
        f"tokens each; max_running_requests={running}, max_total_tokens={total}; "
        f"best possible hit rate {ideal:.1%}",
        flush=True,
    )
    rows = []
    for radix in (True, False):
        engine = make_engine(
            args.dtype,
            total,
            running,
            chunked_prefill_size=args.chunked_prefill_size,
            disable_radix_cache=not radix,
        )
        run = run_engine(engine, prompts, new)
        close_engine(engine)
        row = {
            "radix": radix,
            "requests": len(prompts),
            "prefix": prefix_len,
            "q_lo": min(lens) - prefix_len,
            "q_hi": max(lens) - prefix_len,
            "prompt_tokens": run.prompt_tokens,
            "tokens": run.completion_tokens,
            "s": run.seconds,
            "tps": run.completion_tokens / run.seconds,
            "rps": len(prompts) / run.seconds,
            "hit": run.cached_tokens / run.prompt_tokens,
            "ideal": ideal,
        }
        rows.append(row)
        print(
            f"  radix {'on' if radix else 'off'}: {run.seconds:.1f} s, {row['tps']:.1f} tok/s, "
            f"{row['rps']:.2f} req/s, hit rate {row['hit']:.1%} ({run.cached_tokens}/"
            f"{run.prompt_tokens}), {run.forward_steps} forward steps, {run.retractions} "
            "retractions",
            flush=True,
        )
    return rows


# ---- report ------------------------------------------------------------------------------


def table1(r: dict, args) -> str:
    lens = r["lens"]
    shape = f"{min(lens)}–{max(lens)} (total {sum(lens)})"
    out = [
        "| system | prompts | prompt tokens | new tokens each | time s | output tok/s | "
        "speed-up | identical greedy outputs |",
        "|---|---|---|---|---|---|---|---|",
        f"| smallm Engine (max_running_requests {args.max_running_requests or r['prompts']}) | "
        f"{r['prompts']} | {shape} | {args.new_tokens} | {r['smallm_s']:.1f} | "
        f"{r['smallm_tps']:.1f} | "
        + (f"{r['smallm_tps'] / r['hf_tps']:.2f}x" if "hf_tps" in r else "-")
        + " | "
        + (f"{r['same']}/{r['prompts']}" if "same" in r else "-")
        + " |",
    ]
    if "hf_tps" in r:
        sort = ", sorted by length" if args.hf_sort else ""
        out.append(
            f"| HF generate (batches of {args.hf_batch_size}, left-padded{sort}) | "
            f"{r['prompts']} | {shape} | {args.new_tokens} | {r['hf_s']:.1f} | "
            f"{r['hf_tps']:.1f} | 1.00x | - |"
        )
    return "\n".join(out)


def table2(rows: list[dict]) -> str:
    off = next((r for r in rows if not r["radix"]), None)
    out = [
        "| radix cache | requests | prompt tokens (shared + question) | new tokens each | "
        "time s | output tok/s | requests/s | cache hit rate | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r['tps'] / off['tps']:.2f}x" if off else "-"
        out.append(
            f"| {'on' if r['radix'] else 'off'} | {r['requests']} | "
            f"{r['prefix']} + {r['q_lo']}–{r['q_hi']} | {r['tokens'] // r['requests']} | "
            f"{r['s']:.1f} | {r['tps']:.1f} | {r['rps']:.2f} | {r['hit']:.1%} | {speed} |"
        )
    if rows:
        out.append(
            f"\nBest possible hit rate (every request but the first reuses the common prefix): "
            f"{rows[0]['ideal']:.1%}"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-shared", action="store_true", help="run part 1 only")
    ap.add_argument("--seed", type=int, default=0)
    for name, value in FULL.items():
        ap.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=None,
            help=f"default {value} ({QUICK[name]} with --quick)",
        )
    ap.add_argument(
        "--hf-sort",
        action="store_true",
        help="batch HF's prompts sorted by length (less padding); default: in the given order",
    )
    ap.add_argument(
        "--max-running-requests", type=int, default=None, help="default: all requests at once"
    )
    ap.add_argument(
        "--max-total-tokens",
        type=int,
        default=None,
        help="part 1 KV pool; default: every prompt and output at once",
    )
    ap.add_argument(
        "--shared-max-total-tokens",
        type=int,
        default=None,
        help="part 2 KV pool (both runs); default: every prompt and output at once, uncached",
    )
    ap.add_argument("--chunked-prefill-size", type=int, default=None, help="default: smallm's")
    args = ap.parse_args()
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    import transformers

    from smallm.runtime.model.loader import resolve_model_path
    from smallm.runtime.tokenizer import eos_token_ids, load_tokenizer

    model_dir = resolve_model_path(args.model_path)
    tokenizer = load_tokenizer(model_dir)
    eos_ids = set(eos_token_ids(tokenizer))
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "?")
    machine = (
        f"# {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, model {model_dir}, dtype {args.dtype}"
    )
    command = "python benchmarks/bench_offline.py " + " ".join(map(shlex.quote, sys.argv[1:]))
    print(machine, flush=True)
    r1 = part1(args, model_dir, tokenizer, eos_ids)
    r2 = [] if args.skip_shared else part2(args, tokenizer)
    print()
    print(f"    {command.strip()}")
    print(machine)
    print()
    print(f"Part 1: throughput, greedy, {args.new_tokens} new tokens per prompt (ignore_eos)")
    print()
    print(table1(r1, args))
    if "same" in r1:
        print(
            f"\nGreedy outputs: {r1['same']}/{r1['prompts']} identical, mean common prefix "
            f"{r1['mean_prefix']:.1f}/{args.new_tokens} tokens; {r1['at_eos']} mismatches begin "
            "where smallm chose EOS (HF's min_new_tokens bans it). HF's padding shifts its "
            "numerics slightly."
        )
    if r1["cached"]:
        print(f"(smallm reused {r1['cached']} prompt tokens from its prefix cache in part 1)")
    if r2:
        print()
        print(
            f"Part 2: shared few-shot prefix, {args.shared_requests} requests, greedy, "
            f"{args.shared_new_tokens} new tokens each (token-id prompts), radix cache on vs off"
        )
        print()
        print(table2(r2))


if __name__ == "__main__":
    main()
