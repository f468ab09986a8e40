"""The measuring protocol every peer worker shares (standard library only).

Each worker runs in its own process, often with another virtual environment's Python (llama.cpp
and vLLM live in their own venvs), so this module must import nothing outside the standard
library. A worker supplies a backend object with one method,

    generate(prompts: list[list[int]], max_new_tokens: int) -> int   # tokens generated in all

(greedy, EOS ignored), and ``run_worker`` does the rest: it reads the job file the parent wrote,
times the same calls for every system, and prints one result line, ``RESULT_MARKER`` + JSON, to
stdout (peers such as vLLM print their own logs there too, so the parent looks for the marker).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

RESULT_MARKER = "@@BENCH_PEERS_RESULT@@ "
# The parent stamps its wall clock into this variable just before it spawns the worker, so
# "time to ready" covers interpreter start-up and imports as well.
T0_ENV = "SMALLM_BENCH_T0"


class Unsupported(Exception):
    """The system cannot run this configuration (reported as "n/a (unsupported)", not an error)."""


def started_at() -> float:
    """Wall-clock time the parent launched this process (now, if it did not say)."""
    return float(os.environ.get(T0_ENV, time.time()))


def load_job(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def emit(result: dict[str, Any]) -> None:
    """Print the one result line the parent parses."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    """Seconds one call takes, and what it returned (the number of generated tokens)."""
    t = time.perf_counter()
    n = fn()
    return time.perf_counter() - t, n


def check_count(got: int, want: int, what: str, notes: list[str]) -> None:
    """Note (once per kind) when a system generated fewer tokens than asked: rates would lie."""
    if got != want:
        note = f"{what}: generated {got} tokens, expected {want}"
        if note not in notes:
            notes.append(note)


def measure_batch1(backend: Any, job: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Decode rate at batch 1 with the prefill taken out: (N - 1) / (t(N tokens) - t(1 token)).

    The same short prompt for every call, so whatever a system caches of it is cached in both
    terms and cancels."""
    prompt, n = job["batch1_prompt"], job["new_tokens"]
    backend.generate([prompt], n)  # warm-up
    rates, raw = [], []
    for _ in range(job["reps"]):
        t_n, got = timed(lambda: backend.generate([prompt], n))
        t_1, _ = timed(lambda: backend.generate([prompt], 1))
        check_count(got, n, "batch-1", notes)
        rates.append((n - 1) / max(t_n - t_1, 1e-9))
        raw.append({"t_n": t_n, "t_1": t_1})
    return {"batch1_decode_tok_s": max(rates), "batch1_all": rates, "batch1_raw": raw}


def measure_batch(backend: Any, job: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Throughput of one call with many prompts: generated tokens / wall time (prefill included).

    Every repetition gets its own prompt set, so no prefix cache carries over between them. The
    warm-up runs the full batch with fewer new tokens: the same shapes, for less time."""
    n = job["new_tokens"]
    backend.generate(job["batch_warmup"], job["batch_warmup_new_tokens"])
    rates = []
    for prompts in job["batch_sets"]:
        seconds, got = timed(lambda p=prompts: backend.generate(p, n))
        check_count(got, n * len(prompts), "batch", notes)
        rates.append(got / seconds)
    return {"batch_tok_s": max(rates), "batch_all": rates}


def measure_prefill(backend: Any, job: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Prompt tokens / time of a one-token generation of a long prompt (a fresh prompt each
    time, so prefix caches do not help)."""
    warm, *reps = job["prefill_prompts"]
    backend.generate([warm], 1)
    rates = []
    for prompt in reps:
        seconds, got = timed(lambda p=prompt: backend.generate([p], 1))
        check_count(got, 1, "prefill", notes)
        rates.append(len(prompt) / seconds)
    return {"prefill_tok_s": max(rates), "prefill_all": rates}


def measure(backend: Any, job: dict[str, Any], t_ready: float) -> dict[str, Any]:
    """Every metric the job asks for; a backend without batching skips the batch metric."""
    notes: list[str] = []
    result: dict[str, Any] = {"status": "ok", "time_to_ready_s": t_ready}
    metrics = job["metrics"]
    if "batch1" in metrics:
        result.update(measure_batch1(backend, job, notes))
    if "batch" in metrics:
        if getattr(backend, "supports_batch", True):
            result.update(measure_batch(backend, job, notes))
        else:
            notes.append("batch: not measured (no batched API used)")
    if "prefill" in metrics:
        result.update(measure_prefill(backend, job, notes))
    result["notes"] = notes + list(getattr(backend, "notes", []))
    result["version"] = getattr(backend, "version", None)
    return result


def ready(backend: Any, job: dict[str, Any]) -> float:
    """Seconds from process launch until the backend has returned its first token."""
    backend.generate([job["ready_prompt"]], 1)
    return time.time() - started_at()


def run_worker(make_backend: Callable[[dict[str, Any]], Any]) -> None:
    """Worker entry point: ``python <worker>.py JOB.json``. Never raises: failures become a
    result line with status "unsupported" or "error", so the parent can report them."""
    try:
        job = load_job(sys.argv[1])
        backend = make_backend(job)
        t_ready = ready(backend, job)
        result = measure(backend, job, t_ready)
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    except Unsupported as e:
        result = {"status": "unsupported", "reason": str(e)}
    except Exception as e:
        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    emit(result)
