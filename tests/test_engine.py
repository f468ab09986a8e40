"""smallm.Engine: the native /generate result format, end to end on the default model."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from smallm.runtime.engine import Engine
from smallm.runtime.model.model_runner import ModelRunner, RunnerConfig
from smallm.runtime.sampling import SamplingParams, SamplingParamsError
from smallm.runtime.static_batch import StaticBatchGenerator
from smallm.runtime.tokenizer import eos_token_ids

GREEDY = {"max_new_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module")
def engine(default_model_dir):
    # The exact float32 path: results are compared with HF and a reference loop below.
    with Engine(
        default_model_dir,
        max_total_tokens=8192,
        max_running_requests=32,
        dtype="float32",
        quantization="none",
    ) as e:
        yield e


def test_single_and_batch_results_match_reference_loop(engine, default_model_dir):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    single = engine.generate(prompts[0], GREEDY)
    batch = engine.generate(prompts, GREEDY)
    assert isinstance(single, dict) and isinstance(batch, list) and len(batch) == 3
    assert batch[0]["text"] == single["text"]
    meta = single["meta_info"]
    assert set(meta) >= {
        "id",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "finish_reason",
        "e2e_latency",
    }
    assert meta["finish_reason"]["type"] in ("stop", "length")
    runner = ModelRunner(
        RunnerConfig(
            model_path=default_model_dir,
            dtype="float32",
            quantization="none",
            max_total_tokens=512,
            max_running_requests=1,
        )
    )
    gen = StaticBatchGenerator(
        runner, eos_token_ids(engine.tokenizer, runner.model_config.eos_token_ids)
    )
    for p, got in zip(prompts, batch):
        (ref,) = gen.generate([engine.tokenizer.encode(p)], SamplingParams(**GREEDY))
        assert got["output_ids"] == ref.output_ids


def test_input_ids_and_prefix_cache(engine):
    ids = engine.tokenizer.encode("A long shared system prompt about geography. " * 4)
    a = engine.generate(input_ids=[*ids, 504], sampling_params=GREEDY)
    b = engine.generate(input_ids=[*ids, 504], sampling_params=GREEDY)
    assert b["meta_info"]["cached_tokens"] == len(ids)  # all but the last token
    assert a["output_ids"] == b["output_ids"]
    two = engine.generate(input_ids=[[*ids, 7], [*ids, 8]], sampling_params=GREEDY)
    assert [o["meta_info"]["cached_tokens"] for o in two] == [len(ids), len(ids)]


def test_stop_strings_and_tokens(engine):
    prompt = "Count: one, two, three, four,"
    free = engine.generate(prompt, {"max_new_tokens": 12, "temperature": 0})
    assert " six" in free["text"]
    trimmed = engine.generate(prompt, {"max_new_tokens": 12, "temperature": 0, "stop": "six"})
    assert trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": "six"}
    assert trimmed["text"] == free["text"][: free["text"].index("six")]
    kept = engine.generate(
        prompt, {"max_new_tokens": 12, "temperature": 0, "stop": ["six"], "no_stop_trim": True}
    )
    assert kept["text"].endswith("six")
    comma = engine.tokenizer.encode(",")[0]
    tok = engine.generate(
        prompt, {"max_new_tokens": 12, "temperature": 0, "stop_token_ids": [comma]}
    )
    assert tok["meta_info"]["finish_reason"] == {"type": "stop", "matched": comma}
    assert "," not in tok["text"]


def test_n_samples_share_the_prompt(engine):
    outs = engine.generate(
        "Tell me a story about a dragon",
        {"max_new_tokens": 8, "temperature": 1.0, "n": 3, "seed": 7},
    )
    assert isinstance(outs, list) and len(outs) == 3
    cached = sorted(o["meta_info"]["cached_tokens"] for o in outs)
    assert cached[0] == 0 and cached[1] > 0, cached
    again = engine.generate(
        "Tell me a story about a dragon",
        {"max_new_tokens": 8, "temperature": 1.0, "n": 3, "seed": 7},
    )
    assert [o["text"] for o in again] == [o["text"] for o in outs]


def test_streaming_is_cumulative_and_matches(engine):
    params = {"max_new_tokens": 20, "temperature": 0}
    chunks = list(engine.generate("Write a short poem about rain", params, stream=True))
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] is not None
    assert texts[-1] == engine.generate("Write a short poem about rain", params)["text"]


def test_prefill_only_with_input_logprobs_matches_hf(engine, hf_default_model):
    text = "The capital of France is Paris."
    ids = engine.tokenizer.encode(text)
    out = engine.generate(
        text,
        {"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=2,
        top_logprobs_num=2,
        return_text_in_logprobs=True,
    )
    meta = out["meta_info"]
    assert out["text"] == "" and meta["completion_tokens"] == 0
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    lps = meta["input_token_logprobs"]
    assert [t for _, t, _ in lps] == ids[2:]
    assert lps[0][0] is None and lps[1][2] == engine.tokenizer.decode([ids[3]])
    with torch.no_grad():
        ref = torch.log_softmax(hf_default_model(torch.tensor([ids])).logits[0], -1)
    for k, (lp, tok, _) in enumerate(lps[1:], start=3):
        assert abs(lp - ref[k - 1, tok].item()) < 1e-3
    assert len(meta["input_top_logprobs"]) == len(lps) and meta["input_top_logprobs"][0] is None
    assert meta["normalized_prompt_logprob"] == pytest.approx(
        sum(lp for lp, _, _ in lps[1:]) / (len(lps) - 1)
    )


def test_output_logprobs(engine):
    out = engine.generate(
        "Hello", {"max_new_tokens": 4, "temperature": 0}, return_logprob=True, top_logprobs_num=3
    )
    lps = out["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == out["output_ids"]
    tops = out["meta_info"]["output_top_logprobs"]
    # Greedy: the chosen token is the most likely one.
    assert all(row[0][1] == tok for row, (_, tok, _) in zip(tops, lps))


def test_bad_input_raises_clearly(engine):
    with pytest.raises(SamplingParamsError, match="temperature"):
        engine.generate("x", {"temperature": -1})
    with pytest.raises(SamplingParamsError, match="top_p"):
        engine.generate("x", {"top_p": 0})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate(input_ids=[1, 10**7])
    with pytest.raises(ValueError, match="exactly one"):
        engine.generate()
    too_long = engine.generate(input_ids=[100] * 9000, sampling_params=GREEDY)
    assert too_long["meta_info"]["finish_reason"]["type"] == "abort"
    assert engine.generate("still serving", GREEDY)["meta_info"]["completion_tokens"] > 0


def test_async_api(engine):
    async def main():
        one = await engine.async_generate("The capital of France is", GREEDY)
        chunks = [c async for c in engine.async_generate_stream("The capital of France is", GREEDY)]
        stream = await engine.async_generate("The capital of France is", GREEDY, stream=True)
        assert [c async for c in stream][-1]["text"] == chunks[-1]["text"]
        return one, chunks

    one, chunks = asyncio.run(main())
    assert chunks[-1]["text"] == one["text"]


def test_idle_accounting_and_flush(engine):
    engine.scheduler.check_idle_accounting()
    assert engine.flush_cache()
    assert engine.scheduler.cache.total_size == 0
