"""The batched sampler: one call turns a step's logits into one next token per row.

Cost notes (2 CPU cores, B=64, V=49152): a pass over the [B, V] logits costs ~1-2 ms, but a full
sort ~2 ms *per row* and drawing V random numbers (Gumbel/exponential noise) ~1 ms per row. So:

- greedy rows are a single argmax;
- every draw uses one uniform per row, turned into a token by inverse CDF (cumsum +
  searchsorted), never per-token noise;
- top-k/top-p rows find their cut among a few candidates from one batched ``topk``; a row whose
  nucleus is wider than its candidates samples by rejection (draw from the whole distribution,
  accept if the token passes the filters, else retry above it), which needs no sort at all;
- seeded rows get their uniforms from a hash of (seed, step, draw), so their tokens depend only
  on the seed, the step and their own logits, never on the rest of the batch.

Semantics: penalties (repetition, then frequency/presence), the min_new_tokens ban and the vocab
mask change the logits; greedy rows take the argmax; other rows divide by the temperature,
softmax, then keep the top-k tokens, then the top-p nucleus of those (renormalised, as HF and
vLLM do), then tokens with probability >= min_p * max. Tokens tied with the last kept token are
kept as well: which of two equal tokens a sort puts first is arbitrary, and keeping both is what
makes a seeded row's token independent of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smallm.kernels.dispatch import apply_token_bitmask_  # Triton on CUDA, torch otherwise
from smallm.runtime.sampling.batch_info import (
    SamplingBatchInfo,
    seeded_uniform,
)

__all__ = ["SampleOutput", "Sampler"]

# A rejected draw restarts among the tokens more probable than it, so few rounds are ever needed;
# the cap only bounds adversarial inputs (leftover rows take their argmax, which always passes).
MAX_REJECTION_ROUNDS = 32

_SMALLEST_POSITIVE = float(torch.finfo(torch.float32).smallest_normal)


@dataclass
class SampleOutput:
    """The sampler's result for one step; every field is a plain Python list, one entry a row."""

    next_token_ids: list[int]
    # Logprob of the chosen token under the model's raw distribution, when any row asked.
    logprobs: list[float] | None = None
    # Each row's top_logprobs_num (token_id, logprob) pairs, best first, when any row asked.
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class _Cut:
    """Where the filters cut each filtered row, found from its top candidates."""

    vals: torch.Tensor  # [R, K] top probabilities, descending
    idx: torch.Tensor  # [R, K] their token ids
    threshold: torch.Tensor  # [R, 1] a row keeps exactly the tokens with prob >= threshold
    open_ended: torch.Tensor  # [R] the kept set may extend past the row's candidates
    top_p_mass: torch.Tensor  # [R, 1] keep a token while the mass above it is below this
    top_k: torch.Tensor  # [R, 1] keep a token while fewer than this many are above it
    floor: torch.Tensor | None  # [R, 1] min-p: keep tokens with prob >= this


