"""Continuous batching gives the same greedy tokens as running each request alone, under every
memory and scheduling configuration, and leaks no KV memory."""

from __future__ import annotations

import numpy as np
import pytest

from smallm.runtime.messages import AbortRequest, GenerateRequest, TokenOutput
from smallm.runtime.model.model_runner import ModelRunner, RunnerConfig
from smallm.runtime.sampling import SamplingParams
from smallm.runtime.scheduler.scheduler import Scheduler, SchedulerConfig
from smallm.runtime.static_batch import StaticBatchGenerator

VOCAB = 49152


def _runner(path, tokens=8192, max_reqs=64) -> ModelRunner:
    return ModelRunner(
        RunnerConfig(
            model_path=str(path),
            dtype="float32",
            max_total_tokens=tokens,
            max_running_requests=max_reqs,
        )
    )


def _workload(n=32, seed=0):
    rng = np.random.default_rng(seed)
    prompts = []
    shared = rng.integers(100, VOCAB, 24).tolist()
    for i in range(n):
        own = rng.integers(100, VOCAB, int(rng.integers(1, 60))).tolist()
        prompts.append(shared + own if i % 3 == 0 else own)  # some share a prefix
    max_new = [int(rng.integers(1, 20)) for _ in range(n)]
    return prompts, max_new


def _msg(rid, ids, max_new, **kw) -> GenerateRequest:
    params = SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True)
    return GenerateRequest(rid=rid, input_ids=list(ids), params=params, **kw)


def _drive(sched: Scheduler, arrivals: dict[int, list[GenerateRequest]]) -> dict[str, TokenOutput]:
    """Submit each wave before its step; run until every request finished."""
    tokens: dict[str, list[int]] = {}
    last: dict[str, TokenOutput] = {}
    total = sum(len(v) for v in arrivals.values())
    step = 0
    while len(last) < total:
        for msg in arrivals.get(step, []):
            sched.submit(msg)
        for o in sched.step():
            if isinstance(o, TokenOutput):
                tokens.setdefault(o.rid, []).extend(o.new_token_ids)
                if o.finished:
                    o.new_token_ids = tokens[o.rid]
                    last[o.rid] = o
        step += 1
        assert step < 5000, "scheduler made no progress"
    return last


@pytest.fixture(scope="module")
def reference(tiny_chat_model_dir):
    prompts, max_new = _workload()
    gen = StaticBatchGenerator(_runner(tiny_chat_model_dir), eos_token_ids=[])
    outs = [
        gen.generate([p], SamplingParams(max_new_tokens=m, temperature=0, ignore_eos=True))[0]
        for p, m in zip(prompts, max_new)
    ]
    return prompts, max_new, [o.output_ids for o in outs]


