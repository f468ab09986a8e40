"""OpenAI ``logit_bias`` in the batched sampler: per row, added to the raw logits."""

from __future__ import annotations

import pytest
import torch

from smallm.runtime.sampling import SamplingParams, SamplingParamsError
from smallm.runtime.sampling.batch_info import SamplingBatchInfo
from smallm.runtime.sampling.sampler import Sampler

V = 50


def _info(params):
    return SamplingBatchInfo.build(params, [[] for _ in params], None, [0], V)


def test_bias_moves_only_its_own_row():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(dim=-1).tolist()
    params = [
        SamplingParams(temperature=0, logit_bias={"7": 100}),  # forces token 7
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logit_bias={best[2]: -100}),  # bans the argmax
    ]
    info = _info(params)
    out = Sampler(V, seed=0).sample(logits, info).next_token_ids
    assert out[0] == 7 and out[1] == best[1] and out[2] != best[2]
    processed = Sampler(V).process_logits(logits, info)
    assert processed[0, 7] == pytest.approx(logits[0, 7] + 100)
    assert torch.equal(processed[1], logits[1])


def test_bias_in_sampled_rows_changes_the_distribution():
    logits = torch.zeros(2, V)
    params = [SamplingParams(temperature=1.0, logit_bias={3: 100}), SamplingParams(temperature=1.0)]
    dist = Sampler(V, seed=1).distribution(logits, _info(params))
    assert dist[0, 3] > 0.999 and dist[1, 3] == pytest.approx(1 / V)


def test_bias_validation():
    assert SamplingParams.from_dict({"logit_bias": {"5": 1.5}}).logit_bias == {5: 1.5}
    for bad in ({"5": 101}, {"x": 1}, {"-1": 1}, [1], {"5": "a"}):
        with pytest.raises(SamplingParamsError, match="logit_bias"):
            SamplingParams.from_dict({"logit_bias": bad}).validate(V)
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        SamplingParams(logit_bias={V: 1}).validate(V)
