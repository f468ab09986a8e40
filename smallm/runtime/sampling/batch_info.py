"""Per-step tensors that tell the `Sampler` how to treat each row of a batch.

`SamplingBatchInfo.build` runs once per decode step for the whole batch, so it does its work in
Python/numpy and makes at most one small tensor per field, skipping fields that no row uses.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from smallm.runtime.sampling.params import SamplingParams

__all__ = [
    "TOP_P_CANDIDATES",
    "SamplingBatchInfo",
    "apply_token_bitmask_",
    "bitmask_words",
    "pack_token_bitmask",
    "seeded_uniform",
]

_MASK64 = (1 << 64) - 1

# Candidates a top-p row gets from one batched ``topk``: enough for most LM nuclei; a row whose
# nucleus is wider samples by rejection instead (see sampler.py).
TOP_P_CANDIDATES = 64


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def seeded_uniform(seed: int, step: int, draw: int = 0) -> float:
    """The uniform in [0, 1) that a seeded row uses for its ``draw``-th draw at ``step``.

    A pure function of its arguments, so a seeded request samples the same tokens whatever
    batch it lands in. Chained hashing keeps nearby seeds, steps and draws uncorrelated.
    """
    z = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))
    if draw:
        z = _splitmix64(z ^ (draw & _MASK64))
    return (z >> 11) * (1.0 / (1 << 53))


def bitmask_words(vocab_size: int) -> int:
    """Number of int32 words per row in a packed vocabulary bitmask."""
    return (vocab_size + 31) // 32


# Row b of this table is the additive bias (0 allowed, -inf banned) for the 8 tokens whose
# bits are byte b, least significant bit first. Adding gathered rows of it is several times
# faster than masked_fill with an unpacked bool mask (which is slow on CPU for random masks).
_BYTE_BIAS = torch.where(
    ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool(), 0.0, float("-inf")
)
_SHIFTS = torch.arange(32, dtype=torch.int32)


def pack_token_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``[B, V]`` allowed-token mask into the int32 ``[B, ceil(V/32)]`` bitmask format.

    Bit j of word w allows token ``w * 32 + j``. Mainly for tests and simple callers; grammar
    backends usually write the packed form directly.
    """
    batch, vocab = allowed.shape
    words = bitmask_words(vocab)
    padded = torch.zeros(batch, words * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed
    # Summing distinct powers of two is a bitwise OR; int64 holds it, then wrap to int32.
    packed = (padded.view(batch, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set ``logits[b, t]`` to -inf where bit ``t % 32`` of ``bitmask[b, t // 32]`` is 0. In place.

    Vectorised over the whole batch, no loop over rows: each mask byte selects the biases of
    its 8 tokens from a 256-entry table (on little-endian hosts the bytes of an int32 word are
    its bits 0-7, 8-15, ...), else the words are unpacked with shifts and ``& 1``.
    """
    batch, vocab = logits.shape
    if bitmask.shape != (batch, bitmask_words(vocab)):
        raise ValueError(
            f"vocab_mask has shape {tuple(bitmask.shape)}, expected ({batch}, {bitmask_words(vocab)})"
        )
    words = bitmask.to(torch.int32).contiguous()
    if sys.byteorder == "little":
        byte_values = words.view(torch.uint8).view(-1).to(torch.int32)
        bias = _BYTE_BIAS.index_select(0, byte_values).view(batch, -1)
    else:
        bits = (words.unsqueeze(-1) >> _SHIFTS) & 1
        bias = torch.where(bits.view(batch, -1) == 1, 0.0, float("-inf"))
    return logits.add_(bias[:, :vocab].to(logits.dtype))


def _flat_token_counts(
    rows: Sequence[int], seqs: Sequence[Sequence[int]], vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (row, token) pairs as flat indices ``row * V + token``, with occurrence counts."""
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    tokens = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lens.sum()))
    row_of = np.repeat(np.asarray(rows, dtype=np.int64), lens)
    # Ids outside the logits (e.g. tokenizer-only added tokens in a prompt) must not spill into
    # the next row of the flattened logits.
    ok = (tokens >= 0) & (tokens < vocab_size)
    return np.unique(row_of[ok] * vocab_size + tokens[ok], return_counts=True)


def _index_tensor(values: Iterable[int]) -> torch.Tensor | None:
    values = list(values)
    return torch.tensor(values, dtype=torch.int64) if values else None


@dataclass
class SamplingBatchInfo:
    """What the sampler needs for one step of a batch of B rows (one row = one sequence).

    Rows fall in three disjoint groups, each an index tensor or None when empty:
    ``greedy_rows`` take the argmax; ``filtered_rows`` (top-k and/or top-p) find their cut
    among their top ``candidate_widths`` tokens; ``plain_rows`` sample from the whole (min-p
    filtered) distribution.
    Per-row parameter tensors cover all B rows; greedy rows hold neutral values there.

    Logit processing is stored as flat indices into ``logits.view(-1)`` (``row * V + token``)
    so each kind is one vectorised op whatever the batch: ``repetition_*`` (HF semantics, over
    prompt + output), then ``additive_*`` (OpenAI frequency/presence, output only, subtracted),
    then ``bias_*`` (OpenAI logit_bias, added), then ``banned_index`` (EOS and stop ids while below min_new_tokens, set to -inf), then
    ``vocab_mask``.
    """

    batch_size: int
    vocab_size: int
    temperatures: torch.Tensor  # [B, 1] float32, 1.0 on greedy rows
    all_greedy: bool
    greedy_rows: torch.Tensor | None = None
    filtered_rows: torch.Tensor | None = None
    plain_rows: torch.Tensor | None = None
    need_top_k: bool = False
    need_top_p: bool = False
    need_min_p: bool = False
    top_ks: torch.Tensor | None = None  # [B] int64, vocab_size where disabled
    top_ps: torch.Tensor | None = None  # [B] float32
    min_ps: torch.Tensor | None = None  # [B] float32
    # Per row, how many top candidates decide its top-k/top-p cut: top_k + 1 (to see a tie at
    # the k-th) or TOP_P_CANDIDATES, clamped to V; and their maximum over the batch.
    candidate_widths: torch.Tensor | None = None  # [B] int64
    max_candidates: int = 0
    repetition_index: torch.Tensor | None = None
    repetition_factor: torch.Tensor | None = None
    additive_index: torch.Tensor | None = None
    additive_delta: torch.Tensor | None = None
    banned_index: torch.Tensor | None = None
    # OpenAI logit_bias of every row that has one, flat like the penalties: added.
    bias_index: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    seeds: list[int | None] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # tokens generated so far per row
    seeded_rows: torch.Tensor | None = None
    seeded_uniforms: torch.Tensor | None = None  # float64, one per seeded row
    return_logprob: bool = False
    top_logprobs_num: list[int] = field(default_factory=list)
    max_top_logprobs: int = 0
    # Constrained decoding hook: packed int32 [B, ceil(V/32)]; bit j of word w allows token
    # w*32+j. Set by the grammar layer after build(); None means every token is allowed.
    vocab_mask: torch.Tensor | None = None

    @property
    def needs_logit_processing(self) -> bool:
        """True when some penalty, min_new_tokens ban or vocab mask changes the logits."""
        return (
            self.repetition_index is not None
            or self.additive_index is not None
            or self.banned_index is not None
            or self.bias_index is not None
            or self.vocab_mask is not None
        )

    @property
    def need_logprobs(self) -> bool:
        """True when the sampler must compute log-probabilities for this batch."""
        return self.return_logprob or self.max_top_logprobs > 0

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]] | None,
        eos_token_ids: Iterable[int],
        vocab_size: int,
        return_logprob: Sequence[bool] | None = None,
        top_logprobs_num: Sequence[int] | None = None,
    ) -> SamplingBatchInfo:
        """Build the step's info.

        ``output_ids[i]`` are the tokens row i generated so far (penalties, min_new_tokens and
        the seeded draw's step depend on it); ``prompt_ids`` is only read for rows with a
        repetition penalty (None: the penalty covers output tokens only). ``vocab_size`` is the
        width of the logits the sampler will get (which may exceed the tokenizer's vocabulary).
        """
        batch = len(params)
        if len(output_ids) != batch:
            raise ValueError(f"{batch} params but {len(output_ids)} output_ids")
        temperatures = [1.0] * batch
        top_ks = [vocab_size] * batch
        top_ps = [1.0] * batch
        min_ps = [0.0] * batch
        greedy: list[int] = []
        filtered: list[int] = []
        plain: list[int] = []
        seeded: list[int] = []
        uniforms: list[float] = []
        widths = [0] * batch
        rep_rows: list[int] = []
        add_rows: list[int] = []
        ban_rows: list[int] = []
        eos = list(eos_token_ids)
        steps = [len(out) for out in output_ids]

        for i, p in enumerate(params):
            if p.repetition_penalty != 1.0:
                rep_rows.append(i)
            if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                add_rows.append(i)
            # The ban holds even with ignore_eos: that flag only stops EOS from ending the row.
            if steps[i] < p.min_new_tokens:
                ban_rows.append(i)
            if p.is_greedy:
                greedy.append(i)
                continue
            temperatures[i] = p.temperature
            min_ps[i] = p.min_p
            if 0 < p.top_k < vocab_size:
                top_ks[i] = p.top_k
            top_ps[i] = p.top_p
            if top_ks[i] < vocab_size or p.top_p < 1.0:
                filtered.append(i)
                width = top_ks[i] + 1 if top_ks[i] < vocab_size else 0
                if p.top_p < 1.0:
                    width = max(width, TOP_P_CANDIDATES)
                widths[i] = min(width, vocab_size)
            else:
                plain.append(i)
            if p.seed is not None:
                seeded.append(i)
                uniforms.append(seeded_uniform(p.seed, steps[i]))

        sampled = filtered + plain
        need_top_k = any(top_ks[i] < vocab_size for i in filtered)
        need_top_p = any(top_ps[i] < 1.0 for i in filtered)
        need_min_p = any(min_ps[i] > 0.0 for i in sampled)
        info = cls(
            batch_size=batch,
            vocab_size=vocab_size,
            temperatures=torch.tensor(temperatures, dtype=torch.float32).unsqueeze(1),
            all_greedy=not sampled,
            greedy_rows=_index_tensor(greedy),
            filtered_rows=_index_tensor(filtered),
            plain_rows=_index_tensor(plain),
            need_top_k=need_top_k,
            need_top_p=need_top_p,
            need_min_p=need_min_p,
            top_ks=torch.tensor(top_ks, dtype=torch.int64) if filtered else None,
            top_ps=torch.tensor(top_ps, dtype=torch.float32) if filtered else None,
            min_ps=torch.tensor(min_ps, dtype=torch.float32) if need_min_p else None,
            candidate_widths=torch.tensor(widths, dtype=torch.int64) if filtered else None,
            max_candidates=max(widths),
            seeds=[p.seed for p in params],
            steps=steps,
            seeded_rows=_index_tensor(seeded),
            seeded_uniforms=torch.tensor(uniforms, dtype=torch.float64) if seeded else None,
        )
        if rep_rows:
            info._set_repetition(params, rep_rows, output_ids, prompt_ids)
        if add_rows:
            info._set_additive(params, add_rows, output_ids)
        if any(p.logit_bias for p in params):
            info._set_bias(params)
        if ban_rows:
            info._set_banned(params, ban_rows, eos)
        if return_logprob is not None:
            info.return_logprob = any(return_logprob)
        if top_logprobs_num is not None:
            info.top_logprobs_num = [max(0, int(k)) for k in top_logprobs_num]
            info.max_top_logprobs = min(max(info.top_logprobs_num, default=0), vocab_size)
        return info

    def _set_repetition(
        self,
        params: Sequence[SamplingParams],
        rows: list[int],
        output_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]] | None,
    ) -> None:
        seq_rows = rows if prompt_ids is None else [i for i in rows for _ in range(2)]
        seqs = (
            [output_ids[i] for i in rows]
            if prompt_ids is None
            else [s for i in rows for s in (prompt_ids[i], output_ids[i])]
        )
        flat, _ = _flat_token_counts(seq_rows, seqs, self.vocab_size)
        if flat.size == 0:
            return
        factor = np.array([p.repetition_penalty for p in params], dtype=np.float32)
        self.repetition_index = torch.from_numpy(flat)
        self.repetition_factor = torch.from_numpy(factor[flat // self.vocab_size])

    def _set_additive(
        self,
        params: Sequence[SamplingParams],
        rows: list[int],
        output_ids: Sequence[Sequence[int]],
    ) -> None:
        flat, counts = _flat_token_counts(rows, [output_ids[i] for i in rows], self.vocab_size)
        if flat.size == 0:
            return
        freq = np.array([p.frequency_penalty for p in params], dtype=np.float32)
        pres = np.array([p.presence_penalty for p in params], dtype=np.float32)
        row = flat // self.vocab_size
        self.additive_index = torch.from_numpy(flat)
        self.additive_delta = torch.from_numpy(freq[row] * counts.astype(np.float32) + pres[row])

    def _set_bias(self, params: Sequence[SamplingParams]) -> None:
        index, values = [], []
        for i, p in enumerate(params):
            for tok, bias in (p.logit_bias or {}).items():
                if 0 <= tok < self.vocab_size:
                    index.append(i * self.vocab_size + tok)
                    values.append(bias)
        if index:
            self.bias_index = torch.tensor(index, dtype=torch.int64)
            self.bias_values = torch.tensor(values, dtype=torch.float32)

    def _set_banned(
        self, params: Sequence[SamplingParams], rows: list[int], eos: list[int]
    ) -> None:
        flat = [
            i * self.vocab_size + tok
            for i in rows
            for tok in {*eos, *params[i].stop_token_ids}
            if 0 <= tok < self.vocab_size
        ]
        self.banned_index = _index_tensor(sorted(flat))
