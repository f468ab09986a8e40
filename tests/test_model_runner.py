"""The model runner's logits equal HF transformers' for every supported family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from smallm.runtime.model.forward_batch import BatchEntry
from smallm.runtime.model.model_runner import ModelRunner, RunnerConfig

from conftest import TINY_VARIANTS


def _runner(path, dtype="float32", tokens=4096, **kw) -> ModelRunner:
    # The exact path HF is compared with: dense weights (the default model's GGUF would
    # otherwise run its own int4 codes).
    kw.setdefault("quantization", "none")
    return ModelRunner(
        RunnerConfig(
            model_path=str(path),
            dtype=dtype,
            max_total_tokens=tokens,
            max_running_requests=8,
            **kw,
        )
    )


def _extend(runner: ModelRunner, rows, prefix_lens, new_tokens, logprobs=False):
    entries = []
    for row, p, toks in zip(rows, prefix_lens, new_tokens):
        runner.req_to_token.write(row, p, runner.kv_pool.alloc(len(toks)))
        targets = toks[1:] if logprobs else None
        entries.append(
            BatchEntry(
                row,
                p,
                toks,
                logprob_start=0 if logprobs else None,
                logprob_targets=targets,
                top_logprobs_num=3 if logprobs else 0,
            )
        )
    return runner.forward(entries)


def _hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    # float32 tolerance scaled to the logits' magnitude: 30 layers of differently ordered
    # reductions move logits of size ~20 by a few 1e-3; a real bug moves them by whole units.
    torch.testing.assert_close(got, want, atol=rel * float(want.abs().max()), rtol=0)
    if got.dim() == 1:
        assert int(got.argmax()) == int(want.argmax())


def _check_three_phases(runner, hf, vocab, rel, lengths=(5, 17, 1, 40)):
    """Prefill a ragged batch, extend some requests and decode others in one pass, then decode
    all; every phase's logits must match HF run on the full sequences."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]
    rows = [runner.req_to_token.alloc() for _ in prompts]
    out = _extend(runner, rows, [0] * len(prompts), prompts, logprobs=True)
    for i, p in enumerate(prompts):
        ref = _hf_logits(hf, p)
        _close(out.next_token_logits[i], ref[-1], rel)
        if len(p) > 1:
            ref_lp = torch.log_softmax(ref[:-1], -1)
            got = out.input_logprobs[i]
            want = ref_lp.gather(1, torch.tensor(p[1:])[:, None]).squeeze(1)
            _close(torch.tensor(got.logprobs), want, rel)
            top_ids = [[t for t, _ in row] for row in got.top]
            assert top_ids == ref_lp.topk(3, -1).indices.tolist()
    mixed = [[1, 2, 3], [7], [9, 10], [11]]
    out = _extend(runner, rows, [len(p) for p in prompts], mixed)
    seqs = [p + m for p, m in zip(prompts, mixed)]
    for i, s in enumerate(seqs):
        _close(out.next_token_logits[i], _hf_logits(hf, s)[-1], rel)
    out = _extend(runner, rows, [len(s) for s in seqs], [[5]] * len(seqs))
    for i, s in enumerate(seqs):
        _close(out.next_token_logits[i], _hf_logits(hf, [*s, 5])[-1], rel)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_models_match_hf(variant, tiny_model_dirs):
    path = tiny_model_dirs[variant]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runner = _runner(path)
    _check_three_phases(runner, hf, runner.model_config.vocab_size, rel=1e-5)


@pytest.mark.parametrize("batched", [0, 4, 64])
def test_batched_short_extends_match_hf(batched, tiny_model_dirs):
    # 0: only decodes share an attention call; 4: the 3-token extends join them; 64: every
    # extend (up to 40 tokens, with and without a cached prefix) goes through the padded path.
    path = tiny_model_dirs["qwen3"]  # GQA 2 query heads per KV head, head_dim 32
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runner = _runner(path, batched_extend_max_tokens=batched)
    _check_three_phases(runner, hf, runner.model_config.vocab_size, rel=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_default_model_matches_hf(default_model_dir, hf_default_model, fused):
    runner = _runner(default_model_dir, disable_fused_kernels=not fused)
    assert runner.fused == fused
    _check_three_phases(runner, hf_default_model, 49152, rel=3e-4, lengths=(3, 30, 1, 65))


def test_unsupported_architecture_names_supported(tmp_path, tiny_model_dirs):
    import json
    import shutil

    from smallm.runtime.model.registry import UnsupportedArchitecture

    d = tmp_path / "gpt"
    shutil.copytree(tiny_model_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match=r"LlamaForCausalLM.*Qwen3ForCausalLM"):
        _runner(d)