class Sampler:
    """Samples next tokens for a batch from float32 logits ``[B, V]``.

    Unseeded rows draw from the sampler's own ``torch.Generator`` (seeded with ``seed``, or
    from OS entropy when None); the global torch RNG is never touched.
    """

    def __init__(self, vocab_size: int, seed: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, info: SamplingBatchInfo) -> SampleOutput:
        """Choose one token per row. ``logits`` is not modified."""
        self._check_shape(logits, info)
        x = self.process_logits(logits, info)
        if info.all_greedy:
            # max(dim).indices is argmax (the first of equal maxima) at a third of the cost:
            # 1.4 vs 4.1 ms for [64, 49152] float32 on one thread.
            tokens = x.max(dim=-1).indices
        else:
            tokens = self._sample_tokens(x, info, owned=x is not logits)
        out = SampleOutput(next_token_ids=tokens.tolist())
        if info.need_logprobs:
            self._add_logprobs(out, logits, tokens, info)
        return out

    def process_logits(self, logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """Apply penalties, the min_new_tokens ban and the vocab mask.

        Returns ``logits`` itself when nothing applies, else a processed float32 copy.
        """
        if not info.needs_logit_processing:
            return logits if logits.dtype == torch.float32 else logits.float()
        x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        flat = x.view(-1)
        if info.repetition_index is not None:
            # HF semantics: shrink positive logits, push negative ones further down.
            seen = flat[info.repetition_index]
            factor = info.repetition_factor
            flat[info.repetition_index] = torch.where(seen > 0, seen / factor, seen * factor)
        if info.additive_index is not None:
            flat.index_add_(0, info.additive_index, info.additive_delta, alpha=-1.0)
        if info.bias_index is not None:
            flat.index_add_(0, info.bias_index, info.bias_values)
        if info.banned_index is not None:
            flat.index_fill_(0, info.banned_index, float("-inf"))
        if info.vocab_mask is not None:
            apply_token_bitmask_(x, info.vocab_mask)
        return x

    def distribution(self, logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """The exact ``[B, V]`` distribution each row's token is drawn from (greedy rows one-hot).

        Built from the same steps as `sample`, for tests and debugging; not used on the hot path
        (it fully sorts rows that `sample` would handle by rejection).
        """
        self._check_shape(logits, info)
        x = self.process_logits(logits, info)
        dist = torch.zeros_like(x, dtype=torch.float32)
        if info.greedy_rows is not None:
            choice = x[info.greedy_rows].argmax(dim=-1, keepdim=True)
            dist[info.greedy_rows] = dist[info.greedy_rows].scatter(1, choice, 1.0)
        if info.filtered_rows is not None:
            probs = self._probs(x, info.filtered_rows, info, owned=False)
            cut = self._find_cut(probs, info)
            threshold = cut.threshold.clone()
            wide = cut.open_ended.nonzero().squeeze(1)
            if wide.numel():
                full = probs[wide].sort(dim=-1, descending=True).values
                top_k, top_p = cut.top_k[wide].squeeze(1), _top_p(info)[wide]
                min_p = None if info.min_ps is None else _rows(info.min_ps, info)[wide]
                threshold[wide] = _threshold(full, top_k, top_p, min_p)[0]
            dist[info.filtered_rows] = torch.where(probs >= threshold, probs, 0.0)
        if info.plain_rows is not None:
            probs = self._probs(x, info.plain_rows, info, owned=False)
            dist[info.plain_rows] = self._min_p_filter(probs, info, info.plain_rows)
        return dist / dist.sum(dim=-1, keepdim=True)

    # -- internals -------------------------------------------------------------------------

    def _check_shape(self, logits: torch.Tensor, info: SamplingBatchInfo) -> None:
        if logits.dim() != 2 or logits.shape[0] != info.batch_size:
            raise ValueError(
                f"logits shape {tuple(logits.shape)} does not match batch size {info.batch_size}"
            )
        if logits.shape[1] != info.vocab_size:
            raise ValueError(
                f"logits width {logits.shape[1]} != SamplingBatchInfo.vocab_size "
                f"{info.vocab_size} (penalty indices are laid out for the latter)"
            )

    def _sample_tokens(self, x: torch.Tensor, info: SamplingBatchInfo, owned: bool) -> torch.Tensor:
        batch = info.batch_size
        tokens = torch.empty(batch, dtype=torch.int64)
        if info.greedy_rows is not None:
            tokens[info.greedy_rows] = x.index_select(0, info.greedy_rows).argmax(dim=-1)
        uniforms = torch.rand(batch, dtype=torch.float64, generator=self.generator)
        if info.seeded_rows is not None:
            uniforms.index_copy_(0, info.seeded_rows, info.seeded_uniforms)

        if info.filtered_rows is not None:
            rows = info.filtered_rows
            probs = self._probs(x, rows, info, owned)
            tokens[rows] = self._sample_filtered(probs, _select(uniforms, rows, batch), info)
        if info.plain_rows is not None:
            rows = info.plain_rows
            probs = self._min_p_filter(self._probs(x, rows, info, owned), info, rows)
            cum = probs.cumsum_(dim=-1)
            tokens[rows] = _draw(cum, _select(uniforms, rows, batch)).squeeze(1)
        return tokens

    def _sample_filtered(
        self, probs: torch.Tensor, u: torch.Tensor, info: SamplingBatchInfo
    ) -> torch.Tensor:
        cut = self._find_cut(probs, info)
        if not bool(cut.open_ended.any()):
            return _draw_from_candidates(cut.vals, cut.idx, cut.threshold, u)
        chosen = torch.empty(probs.shape[0], dtype=torch.int64)
        narrow = (~cut.open_ended).nonzero().squeeze(1)
        if narrow.numel():
            chosen[narrow] = _draw_from_candidates(
                cut.vals[narrow], cut.idx[narrow], cut.threshold[narrow], u[narrow]
            )
        wide = cut.open_ended.nonzero().squeeze(1)
        n = probs.shape[0]
        floor = None if cut.floor is None else _select(cut.floor, wide, n)
        top_k = _select(cut.top_k, wide, n)
        # Counting tokens costs a pass; only ties can push a top-k row here, so it is rarely due.
        if not bool((top_k < probs.shape[1]).any()):
            top_k = None
        assert info.filtered_rows is not None
        chosen[wide] = self._draw_by_rejection(
            _select(probs, wide, n),
            _select(u, wide, n),
            _select(cut.top_p_mass, wide, n),
            top_k,
            floor,
            info.filtered_rows[wide],
            info,
        )
        return chosen

    def _probs(
        self, x: torch.Tensor, rows: torch.Tensor, info: SamplingBatchInfo, owned: bool
    ) -> torch.Tensor:
        """Softmax of the given rows' logits at their temperatures."""
        batch = info.batch_size
        temps = _select(info.temperatures, rows, batch)
        if rows.numel() == batch:
            scaled = x.div_(temps) if owned else x / temps
        else:
            # index_select already made a private copy, so divide in place.
            scaled = x.index_select(0, rows).div_(temps)
        return torch.softmax(scaled, dim=-1)

    def _min_p_filter(
        self, probs: torch.Tensor, info: SamplingBatchInfo, rows: torch.Tensor
    ) -> torch.Tensor:
        if info.min_ps is None:
            return probs
        min_p = _select(info.min_ps, rows, info.batch_size).unsqueeze(1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p
        # Multiplying by the bool mask is branch-free, unlike masked_fill_/torch.where on CPU.
        return probs.mul_(probs >= threshold)

    def _find_cut(self, probs: torch.Tensor, info: SamplingBatchInfo) -> _Cut:
        """Top-k/top-p/min-p cut of the filtered rows (``probs`` holds just those rows)."""
        assert info.candidate_widths is not None
        vocab = probs.shape[1]
        k = min(info.max_candidates, vocab)
        if k < vocab:
            vals, idx = probs.topk(k, dim=-1)
        else:
            vals, idx = probs.sort(dim=-1, descending=True)
        top_k = _rows(info.top_ks, info)
        min_p = None if info.min_ps is None else _rows(info.min_ps, info)
        threshold, top_p_mass, floor = _threshold(vals, top_k, _top_p(info), min_p)
        if k == vocab:
            open_ended = torch.zeros(probs.shape[0], dtype=torch.bool)
        else:
            # Judged at the row's own width, not the batch's, so that whether a row is sampled
            # from candidates or by rejection never depends on the other rows.
            width = _rows(info.candidate_widths, info).clamp(max=k).unsqueeze(1)
            open_ended = (vals.gather(1, width - 1) >= threshold).squeeze(1)
        return _Cut(vals, idx, threshold, open_ended, top_p_mass, top_k.unsqueeze(1), floor)

    def _draw_by_rejection(
        self,
        probs: torch.Tensor,
        u: torch.Tensor,
        top_p_mass: torch.Tensor,
        top_k: torch.Tensor | None,
        floor: torch.Tensor | None,
        batch_rows: torch.Tensor,
        info: SamplingBatchInfo,
    ) -> torch.Tensor:
        """Sample rows whose nucleus is too wide for their candidates, without sorting.

        Draw from everything still in play; accept when the token passes the filters (the mass
        and count of strictly more probable tokens, and min-p). Otherwise only tokens more
        probable than the rejected one can be in the kept set, so retry among those. Accepted
        draws follow the kept distribution exactly, and each round costs a few passes over the
        row instead of a sort.
        """
        chosen = torch.empty(probs.shape[0], dtype=torch.int64)
        active = torch.arange(probs.shape[0])
        cum = probs.cumsum(dim=-1)
        for draw in range(1, MAX_REJECTION_ROUNDS + 1):
            token = _draw(cum, u)
            p_token = probs.gather(1, token)
            above = probs > p_token
            # Multiplying by the bool mask is branch-free; torch.where/masked_fill on CPU are
            # ~3x slower on a random-looking mask like this one.
            mass_above = probs * above
            ok = mass_above.sum(dim=-1, keepdim=True) < top_p_mass
            if top_k is not None:
                ok &= above.sum(dim=-1, keepdim=True) < top_k
            if floor is not None:
                ok &= p_token >= floor
            ok = ok.squeeze(1)
            chosen[active[ok]] = token[ok].squeeze(1)
            retry = (~ok).nonzero().squeeze(1)
            if retry.numel() == 0:
                return chosen
            active, probs, mass_above = active[retry], probs[retry], mass_above[retry]
            top_p_mass = top_p_mass[retry]
            top_k = None if top_k is None else top_k[retry]
            floor = None if floor is None else floor[retry]
            cum = mass_above.cumsum_(dim=-1)
            u = self._redraw(info, batch_rows[active].tolist(), draw)
        chosen[active] = probs.argmax(dim=-1)
        return chosen

    def _redraw(self, info: SamplingBatchInfo, batch_rows: list[int], draw: int) -> torch.Tensor:
        """Fresh uniforms for a retry: hashed for seeded rows, from the generator for others."""
        u = torch.rand(len(batch_rows), dtype=torch.float64, generator=self.generator)
        seeded = [(j, b) for j, b in enumerate(batch_rows) if info.seeds[b] is not None]
        for j, b in seeded:
            u[j] = seeded_uniform(info.seeds[b], info.steps[b], draw)  # type: ignore[arg-type]
        return u

    def _add_logprobs(
        self,
        out: SampleOutput,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        info: SamplingBatchInfo,
    ) -> None:
        # The model's own distribution: before penalties, temperature and masks.
        logp = torch.log_softmax(logits.float(), dim=-1)
        out.logprobs = logp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        if info.max_top_logprobs > 0:
            values, ids = logp.topk(info.max_top_logprobs, dim=-1)
            values, ids = values.tolist(), ids.tolist()
            out.top_logprobs = [
                list(zip(ids[i][:k], values[i][:k])) for i, k in enumerate(info.top_logprobs_num)
            ]


def _threshold(
    vals: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cut descending candidate probs ``vals [R, K]``: (threshold, top-p mass, min-p floor).

    Top-p applies to the top-k renormalised distribution: a candidate is kept while the mass
    before it is below ``top_p`` times the top-k mass. Enabled ``top_k`` values are always below
    K (each row gets at least top_k + 1 candidates, or the whole vocabulary), so
    ``top_k >= K`` means off. Min-p is relative to the largest probability,
    so renormalising does not change it. Each rule keeps a prefix of the candidates; the
    threshold is the probability of the last candidate of the shortest one, so every token at
    or above it is kept. All quantities depend only on the leading candidates, never on K.
    """
    width = vals.shape[1]
    cum = vals.cumsum(dim=-1)
    k = top_k.clamp(max=width)
    # Without top-k the mass is the whole softmax: 1 by construction, and unlike the sum of the
    # candidates it does not depend on how many there are.
    mass = torch.where(top_k < width, cum.gather(1, (k - 1).unsqueeze(1)).squeeze(1), 1.0)
    top_p_mass = (top_p * mass).unsqueeze(1)
    # The first candidate is always kept; candidate j > 0 while the mass before it, cum[j-1],
    # is below the cut. cum is monotone, so this count is a prefix length.
    keep = torch.minimum(1 + (cum[:, :-1] < top_p_mass).sum(dim=-1), k)
    floor = None
    if min_p is not None:
        floor = vals[:, :1] * min_p.unsqueeze(1)
        keep = torch.minimum(keep, (vals >= floor).sum(dim=-1).clamp(min=1))
    # Never keep zero-probability (e.g. masked) tokens, however far top-k reaches.
    threshold = vals.gather(1, (keep - 1).unsqueeze(1)).clamp(min=_SMALLEST_POSITIVE)
    return threshold, top_p_mass, floor


def _draw_from_candidates(
    vals: torch.Tensor, idx: torch.Tensor, threshold: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Draw among the candidates at or above the threshold, walking them in token-id order.

    Token-id order (not probability order, whose ties are arbitrary) makes the draw a function
    of the kept set alone, whatever the number of candidates.
    """
    ids, order = idx.sort(dim=-1)
    cum = torch.where(vals >= threshold, vals, 0.0).gather(1, order).cumsum_(dim=-1)
    return ids.gather(1, _draw(cum, u)).squeeze(1)


def _draw(cum: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first column whose cumulative probability exceeds ``u * total``.

    ``cum [R, N]`` rows are non-decreasing and unnormalised, ``u [R]`` uniforms in [0, 1).
    Zero-probability columns never increase ``cum``, so they can never be the first to exceed
    the target. Returns ``[R, 1]`` column indices.
    """
    total = cum[:, -1:]
    target = (u.unsqueeze(1) * total.double()).to(cum.dtype)
    # Rounding must not lift the target to the total itself, which would run off the end.
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    slot = torch.searchsorted(cum, target, right=True)
    return slot.clamp_(max=cum.shape[1] - 1)


def _select(t: torch.Tensor, rows: torch.Tensor, full: int) -> torch.Tensor:
    """``t[rows]``, skipping the copy when ``rows`` is every one of ``full`` rows (in order)."""
    return t if rows.numel() == full else t.index_select(0, rows)


def _rows(t: torch.Tensor | None, info: SamplingBatchInfo) -> torch.Tensor:
    """A per-batch-row tensor restricted to the filtered rows."""
    assert t is not None and info.filtered_rows is not None
    return _select(t, info.filtered_rows, info.batch_size)


def _top_p(info: SamplingBatchInfo) -> torch.Tensor:
    return _rows(info.top_ps, info)
