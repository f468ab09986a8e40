"""End-to-end generation on the runner: greedy output is token-identical to HF `generate`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from smallm.runtime.model.model_runner import ModelRunner, RunnerConfig
from smallm.runtime.sampling import SamplingParams
from smallm.runtime.static_batch import StaticBatchGenerator
from smallm.runtime.tokenizer import eos_token_ids, render_chat

QUESTIONS = [
    "Hi!",
    "What is the capital of France?",
    "List three colours of the rainbow and explain in one sentence why the sky looks blue.",
    "Write a Python function that returns the square of a number, then explain it briefly "
    "to a beginner who has never programmed before, using a cooking analogy.",
]


def _runner(path, dtype="float32", quantization="none") -> ModelRunner:
    return ModelRunner(
        RunnerConfig(
            model_path=str(path),
            dtype=dtype,
            quantization=quantization,
            max_total_tokens=2048,
            max_running_requests=8,
        )
    )


def _hf_greedy(model, prompt: list[int], n: int, eos: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos or None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def _assert_no_leak(runner: ModelRunner) -> None:
    assert runner.kv_pool.num_free == runner.kv_pool.capacity
    assert runner.req_to_token.num_free == runner.req_to_token.max_requests


def test_default_model_greedy_batch_matches_hf(
    default_model_dir, hf_default_model, default_tokenizer
):
    tok = default_tokenizer
    prompts = [
        tok.encode(render_chat(tok, [{"role": "user", "content": q}]), add_special_tokens=False)
        for q in QUESTIONS
    ]
    assert len({len(p) for p in prompts}) == 4, "prompts must differ in length"
    runner = _runner(default_model_dir)
    eos = eos_token_ids(tok, runner.model_config.eos_token_ids)
    gen = StaticBatchGenerator(runner, eos)
    results = gen.generate(prompts, SamplingParams(max_new_tokens=32, temperature=0))
    for p, r in zip(prompts, results):
        assert r.output_ids == _hf_greedy(hf_default_model, p, 32, eos)
    _assert_no_leak(runner)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_tiny_model_greedy_batch_matches_hf(variant, tiny_model_dirs):
    path = tiny_model_dirs[variant]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[3, 17, 42], list(range(10, 40)), [7], list(range(100, 111))]
    runner = _runner(path)
    gen = StaticBatchGenerator(runner, eos_token_ids=[])
    results = gen.generate(prompts, SamplingParams(max_new_tokens=32, temperature=0))
    for p, r in zip(prompts, results):
        assert r.finish_reason == "length"
        assert r.output_ids == _hf_greedy(hf, p, 32, [])
    _assert_no_leak(runner)


@pytest.mark.parametrize(
    ("dtype", "quantization"),
    [("float32", "none"), ("bfloat16", "none"), ("auto", "auto"), ("bfloat16", "int8")],
)
def test_default_model_knows_paris(default_model_dir, default_tokenizer, dtype, quantization):
    tok = default_tokenizer
    text = render_chat(tok, [{"role": "user", "content": "What is the capital of France?"}])
    runner = _runner(default_model_dir, dtype, quantization)
    gen = StaticBatchGenerator(runner, eos_token_ids(tok, runner.model_config.eos_token_ids))
    (r,) = gen.generate(
        [tok.encode(text, add_special_tokens=False)],
        SamplingParams(max_new_tokens=24, temperature=0),
    )
    answer = tok.decode(r.output_ids, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert r.finish_reason == "stop" and r.matched_stop == tok.eos_token_id


def test_seeded_sampling_reproducible_and_batch_independent(default_model_dir, default_tokenizer):
    tok = default_tokenizer
    runner = _runner(default_model_dir)
    gen = StaticBatchGenerator(runner, eos_token_ids(tok, runner.model_config.eos_token_ids))
    prompt = tok.encode("Once upon a time", add_special_tokens=False)
    other = tok.encode("The weather today is", add_special_tokens=False)
    sp = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    (alone,) = gen.generate([prompt], sp)
    in_batch = gen.generate(
        [other, prompt], [SamplingParams(max_new_tokens=16, temperature=1.0), sp]
    )
    assert in_batch[1].output_ids == alone.output_ids
    other_seed = gen.generate(
        [prompt] * 4,
        [SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=s) for s in range(4)],
    )
    assert len({tuple(r.output_ids) for r in other_seed}) > 1


def test_max_new_tokens_zero_and_context_limit(tiny_model_dirs):
    runner = ModelRunner(
        RunnerConfig(
            model_path=str(tiny_model_dirs["llama"]),
            dtype="float32",
            max_total_tokens=600,
            max_running_requests=2,
            context_length=64,
        )
    )
    gen = StaticBatchGenerator(runner, eos_token_ids=[])
    (r,) = gen.generate([[1, 2, 3]], SamplingParams(max_new_tokens=0))
    assert r.output_ids == [] and r.finish_reason == "length"
    with pytest.raises(ValueError, match="context length 64"):
        gen.generate([list(range(60))], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate([[]], SamplingParams())
    _assert_no_leak(runner)
