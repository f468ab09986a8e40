"""The batched sampler: greedy, seeded and filtered sampling, penalties, masks and logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smallm.runtime.sampling import (
    Sampler,
    SamplingBatchInfo,
    SamplingParams,
    apply_token_bitmask_,
    pack_token_bitmask,
)
from smallm.runtime.sampling import batch_info as batch_info_mod
from smallm.runtime.sampling import sampler as sampler_mod

EOS = 0


def build(params, output_ids=None, prompt_ids=None, vocab=None, logits=None, **kw):
    """SamplingBatchInfo for ``params`` with empty outputs unless given."""
    vocab = vocab if vocab is not None else logits.shape[1]
    outputs = output_ids if output_ids is not None else [[] for _ in params]
    return SamplingBatchInfo.build(params, outputs, prompt_ids, [EOS], vocab, **kw)


def rand_logits(batch, vocab, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * scale


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    nz = expected > 0
    assert counts[~nz].sum() == 0, "drew a token with zero probability"
    return float((((counts - expected) ** 2)[nz] / expected[nz]).sum())


# Chi-square critical values at p = 0.001, by degrees of freedom (draws are seeded, so a pass
# is deterministic; the bound only guards against a wrong distribution).
CHI2_CRIT_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


# -- greedy ------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = rand_logits(8, 50)
    params = [SamplingParams(temperature=0.0)] * 4 + [SamplingParams(top_k=1, seed=3)] * 4
    info = build(params, logits=logits)
    assert info.all_greedy
    out = Sampler(50, seed=0).sample(logits, info)
    assert out.next_token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_sample_does_not_modify_logits():
    logits = rand_logits(4, 40)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.5, repetition_penalty=1.5, frequency_penalty=1.0),
        SamplingParams(top_p=0.5, min_new_tokens=3),
        SamplingParams(temperature=0.0, presence_penalty=1.0),
        SamplingParams(temperature=2.0),
    ]
    info = build(params, output_ids=[[1, 2], [3], [4, 4], []], logits=logits)
    info.vocab_mask = pack_token_bitmask(torch.rand(4, 40) < 0.5)
    Sampler(40, seed=0).sample(logits, info)
    assert torch.equal(logits, before)


def test_tiny_temperature_is_greedy_without_nan():
    logits = rand_logits(3, 30, scale=50.0)
    params = [SamplingParams(temperature=t) for t in (0.0, 1e-12, 1e-7)]
    out = Sampler(30, seed=0).sample(logits, build(params, logits=logits))
    assert out.next_token_ids == logits.argmax(dim=-1).tolist()


def test_small_positive_temperature_concentrates_on_argmax():
    logits = rand_logits(16, 30)
    params = [SamplingParams(temperature=1e-3, seed=i) for i in range(16)]
    out = Sampler(30, seed=0).sample(logits, build(params, logits=logits))
    assert out.next_token_ids == logits.argmax(dim=-1).tolist()


# -- seeds -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(seed=1234),
        SamplingParams(seed=1234, top_p=0.8, temperature=0.9),
        SamplingParams(seed=1234, top_k=7, min_p=0.05),
    ],
    ids=["plain", "top_p", "top_k_min_p"],
)
def test_seeded_row_is_independent_of_batch(params):
    vocab = 200
    row = rand_logits(1, vocab, scale=2.0, seed=7)
    history = [5, 6, 7]
    solo = Sampler(vocab, seed=1).sample(row, build([params], [history], vocab=vocab))

    # Same row at a different position, next to greedy, unseeded, differently seeded and
    # differently filtered rows, with a different sampler whose own RNG is elsewhere.
    others = rand_logits(5, vocab, seed=99)
    batch_logits = torch.cat([others[:3], row, others[3:]])
    batch_params = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.3),
        SamplingParams(seed=99, top_k=300),
        params,
        SamplingParams(seed=1234, top_k=2),
        SamplingParams(min_p=0.2),
    ]
    outputs = [[1], [], [9, 9, 9, 9], history, history, [2, 2]]
    sampler = Sampler(vocab, seed=2)
    sampler.sample(batch_logits, build(batch_params, outputs, vocab=vocab))
    mixed = sampler.sample(batch_logits, build(batch_params, outputs, vocab=vocab))
    assert mixed.next_token_ids[3] == solo.next_token_ids[0]


def test_seeded_rows_repeat_and_vary_with_step():
    vocab = 50
    logits = rand_logits(1, vocab, scale=0.5).expand(64, vocab).contiguous()
    same_step = build([SamplingParams(seed=42)] * 64, logits=logits)
    tokens = Sampler(vocab).sample(logits, same_step).next_token_ids
    assert len(set(tokens)) == 1  # same seed, same step, same logits: same token

    steps = build([SamplingParams(seed=42)] * 64, [[0] * i for i in range(64)], logits=logits)
    assert len(set(Sampler(vocab).sample(logits, steps).next_token_ids)) > 10


def test_different_seeds_follow_the_distribution():
    vocab, draws = 6, 4000
    row = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, -1.0]])
    logits = row.expand(draws, vocab).contiguous()
    params = [SamplingParams(seed=s) for s in range(draws)]
    tokens = Sampler(vocab).sample(logits, build(params, logits=logits)).next_token_ids
    counts = np.bincount(tokens, minlength=vocab)
    probs = torch.softmax(row.double(), dim=-1)[0].numpy()
    assert chi_square(counts, probs) < CHI2_CRIT_001[vocab - 1]


def test_unseeded_sampler_seed_is_reproducible_and_private():
    logits = rand_logits(32, 100, scale=0.5)
    info = build([SamplingParams()] * 32, logits=logits)
    torch.manual_seed(0)
    a = Sampler(100, seed=5).sample(logits, info).next_token_ids
    torch.manual_seed(1)  # the global RNG must not matter
    b = Sampler(100, seed=5).sample(logits, info).next_token_ids
    c = Sampler(100, seed=6).sample(logits, info).next_token_ids
    assert a == b
    assert a != c


# -- filtered distributions ------------------------------------------------------------------


def allowed_sets(logits_row, temperature, top_k, top_p, min_p, tol=1e-5):
    """(certainly allowed, possibly allowed) tokens, computed in float64 from the definitions.

    Top-k keeps the k most probable (tokens tied with the k-th may be kept too); top-p then
    keeps a token while the top-k-renormalised mass of strictly more probable tokens is below
    top_p; min-p keeps tokens with prob >= min_p * max prob. ``tol`` absorbs float32 rounding:
    the "certain" set treats near-ties against the token, the "possible" set in its favour.
    """
    p = torch.softmax(logits_row.double() / temperature, dim=-1).numpy()
    vocab = p.size
    asc = np.sort(p)
    suffix = np.concatenate([np.cumsum(asc[::-1])[::-1], [0.0]])  # suffix[i] = sum(asc[i:])
    k = vocab if top_k == -1 else min(top_k, vocab)
    kth = asc[vocab - k]
    mass_k = asc[vocab - k :].sum()

    def allowed(s: int) -> set[int]:  # s = +1: possible, -1: certain
        in_top_k = p >= kth - s * tol if k < vocab else np.ones(vocab, bool)
        if s > 0:  # mass of tokens clearly more probable
            above = suffix[np.searchsorted(asc, p + tol, side="right")]
        else:  # mass of every other token that is possibly at least as probable
            above = suffix[np.searchsorted(asc, p - tol, side="left")] - p
        in_top_p = above < top_p * mass_k + s * tol
        in_min_p = p >= min_p * asc[-1] - s * tol
        ok = in_top_k & in_top_p & in_min_p
        if s < 0:
            ok &= p > tol
        return set(np.flatnonzero(ok).tolist())

    return allowed(-1), allowed(+1)


filter_params = st.fixed_dictionaries(
    {
        "temperature": st.sampled_from([0.3, 0.7, 1.0, 1.5]),
        "top_k": st.sampled_from([-1, -1, 2, 3, 5, 20, 100]),
        "top_p": st.sampled_from([1.0, 1.0, 0.05, 0.3, 0.5, 0.9, 0.99]),
        "min_p": st.sampled_from([0.0, 0.0, 0.05, 0.2, 0.9]),
    }
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vocab=st.integers(2, 300),
    scale=st.sampled_from([0.1, 1.0, 3.0, 8.0]),
    quantise=st.booleans(),
    rows=st.lists(filter_params, min_size=1, max_size=4),
    data_seed=st.integers(0, 2**16),
)
def test_filters_never_leave_the_allowed_set(vocab, scale, quantise, rows, data_seed):
    logits = rand_logits(len(rows), vocab, scale=scale, seed=data_seed)
    if quantise:  # many exact ties
        logits = logits.round()
    params = [SamplingParams(seed=data_seed + i, **r) for i, r in enumerate(rows)]
    info = build(params, logits=logits)
    sampler = Sampler(vocab, seed=data_seed)
    dist = sampler.distribution(logits, info)
    tokens = sampler.sample(logits, info).next_token_ids
    for i, r in enumerate(rows):
        if params[i].is_greedy:
            continue
        surely, maybe = allowed_sets(logits[i], **r)
        support = set(torch.nonzero(dist[i]).flatten().tolist())
        assert support, "empty support"
        assert support <= maybe, (r, support - maybe)
        assert surely <= support, (r, surely - support)
        assert tokens[i] in maybe
        torch.testing.assert_close(dist[i].sum(), torch.tensor(1.0))


@pytest.mark.parametrize(
    ("scale", "largest_kept"), [(0.0, 2999), (0.01, 2600), (0.3, 2400), (3.0, 100)]
)
def test_wide_nucleus_is_sampled_by_rejection(scale, largest_kept):
    # Flat-ish distributions put the 0.9-nucleus far past the 64 candidates of a top-p row, so
    # those rows are sampled by rejection; scale 0 ties every token (top_k=5 keeps them all).
    vocab = 3000
    logits = rand_logits(4, vocab, scale=scale, seed=3)
    params = [
        SamplingParams(top_p=0.9, seed=1),
        SamplingParams(top_p=0.9, top_k=2000, seed=2),
        SamplingParams(top_p=0.2, min_p=0.01, seed=3),
        SamplingParams(top_k=5, seed=4),
    ]
    sampler = Sampler(vocab, seed=0)
    info = build(params, logits=logits)
    dist = sampler.distribution(logits, info)
    tokens = sampler.sample(logits, info).next_token_ids
    for i, p in enumerate(params):
        surely, maybe = allowed_sets(logits[i], p.temperature, p.top_k, p.top_p, p.min_p)
        support = set(torch.nonzero(dist[i]).flatten().tolist())
        assert surely <= support <= maybe
        assert tokens[i] in maybe
        if i == 0:
            assert len(support) > largest_kept
        # alone, the row takes the same path (candidates or rejection) and the same token
        alone = sampler.sample(logits[i : i + 1], build([p], logits=logits[i : i + 1]))
        assert alone.next_token_ids[0] == tokens[i]


def test_ties_at_the_cut_are_all_kept():
    # Which of several equally likely tokens a sort puts first is arbitrary; keeping all of them
    # is what makes a seeded row's token independent of the batch it is in.
    logits = torch.tensor([[3.0, 1.0, 3.0, 0.0, 3.0, 1.0], [0.0] * 6])
    params = [SamplingParams(top_k=2, seed=1), SamplingParams(top_k=1000, top_p=0.1, seed=2)]
    info = build(params, logits=logits)
    dist = Sampler(6).distribution(logits, info)
    torch.testing.assert_close(dist[0], torch.tensor([1 / 3, 0, 1 / 3, 0, 1 / 3, 0]))
    torch.testing.assert_close(dist[1], torch.full((6,), 1 / 6))


def test_candidate_count_does_not_change_the_distribution(monkeypatch):
    vocab = 500
    logits = rand_logits(6, vocab, scale=1.0, seed=11)
    params = [SamplingParams(top_p=p, min_p=0.01 * i) for i, p in enumerate([0.5, 0.9, 0.99] * 2)]
    sampler = Sampler(vocab)
    reference = sampler.distribution(logits, build(params, logits=logits))
    for candidates in (1, 2, 8, 100, 499, 1000):
        monkeypatch.setattr(batch_info_mod, "TOP_P_CANDIDATES", candidates)
        dist = sampler.distribution(logits, build(params, logits=logits))
        torch.testing.assert_close(dist, reference, rtol=0, atol=0)


def test_rejection_path_handles_every_filter(monkeypatch):
    # One candidate per top-p row: every nucleus wider than one token goes through rejection.
    monkeypatch.setattr(batch_info_mod, "TOP_P_CANDIDATES", 1)
    vocab = 400
    logits = rand_logits(5, vocab, scale=1.0, seed=4)
    logits[4] = 0.0  # all tied: top_k=3 keeps every token
    params = [
        SamplingParams(top_p=0.5),
        SamplingParams(top_p=0.05, min_p=0.3),
        SamplingParams(top_p=0.9, top_k=300, temperature=0.5),
        SamplingParams(top_p=0.999, seed=3),
        SamplingParams(top_k=3, top_p=0.99),
    ]
    sampler = Sampler(vocab, seed=0)
    info = build(params, logits=logits)
    for _ in range(10):
        tokens = sampler.sample(logits, info).next_token_ids
        for i, p in enumerate(params):
            _, maybe = allowed_sets(logits[i], p.temperature, p.top_k, p.top_p, p.min_p)
            assert tokens[i] in maybe


@pytest.mark.parametrize(
    ("params", "label"),
    [
        (SamplingParams(temperature=0.7, seed=None), "temperature"),
        (SamplingParams(temperature=1.3, top_k=4), "top_k"),
        (SamplingParams(temperature=0.8, top_p=0.8), "top_p"),
        (SamplingParams(temperature=1.0, min_p=0.1), "min_p"),
        (SamplingParams(temperature=1.2, top_p=0.95, min_p=0.15), "top_p_min_p"),
        (SamplingParams(temperature=0.9, top_p=0.9, top_k=5), "top_k_top_p"),
    ],
)
@pytest.mark.parametrize("candidates", [64, 1], ids=["sorted", "rejection"])
def test_empirical_distribution_matches(params, label, candidates, monkeypatch):
    monkeypatch.setattr(batch_info_mod, "TOP_P_CANDIDATES", candidates)
    vocab, draws = 7, 6000
    row = torch.tensor([[1.2, 0.3, 0.0, -0.4, 2.0, -1.5, 0.9]])
    logits = row.expand(draws, vocab).contiguous()
    info = build([params] * draws, logits=logits)
    out = Sampler(vocab, seed=123).sample(logits, info)
    counts = np.bincount(out.next_token_ids, minlength=vocab)

    # reference: softmax(logits / T), then the filter, then renormalise (float64)
    p = torch.softmax(row[0].double() / params.temperature, dim=-1).numpy()
    order = np.argsort(-p)
    keep = np.ones(vocab, bool)
    if params.top_k > 0:
        keep[order[params.top_k :]] = False
    if params.top_p < 1:
        q = np.where(keep, p, 0) / p[keep].sum()
        before = np.cumsum(q[order]) - q[order]
        keep[order[before >= params.top_p]] = False
    keep &= p >= params.min_p * p.max()
    expected = np.where(keep, p, 0) / p[keep].sum()
    dof = int(keep.sum()) - 1
    assert dof >= 1, label
    assert chi_square(counts, expected) < CHI2_CRIT_001[dof], (label, counts, expected * draws)


# -- penalties ---------------------------------------------------------------------------------


def test_frequency_and_presence_penalties_exact():
    vocab = 10
    logits = rand_logits(3, vocab)
    outputs = [[1, 1, 1, 4], [2, 7, 7], []]
    prompts = [[3, 3, 5], [1], [9]]  # prompt tokens are not penalised (OpenAI semantics)
    params = [
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(presence_penalty=-1.5, frequency_penalty=0.25),
        SamplingParams(frequency_penalty=2.0, presence_penalty=2.0),
    ]
    info = build(params, outputs, prompts, logits=logits)
    got = Sampler(vocab).process_logits(logits, info)

    expected = logits.clone()
    for i, (p, out) in enumerate(zip(params, outputs)):
        counts = np.bincount(out, minlength=vocab)
        for tok in range(vocab):
            expected[i, tok] -= p.frequency_penalty * counts[tok]
            expected[i, tok] -= p.presence_penalty * (counts[tok] > 0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_prompt", [True, False])
def test_repetition_penalty_exact(with_prompt):
    vocab = 12
    logits = torch.linspace(-3, 3, vocab).repeat(2, 1)
    outputs = [[0, 11, 11], [5]]
    prompts = [[1, 10, 10, 0, 50], [6, 7]]  # 50 is outside the logits and must be ignored
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(repetition_penalty=0.5)]
    info = build(params, outputs, prompts if with_prompt else None, logits=logits)
    got = Sampler(vocab).process_logits(logits, info)

    expected = logits.clone()
    for i, p in enumerate(params):
        seen = set(outputs[i]) | (set(prompts[i]) if with_prompt else set())
        for tok in seen & set(range(vocab)):
            v = expected[i, tok]
            r = p.repetition_penalty
            expected[i, tok] = v / r if v > 0 else v * r
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_repetition_then_additive_penalties_compose():
    vocab = 6
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0, -1.0]])
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)]
    info = build(params, [[0, 0, 1]], [[2]], logits=logits)
    got = Sampler(vocab).process_logits(logits, info)
    # token 0: 2/2 - 0.5*2 - 0.25; token 1: -2*2 - 0.5 - 0.25; token 2 (prompt): 1/2
    expected = torch.tensor([[-0.25, -4.75, 0.5, 0.5, 0.0, -1.0]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_penalties_change_the_sampled_distribution():
    vocab = 4
    logits = torch.zeros(1, vocab)
    params = [SamplingParams(temperature=1.0, presence_penalty=2.0)]
    info = build(params, [[0, 1]], logits=logits)
    dist = Sampler(vocab).distribution(logits, info)[0]
    w = torch.tensor([np.exp(-2.0), np.exp(-2.0), 1.0, 1.0], dtype=torch.float32)
    torch.testing.assert_close(dist, w / w.sum())


def test_no_penalty_rows_build_nothing():
    info = build([SamplingParams()] * 3, [[1, 2], [3], []], vocab=10)
    assert info.repetition_index is None and info.additive_index is None
    assert info.banned_index is None and not info.needs_logit_processing


# -- min_new_tokens ----------------------------------------------------------------------------


def test_min_new_tokens_bans_eos_and_stop_ids_until_reached():
    vocab = 8
    # EOS (0) is the argmax, stop id 3 the runner-up, then token 5.
    row = torch.tensor([[9.0, 1.0, 2.0, 8.0, 0.0, 7.0, 0.0, 0.0]])
    logits = row.repeat(4, 1)
    p = SamplingParams(temperature=0.0, min_new_tokens=2, stop_token_ids=[3], ignore_eos=True)
    outputs = [[], [4], [4, 4], [4, 4, 4]]
    info = build([p] * 4, outputs, logits=logits)
    out = Sampler(vocab).sample(logits, info)
    assert out.next_token_ids == [5, 5, 0, 0]

    processed = Sampler(vocab).process_logits(logits, info)
    assert torch.isinf(processed[:2, [0, 3]]).all()
    assert torch.isfinite(processed[2:]).all()


def test_min_new_tokens_sampled_rows_never_emit_eos():
    vocab = 5
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0]]).repeat(500, 1)
    params = [SamplingParams(min_new_tokens=1, seed=i) for i in range(500)]
    out = Sampler(vocab).sample(logits, build(params, logits=logits))
    assert EOS not in out.next_token_ids


# -- vocab mask --------------------------------------------------------------------------------


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 64, 100, 257])
def test_bitmask_pack_and_apply_follow_the_bit_layout(vocab, byteorder, monkeypatch):
    # "big" forces the portable shift-and-mask unpacking instead of the byte lookup table.
    monkeypatch.setattr(batch_info_mod.sys, "byteorder", byteorder)
    gen = torch.Generator().manual_seed(vocab)
    allowed = torch.rand(5, vocab, generator=gen) < 0.3
    allowed[:, -1] = True  # the last token (bit 31 of a word when vocab % 32 == 0)
    packed = pack_token_bitmask(allowed)
    assert packed.dtype == torch.int32 and packed.shape == (5, (vocab + 31) // 32)
    # independent reference of the layout: bit j of word w is token w*32 + j
    words = packed.tolist()
    for b in range(5):
        for t in range(vocab):
            assert bool((words[b][t // 32] >> (t % 32)) & 1) == bool(allowed[b, t])
    logits = torch.randn(5, vocab)
    masked = apply_token_bitmask_(logits.clone(), packed)
    assert torch.equal(torch.isneginf(masked), ~allowed)
    assert torch.equal(masked[allowed], logits[allowed])


def test_vocab_mask_restricts_every_kind_of_row():
    vocab, batch = 100, 6
    logits = rand_logits(batch, vocab, scale=1.0)
    allowed = torch.zeros(batch, vocab, dtype=torch.bool)
    for b in range(batch):
        allowed[b, torch.randperm(vocab, generator=torch.Generator().manual_seed(b))[:3]] = True
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=1),
        SamplingParams(top_p=0.5),
        SamplingParams(top_k=50, frequency_penalty=1.0),
        SamplingParams(min_p=0.5, temperature=2.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.2),
    ]
    info = build(params, [[1, 2]] * batch, logits=logits)
    info.vocab_mask = pack_token_bitmask(allowed)
    sampler = Sampler(vocab, seed=0)
    for _ in range(20):
        tokens = sampler.sample(logits, info).next_token_ids
        assert all(allowed[b, t] for b, t in enumerate(tokens))
    dist = sampler.distribution(logits, info)
    assert not (dist[~allowed] > 0).any()
    greedy = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
    assert tokens[0] == greedy[0]


def test_vocab_mask_shape_is_checked():
    logits = torch.zeros(2, 40)
    info = build([SamplingParams()] * 2, logits=logits)
    info.vocab_mask = torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="vocab_mask"):
        Sampler(40).sample(logits, info)


# -- logprobs ----------------------------------------------------------------------------------


def test_logprobs_are_the_raw_model_distribution():
    vocab = 64
    logits = rand_logits(4, vocab)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.8),
        SamplingParams(temperature=0.5, top_p=0.7, seed=1),
        SamplingParams(temperature=1.7, frequency_penalty=1.0),
        SamplingParams(top_k=3, min_new_tokens=5),
    ]
    top_n = [5, 0, 1, 64]
    info = build(
        params,
        [[3, 4]] * 4,
        logits=logits,
        return_logprob=[True, False, True, True],
        top_logprobs_num=top_n,
    )
    out = Sampler(vocab, seed=0).sample(logits, info)
    ref = torch.log_softmax(logits.double(), dim=-1)
    for i, tok in enumerate(out.next_token_ids):
        assert out.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-5)
        pairs = out.top_logprobs[i]
        assert len(pairs) == top_n[i]
        values = [v for _, v in pairs]
        assert values == sorted(values, reverse=True)
        expected = torch.topk(ref[i], top_n[i])
        assert [t for t, _ in pairs] == expected.indices.tolist()
        assert values == pytest.approx(expected.values.tolist(), abs=1e-5)


def test_logprobs_without_top_alternatives():
    logits = rand_logits(2, 16)
    info = build([SamplingParams(temperature=0.0)] * 2, logits=logits, return_logprob=[True, False])
    out = Sampler(16).sample(logits, info)
    assert out.top_logprobs is None
    expected = torch.log_softmax(logits, -1).max(-1).values.tolist()
    assert out.logprobs == pytest.approx(expected, abs=1e-6)


# -- mixed batch -------------------------------------------------------------------------------


def test_mixed_batch_in_one_call():
    vocab = 300
    logits = rand_logits(8, vocab, scale=2.0, seed=5)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=77, temperature=0.8),
        SamplingParams(top_p=0.6),
        SamplingParams(top_k=10, temperature=1.2),
        SamplingParams(frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, presence_penalty=2.0),
        SamplingParams(min_p=0.3, seed=5),
        SamplingParams(top_p=0.9, top_k=50, min_p=0.01, seed=6, min_new_tokens=4),
    ]
    outputs = [[1, 2, 3], [], [7], [8, 8], [9, 9, 10], [int(logits[5].argmax())], [1], [2]]
    prompts = [[4, 5]] * 8
    info = build(
        params, outputs, prompts, logits=logits, return_logprob=[True] * 8, top_logprobs_num=[2] * 8
    )
    sampler = Sampler(vocab, seed=0)
    out = sampler.sample(logits, info)
    dist = sampler.distribution(logits, info)
    assert len(out.next_token_ids) == 8 and len(out.top_logprobs) == 8
    for i, tok in enumerate(out.next_token_ids):
        assert dist[i, tok] > 0
    assert out.next_token_ids[0] == int(logits[0].argmax())
    assert out.next_token_ids[5] != outputs[5][0]  # presence penalty moved the argmax
    assert out.next_token_ids[7] != EOS
    # greedy and seeded rows match what they give alone
    for i in (0, 1, 5, 6, 7):
        one = build([params[i]], [outputs[i]], [prompts[i]], logits=logits[i : i + 1])
        assert (
            Sampler(vocab).sample(logits[i : i + 1], one).next_token_ids[0]
            == (out.next_token_ids[i])
        )


def test_logits_width_must_match_info():
    logits = torch.zeros(2, 40)
    info = build([SamplingParams()] * 2, vocab=41)
    with pytest.raises(ValueError, match="width"):
        Sampler(41).sample(logits, info)


def test_rejection_round_cap_falls_back_to_an_allowed_token(monkeypatch):
    monkeypatch.setattr(batch_info_mod, "TOP_P_CANDIDATES", 1)
    monkeypatch.setattr(sampler_mod, "MAX_REJECTION_ROUNDS", 1)
    vocab = 300
    logits = rand_logits(32, vocab, scale=1.0, seed=8)
    params = [SamplingParams(top_p=0.02, seed=i) for i in range(32)]
    tokens = Sampler(vocab).sample(logits, build(params, logits=logits)).next_token_ids
    for i, tok in enumerate(tokens):
        assert tok in allowed_sets(logits[i], 1.0, -1, 0.02, 0.0)[1]


def test_bfloat16_logits_are_accepted():
    logits = rand_logits(3, 50).bfloat16()
    params = [SamplingParams(temperature=0.0), SamplingParams(top_p=0.9), SamplingParams()]
    info = build(params, logits=logits, return_logprob=[True] * 3)
    out = Sampler(50, seed=0).sample(logits, info)
    assert out.next_token_ids[0] == int(logits[0].float().argmax())
    assert all(0 <= t < 50 for t in out.next_token_ids)


def test_build_checks_lengths_and_clamps_top_logprobs():
    with pytest.raises(ValueError, match="output_ids"):
        SamplingBatchInfo.build([SamplingParams()] * 2, [[]], None, [EOS], 10)
    info = build([SamplingParams()], vocab=10, top_logprobs_num=[50])
    assert info.max_top_logprobs == 10