CONFIGS = {
    "radix": dict(),
    "no-radix": dict(disable_radix_cache=True),
    "fcfs": dict(schedule_policy="fcfs"),
    "tiny-chunks": dict(chunked_prefill_size=7),
    # 400 slots for 32 requests of up to 100 tokens, admitting greedily: eviction and
    # retraction must happen.
    "tiny-pool": dict(init_new_token_ratio=0.0, min_new_token_ratio=0.0, chunked_prefill_size=64),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_continuous_batching_matches_alone(name, reference, tiny_chat_model_dir):
    prompts, max_new, expected = reference
    tokens = 400 if name == "tiny-pool" else 8192
    sched = Scheduler(
        _runner(tiny_chat_model_dir, tokens=tokens),
        SchedulerConfig(**CONFIGS[name]),
        eos_token_ids=[],
    )
    # Requests arrive in waves over time, while earlier ones are decoding.
    arrivals: dict[int, list[GenerateRequest]] = {}
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        arrivals.setdefault((i // 4) * 3, []).append(_msg(f"r{i}", p, m))
    done = _drive(sched, arrivals)
    for i in range(len(prompts)):
        o = done[f"r{i}"]
        assert o.new_token_ids == expected[i], f"request {i} differs"
        assert o.finish_reason == {"type": "length", "length": max_new[i]}
    if name == "tiny-pool":
        assert sched.num_retractions > 0, "the tiny pool should have forced retraction"
    if name == "no-radix":
        assert all(o.cached_tokens == 0 for o in done.values())
    sched.check_idle_accounting()


def test_identical_request_reuses_all_but_last_token(tiny_chat_model_dir):
    sched = Scheduler(_runner(tiny_chat_model_dir), SchedulerConfig(), eos_token_ids=[])
    prompt = list(range(1000, 1050))
    first = _drive(sched, {0: [_msg("a", prompt, 4)]})["a"]
    second = _drive(sched, {0: [_msg("b", prompt, 4)]})["b"]
    assert first.cached_tokens == 0
    assert second.cached_tokens == len(prompt) - 1
    assert second.new_token_ids == first.new_token_ids
    shared = _drive(sched, {0: [_msg("c", [*prompt[:30], 7, 8, 9], 2)]})["c"]
    assert shared.cached_tokens == 30
    sched.check_idle_accounting()


def test_abort_running_request_frees_memory_and_flush(tiny_chat_model_dir):
    sched = Scheduler(_runner(tiny_chat_model_dir), SchedulerConfig(), eos_token_ids=[])
    sched.submit(_msg("long", list(range(200, 260)), 500))
    sched.submit(_msg("short", list(range(300, 310)), 3))
    for _ in range(5):
        sched.step()
    assert sched.pool.num_used > 0 and any(r.rid == "long" for r in sched.running)
    assert not sched.flush_cache(), "flush must be refused while requests run"
    sched.submit(AbortRequest(rid="long"))
    outs = [o for o in sched.step() if isinstance(o, TokenOutput) and o.rid == "long"]
    assert outs and outs[0].finish_reason["type"] == "abort"
    while sched.has_work():
        sched.step()
    sched.check_idle_accounting()
    assert sched.cache.total_size > 0
    assert sched.flush_cache()
    assert sched.cache.total_size == 0 and sched.pool.num_free == sched.pool.capacity


def test_prompt_too_long_is_rejected_not_hung(tiny_chat_model_dir):
    runner = ModelRunner(
        RunnerConfig(
            model_path=str(tiny_chat_model_dir),
            dtype="float32",
            max_total_tokens=1000,
            context_length=128,
        )
    )
    sched = Scheduler(runner, SchedulerConfig(), eos_token_ids=[])
    sched.submit(_msg("big", list(range(200)), 5))
    sched.submit(_msg("empty", [], 5))
    sched.submit(_msg("clamped", list(range(100, 220)), 50))
    outs = {}
    while sched.has_work():
        for o in sched.step():
            if o.finished:
                outs[o.rid] = o
    assert "context length is 128" in outs["big"].finish_reason["message"]
    assert "empty" in outs["empty"].finish_reason["message"]
    # Asking for more than fits stops at the context end instead of failing.
    assert outs["clamped"].finish_reason == {"type": "length", "length": 8}
    sched.check_idle_accounting()


@pytest.mark.parametrize("defer", [True, False])
def test_requests_arriving_together_share_a_prefix(defer, tiny_chat_model_dir):
    sched = Scheduler(
        _runner(tiny_chat_model_dir),
        SchedulerConfig(defer_shared_prefix=defer, chunked_prefill_size=64),
        eos_token_ids=[],
    )
    prefix = list(range(2000, 2100))
    msgs = [_msg(f"s{i}", [*prefix, 5000 + i, 6000 + i], 3) for i in range(6)]
    done = _drive(sched, {0: msgs})
    cached = sorted(o.cached_tokens for o in done.values())
    if defer:
        # The first computes the shared 100 tokens; the others wait for them and reuse them all.
        assert cached == [0] + [100] * 5
    else:
        assert cached.count(100) < 5
    sched.check_idle_accounting()
