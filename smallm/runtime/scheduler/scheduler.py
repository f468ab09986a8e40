"""Continuous batching: every step runs all decoding requests plus prefill chunks in one pass.

One ``step()``:
1. take new requests, aborts and cache flushes from the inbox;
2. make room for one new token per decoding request (evict cached prefixes, else retract);
3. fill the prefill budget (``chunked_prefill_size`` tokens) with the unfinished chunks of
   admitted requests, then with waiting requests in policy order, as KV memory allows;
4. one forward pass over decodes and prefill chunks together; sample where a sequence is ready;
5. finish, cache and free what is done; report new tokens.

The scheduler owns its memory (through the model runner) and never blocks: everything it does
is bounded by the batch it runs.
"""

from __future__ import annotations

import logging
import queue
from typing import Any

import numpy as np
import torch

from smallm.runtime.cache.radix_cache import create_prefix_cache
from smallm.runtime.messages import (
    AbortRequest,
    FlushCacheRequest,
    FlushCacheResult,
    GenerateRequest,
    SchedulerStats,
    TokenOutput,
)
from smallm.runtime.model.forward_batch import BatchEntry
from smallm.runtime.model.model_runner import LogitsOutput, ModelRunner
from smallm.runtime.sampling import Sampler, SamplingBatchInfo
from smallm.runtime.sampling.batch_info import bitmask_words
from smallm.runtime.scheduler.config import SchedulerConfig
from smallm.runtime.scheduler.grammar_queue import GrammarQueue, grammar_spec
from smallm.runtime.scheduler.policy import InFlightPrefixes, order_waiting
from smallm.runtime.scheduler.request import Phase, Req
from smallm.runtime.scheduler.stop import StopChecker

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns the request queue, the prefix cache and the model runner's KV memory."""

    def __init__(
        self,
        runner: ModelRunner,
        config: SchedulerConfig,
        eos_token_ids: list[int],
        tokenizer: Any = None,
    ):
        self.runner = runner
        self.config = config
        self.pool = runner.kv_pool
        self.table = runner.req_to_token
        self.cache = create_prefix_cache(config.disable_radix_cache, self.pool.free)
        self.sampler = Sampler(runner.model_config.vocab_size, seed=config.random_seed)
        self.eos_token_ids = set(eos_token_ids)
        self.stop_checker = StopChecker(tokenizer)
        self.tokenizer = tokenizer
        self.json_closer = None
        if tokenizer is not None and config.json_close_margin > 0:
            from smallm.runtime.scheduler.json_closing import JsonCloser

            self.json_closer = JsonCloser(
                tokenizer,
                runner.model_config.vocab_size,
                sorted(self.eos_token_ids),
                config.json_close_margin,
            )
        self.grammars = GrammarQueue(
            tokenizer,
            runner.model_config.vocab_size,
            config.grammar_backend,
            config.grammar_compile_timeout,
            config.grammar_whitespace_pattern,
        )
        self.max_running = min(
            config.max_running_requests or self.table.max_requests, self.table.max_requests
        )
        if config.schedule_policy not in ("lpm", "fcfs"):
            raise ValueError(
                f"--schedule-policy must be lpm or fcfs, got {config.schedule_policy!r}"
            )
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # admitted: PREFILL or DECODE, in admission order
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.new_token_ratio = config.init_new_token_ratio
        self.num_retractions = 0
        self.forward_steps = 0
        self.prefill_tokens = 0
        # Prefill/decode disaggregation: a PrefillManager or DecodeManager
        # (disagg_prefill.py / disagg_decode.py) set by the scheduler process; None on a plain
        # server, where none of its hooks below runs.
        self.pd: Any = None
        # A prefill server allocates its prompts' KV in runs of consecutive slots: each run is
        # one byte range per layer to write to the decode server, each break one more.
        self.contiguous_prefill_kv = False

    # ---- inbox (thread-safe) -------------------------------------------------------------

    def submit(self, msg: GenerateRequest | AbortRequest | FlushCacheRequest) -> None:
        self.inbox.put(msg)

    def has_work(self) -> bool:
        return bool(
            self.waiting
            or self.running
            or self.grammars
            or not self.inbox.empty()
            or (self.pd is not None and self.pd.has_work())
        )

    @property
    def waiting_only_for_background(self) -> bool:
        """Nothing to run until a grammar compiles or a KV transfer moves (their threads and
        peers do the work): the caller may sleep briefly, not spin."""
        background = bool(self.grammars) or (self.pd is not None and self.pd.has_work())
        return background and not (self.waiting or self.running)

    def _drain_inbox(self, out: list) -> None:
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, GenerateRequest):
                self._accept(msg, out)
            elif isinstance(msg, AbortRequest):
                self._abort(msg, out)
            elif isinstance(msg, FlushCacheRequest):
                out.append(FlushCacheResult(self.flush_cache(), msg.request_id))

    def _accept(self, msg: GenerateRequest, out: list) -> None:
        n = len(msg.input_ids)
        limit = self.runner.context_length
        error = None
        if n == 0:
            error = "the prompt is empty"
        elif n >= limit:
            error = f"the prompt has {n} tokens; the context length is {limit}"
        elif n + 1 > self.pool.capacity:
            error = f"the prompt has {n} tokens; the KV pool holds {self.pool.capacity}"
        if error:
            self._refuse(msg, error, out)
            return
        # Like SGLang: a request may ask for more tokens than fit; it stops at the context end.
        msg.params.max_new_tokens = min(msg.params.max_new_tokens, limit - n)
        r = Req(msg)
        if self.pd is not None and self.pd.accept(r, out):
            return  # the decode side's manager owns it until its KV has arrived
        constraint = grammar_spec(msg.params)
        if constraint is not None:
            error = self.grammars.add(r, *constraint)
            if error:
                self._refuse(msg, error, out)
            return
        self.waiting.append(r)

    def _poll_grammars(self, out: list) -> None:
        ready, failed = self.grammars.poll()
        if self.pd is not None:  # a decode server's requests wait for their KV, not here
            ready = [r for r in ready if not self.pd.grammar_compiled(r, None, out)]
            failed = [(r, e) for r, e in failed if not self.pd.grammar_compiled(r, e, out)]
        self.waiting.extend(ready)
        for r, error in failed:
            self._refuse(r.msg, error, out)

    def _refuse(self, msg: GenerateRequest, error: str, out: list, status: int = 400) -> None:
        """End a request that never ran (a prefill server also fails its bootstrap room)."""
        if self.pd is not None:
            self.pd.fail_room(msg.bootstrap_room)
        out.append(_abort_output(msg, error, status))

    def _abort(self, msg: AbortRequest, out: list) -> None:
        def hit(r: Req) -> bool:
            return msg.abort_all or r.rid == msg.rid

        if self.pd is not None:
            for r in self.pd.remove(hit):
                out.append(_abort_output(r.msg, "aborted"))
        for r in [r for r in self.waiting if hit(r)] + self.grammars.remove(hit):
            if r in self.waiting:
                self.waiting.remove(r)
            self._refuse(r.msg, "aborted", out)
        for r in [r for r in self.running if hit(r)]:
            if self.pd is not None:
                self.pd.fail_room(r.msg.bootstrap_room)
            self._release(r)
            self.running.remove(r)
            r.finish_reason = {"type": "abort", "message": "aborted"}
            out.append(self._output(r))

    def flush_cache(self) -> bool:
        """Empty the prefix cache; refused (False) while requests hold parts of it."""
        if self.running:
            return False
        ok = self.cache.flush()
        if ok:
            self.cache.reset_stats()
        return ok

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[TokenOutput | FlushCacheResult]:
        """Advance every admitted request by one forward pass; return what they produced."""
        out: list[TokenOutput | FlushCacheResult] = []
        self._drain_inbox(out)
        if self.grammars:
            self._poll_grammars(out)
        if self.pd is not None:
            self.pd.poll(out)
        decodes = self._prepare_decodes(out)
        prefills = self._schedule_prefills()
        entries = [e for _, e in decodes] + [e for _, e in prefills]
        if not entries:
            return out
        result = self.runner.forward(entries)
        self.forward_steps += 1
        self._process(decodes, prefills, result, out)
        self.new_token_ratio = max(
            self.config.min_new_token_ratio,
            self.new_token_ratio - self.config.new_token_ratio_decay,
        )
        return out

    def _prepare_decodes(self, out: list) -> list[tuple[Req, BatchEntry]]:
        decoding = [r for r in self.running if r.phase is Phase.DECODE]
        # Make room for one token each: evict cached prefixes, then retract half-prefilled
        # requests, then the newest decoding ones.
        while decoding and not self._ensure_free(len(decoding)):
            prefilling = [r for r in self.running if r.phase is Phase.PREFILL]
            if prefilling:
                self._retract(prefilling[-1])
            elif len(decoding) > 1:
                self._retract(decoding.pop())
            else:
                # Alone and still out of memory: its sequence outgrew the whole KV pool.
                r = decoding.pop()
                r.finish_reason = {"type": "length", "length": len(r.output_ids)}
                self._release(r)
                self.running.remove(r)
                r.phase = Phase.FINISHED
                out.append(self._output(r))
        entries = []
        for r in decoding:
            slot = self.pool.alloc(1)
            self.table.write(r.req_pool_index, r.kv_len, slot)
            entries.append((r, BatchEntry(r.req_pool_index, r.kv_len, [r.token_at(r.kv_len)])))
        return entries

    def _schedule_prefills(self) -> list[tuple[Req, BatchEntry]]:
        budget = self.config.chunked_prefill_size
        budget = budget if budget > 0 else float("inf")
        chosen: list[tuple[Req, BatchEntry]] = []
        # Chunks of admitted requests first: they already hold memory.
        for r in self.running:
            if r.phase is Phase.PREFILL and budget > 0:
                entry = self._prefill_chunk(r, budget)
                if entry is None:
                    break
                chosen.append((r, entry))
                budget -= len(entry.token_ids)
        groups_in_prefill = {r.msg.group for r, _ in chosen if r.msg.group}
        defer = self.config.defer_shared_prefix and not self.config.disable_radix_cache
        in_flight = InFlightPrefixes(r.all_ids for r in self.running if r.phase is Phase.PREFILL)
        if self.waiting:
            self.waiting = order_waiting(self.waiting, self.config.schedule_policy, self.cache)
        for r in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_running:
                break
            if r.msg.group and r.msg.group in groups_in_prefill:
                continue  # let a sibling's prompt reach the cache first, then reuse it
            if defer and in_flight.shares_uncached(r.all_ids, self.cache):
                continue  # a request being prefilled computes this prefix; reuse it next
            if not self._admit(r):
                break
            in_flight.add(r.all_ids)
            entry = self._prefill_chunk(r, budget)
            if entry is None:
                self._release(r)
                self.running.remove(r)
                r.phase = Phase.WAITING
                break
            self.waiting.remove(r)
            if r.msg.group:
                groups_in_prefill.add(r.msg.group)
            chosen.append((r, entry))
            budget -= len(entry.token_ids)
        return chosen

    def _admit(self, r: Req) -> bool:
        """Reserve a table row and lock r's cached prefix, if memory for it is in sight."""
        ids = r.all_ids
        # At least one token must be computed to get logits; input logprobs need their
        # positions computed too.
        limit = len(ids) - 1
        if r.wants_input_logprobs and r.input_logprobs is None:
            limit = min(limit, self._logprob_start(r))
        if r.msg.return_embedding and r.embedding is None:
            limit = 0  # every prompt position's hidden state is needed: reuse no cached KV
            r.hidden_sum = None  # (re)admitted: the whole prompt is prefilled again
        match = self.cache.match_prefix(ids[:limit])
        need = len(ids) - len(match.slots) + self._reserve(r)
        committed = sum(self._reserve(o) + o.seq_len - o.kv_len for o in self.running)
        if (
            self.table.num_free == 0
            or need + committed > self.pool.num_free + self.cache.evictable_size
        ):
            return False
        self.cache.lock(match.node)
        r.locked_node = match.node
        r.req_pool_index = self.table.alloc()
        self.table.write(r.req_pool_index, 0, match.slots)
        r.kv_len = len(match.slots)
        if not r.admitted_once:
            r.cached_tokens = len(match.slots)
            r.admitted_once = True
        r.phase = Phase.PREFILL
        self.running.append(r)
        return True

    def _reserve(self, r: Req) -> int:
        return int(r.remaining_tokens() * self.new_token_ratio)

    def _prefill_chunk(self, r: Req, budget: float) -> BatchEntry | None:
        ids = r.all_ids
        n = int(min(len(ids) - r.kv_len, budget))
        if not self._ensure_free(n):
            return None
        slots = self.pool.alloc(n, contiguous=self.contiguous_prefill_kv)
        self.table.write(r.req_pool_index, r.kv_len, slots)
        start, end = r.kv_len, r.kv_len + n
        entry = BatchEntry(
            r.req_pool_index, start, ids[start:end], need_next_logits=end == len(ids)
        )
        entry.pool_hidden = r.msg.return_embedding and r.embedding is None
        if r.wants_input_logprobs and r.input_logprobs is None:
            first = max(start, self._logprob_start(r))
            last = min(end, len(r.prompt_ids) - 1)  # positions that predict a prompt token
            if first < last:
                entry.logprob_start = first - start
                entry.logprob_targets = ids[first + 1 : last + 1]
                entry.top_logprobs_num = r.msg.top_logprobs_num
        return entry

    def _logprob_start(self, r: Req) -> int:
        return min(max(r.msg.logprob_start_len, 0), len(r.prompt_ids) - 1)

    def _ensure_free(self, n: int) -> bool:
        if self.pool.num_free < n:
            self.cache.evict(n - self.pool.num_free)
        return self.pool.num_free >= n

    # ---- after the forward pass ----------------------------------------------------------

    def _process(self, decodes, prefills, result: LogitsOutput, out: list) -> None:
        for r, _ in decodes:
            r.kv_len += 1
        ready: list[Req] = [r for r, _ in decodes]
        for i, (r, e) in enumerate(prefills, start=len(decodes)):
            r.kv_len += len(e.token_ids)
            self.prefill_tokens += len(e.token_ids)
            lp = result.input_logprobs[i]
            if r.wants_input_logprobs and r.input_logprobs is None:
                self._collect_input_logprobs(r, e, lp)
            if e.pool_hidden and result.hidden_sums is not None:
                part = result.hidden_sums[i]
                r.hidden_sum = part if r.hidden_sum is None else r.hidden_sum + part
            # Put the computed prefix into the cache now, so siblings and requests sharing it
            # reuse it, and chunked prompts never hold more than one chunk privately.
            self._cache_progress(r)
            if r.kv_len == r.seq_len:
                self._finish_input_logprobs(r)
                if r.msg.return_embedding and r.embedding is None and r.hidden_sum is not None:
                    mean = r.hidden_sum / len(r.prompt_ids)
                    r.embedding = (mean / mean.norm().clamp(min=1e-12)).tolist()
                    r.hidden_sum = None
                if r.max_new_tokens == 0:
                    r.finish_reason = {"type": "length", "length": 0}
                else:
                    r.phase = Phase.DECODE
                    ready.append(r)
        order = [r for r, _ in decodes] + [r for r, _ in prefills]
        if ready:
            # next_rows lists the batch entries that got logits, in batch order.
            row_of = {entry: k for k, entry in enumerate(result.next_rows)}
            position = {id(r): i for i, r in enumerate(order)}
            rows = [row_of[position[id(r)]] for r in ready]
            logits = result.next_token_logits
            if rows != list(range(logits.shape[0])):
                logits = logits[rows]
            self._sample(ready, logits)
        for r in order:
            if r.finish_reason is not None and r.phase is not Phase.FINISHED:
                # A prefill server keeps a finished request's KV until it is sent.
                if self.pd is None or not self.pd.hold(r):
                    self._release(r)
                self.running.remove(r)
                r.phase = Phase.FINISHED
            if r.pending_ids or r.finish_reason is not None or self._input_logprobs_due(r):
                out.append(self._output(r))

    def _sample(self, reqs: list[Req], logits) -> None:
        want_lp = [r.msg.return_logprob for r in reqs]
        info = SamplingBatchInfo.build(
            [r.msg.params for r in reqs],
            [r.output_ids for r in reqs],
            [r.prompt_ids for r in reqs],
            self.eos_token_ids,
            logits.shape[1],
            return_logprob=want_lp if any(want_lp) else None,
            top_logprobs_num=[r.msg.top_logprobs_num for r in reqs] if any(want_lp) else None,
        )
        constrained = [j for j, r in enumerate(reqs) if r.grammar is not None]
        if constrained:
            # Unconstrained rows allow everything; each grammar writes its own row.
            mask = torch.full((len(reqs), bitmask_words(logits.shape[1])), -1, dtype=torch.int32)
            for j in constrained:
                r = reqs[j]
                r.grammar.fill_bitmask(mask, j)
                if r.msg.params.json_schema is not None and self._near_limit(r):
                    self.json_closer.restrict(mask[j], r.output_ids)
            info.vocab_mask = mask
        sampled = self.sampler.sample(logits, info)
        for j, r in enumerate(reqs):
            tok = sampled.next_token_ids[j]
            r.output_ids.append(tok)
            r.pending_ids.append(tok)
            if r.msg.return_logprob and sampled.logprobs is not None:
                r.pending_logprobs.append((sampled.logprobs[j], tok))
                if r.msg.top_logprobs_num and sampled.top_logprobs is not None:
                    r.pending_top.append(sampled.top_logprobs[j])
            self._advance(r, tok)

    def _advance(self, r: Req, tok: int) -> None:
        """r's new token ``tok`` (already in its output): feed its grammar, decide whether r
        finished, and jump forward over text its grammar forces."""
        if r.grammar is not None and not r.grammar.accept_token(tok):
            # The mask allowed only what the grammar accepts; this is a backend bug (or, on
            # a decode server, a prefill server that sampled without the constraint).
            r.finish_reason = {"type": "abort", "message": f"the grammar rejected token {tok}"}
            return
        r.finish_reason = self._check_finished(r, tok)
        if r.grammar is not None and r.finish_reason is None:
            if r.grammar.is_terminated():
                r.finish_reason = {"type": "stop", "matched": tok}
            elif not self.config.disable_jump_forward and not r.msg.return_logprob:
                self._jump_forward(r)

    def _near_limit(self, r: Req) -> bool:
        if self.json_closer is None:
            return False
        left = min(r.remaining_tokens(), self.runner.context_length - r.seq_len)
        return left <= self.json_closer.margin

    def _jump_forward(self, r: Req) -> None:
        """Append the text r's grammar forces, as tokens, without sampling them. r goes back to
        PREFILL: the next step computes their KV (a short extend) and samples after them."""
        forced = r.grammar.jump_forward()
        if not forced or self.tokenizer is None:
            return
        room = min(r.max_new_tokens - len(r.output_ids), self.runner.context_length - r.seq_len - 1)
        if room <= 0:
            return
        ids = self.tokenizer.encode(forced, add_special_tokens=False)
        # The forced tokens must decode to exactly the forced text after what came before
        # (tokenizers that merge across the boundary or add prefix spaces fail this): else skip
        # the jump and let the mask drive the next tokens one by one.
        tail = r.output_ids[-4:]
        decode = self.tokenizer.decode
        if not ids or decode(tail + ids) != decode(tail) + forced:
            return
        if not r.grammar.accept_string(forced):
            return
        ids = ids[:room]
        r.output_ids.extend(ids)
        r.pending_ids.extend(ids)
        r.jump_forward_tokens += len(ids)
        r.phase = Phase.PREFILL
        if len(r.output_ids) >= r.max_new_tokens or r.seq_len >= self.runner.context_length:
            r.finish_reason = {"type": "length", "length": len(r.output_ids)}

    def _check_finished(self, r: Req, tok: int) -> dict | None:
        sp = r.msg.params
        n = len(r.output_ids)
        if n >= sp.min_new_tokens:
            if tok in sp.stop_token_ids or (not sp.ignore_eos and tok in self.eos_token_ids):
                return {"type": "stop", "matched": tok}
            if sp.stop:
                matched = self.stop_checker.find(r.output_ids, sp.stop)
                if matched is not None:
                    return {"type": "stop", "matched": matched}
        if n >= sp.max_new_tokens or r.seq_len >= self.runner.context_length:
            return {"type": "length", "length": n}
        return None

    def _collect_input_logprobs(self, r: Req, e: BatchEntry, lp) -> None:
        if lp is None:
            return
        r.input_acc.extend(zip(lp.logprobs, e.logprob_targets))
        if lp.top is not None:
            r.input_top_acc.extend(lp.top)

    def _finish_input_logprobs(self, r: Req) -> None:
        if not r.wants_input_logprobs or r.input_logprobs is not None:
            return
        start = self._logprob_start(r)
        r.input_logprobs = [(None, r.prompt_ids[start])] + [(float(v), t) for v, t in r.input_acc]
        if r.msg.top_logprobs_num:
            r.input_top = [None, *r.input_top_acc]
        r.input_acc, r.input_top_acc = [], []

    def _input_logprobs_due(self, r: Req) -> bool:
        return r.input_logprobs is not None and not r.input_logprobs_sent

    def _output(self, r: Req) -> TokenOutput:
        o = TokenOutput(
            rid=r.rid,
            new_token_ids=r.pending_ids,
            finished=r.finish_reason is not None,
            finish_reason=r.finish_reason,
            prompt_tokens=len(r.prompt_ids),
            completion_tokens=len(r.output_ids),
            cached_tokens=r.cached_tokens,
            output_logprobs=r.pending_logprobs,
            output_top_logprobs=r.pending_top,
        )
        if self._input_logprobs_due(r):
            o.input_logprobs, o.input_top_logprobs = r.input_logprobs, r.input_top
            r.input_logprobs_sent = True
        if r.finish_reason is not None and r.embedding is not None:
            o.embedding = r.embedding
        if not r.first_output_sent:
            o.params, o.stream = r.msg.params, r.msg.stream
            r.first_output_sent = True
        if r.grammar is not None:
            o.jump_forward_tokens = r.jump_forward_tokens
        r.pending_ids, r.pending_logprobs, r.pending_top = [], [], []
        return o

    # ---- memory --------------------------------------------------------------------------

    def _slots(self, r: Req) -> np.ndarray:
        return self.table.read(r.req_pool_index, 0, r.kv_len).copy()

    def _cache_progress(self, r: Req) -> None:
        """Hand the computed prefix to the cache; r keeps using it under a lock."""
        match = self.cache.cache_request(
            r.all_ids[: r.kv_len], self._slots(r), r.locked_node, finished=False
        )
        r.locked_node = match.node
        self.table.write(r.req_pool_index, 0, match.slots)

    def _release(self, r: Req) -> None:
        """Give all of r's memory back: KV to the cache (which frees what it does not keep)."""
        if r.req_pool_index < 0:
            return
        self.cache.cache_request(
            r.all_ids[: r.kv_len], self._slots(r), r.locked_node, finished=True
        )
        self.table.free(r.req_pool_index)
        r.req_pool_index, r.locked_node, r.kv_len = -1, None, 0

    def _retract(self, r: Req) -> None:
        """Send a decoding request back to the queue; its KV stays in the cache until evicted,
        so re-admission usually recomputes little. No request is ever dropped."""
        self._release(r)
        self.running.remove(r)
        r.phase = Phase.WAITING
        self.waiting.insert(0, r)
        self.num_retractions += 1
        self.new_token_ratio = 1.0
        logger.info("retracted %s (%d tokens) to free KV memory", r.rid, r.seq_len)

    def shutdown(self) -> None:
        """Stop the grammar compiler's threads (a compilation in progress runs to its end)."""
        self.grammars.shutdown()

    def stats(self, gen_throughput: float = 0.0) -> SchedulerStats:
        """The load gauges routers read (``/metrics``). Takes the KV transfer latencies
        recorded since the previous call."""
        used = self.pool.capacity - self.pool.num_free - self.cache.evictable_size
        stats = SchedulerStats(
            num_running_reqs=len(self.running),
            num_queue_reqs=len(self.waiting),
            num_used_tokens=used,
            max_total_tokens=self.pool.capacity,
            cache_hit_rate=self.cache.hit_rate(),
            num_grammar_queue_reqs=len(self.grammars),
            gen_throughput=gen_throughput,
            num_retractions=self.num_retractions,
            forward_steps=self.forward_steps,
            prefill_tokens=self.prefill_tokens,
        )
        if self.pd is not None:
            self.pd.report(stats)
        return stats

    def check_idle_accounting(self) -> None:
        """When nothing runs, every slot is free or cached (raises AssertionError otherwise)."""
        assert not self.running
        total = self.pool.num_free + self.cache.total_size
        assert total == self.pool.capacity, (self.pool.num_free, self.cache.total_size)
        assert self.table.num_free == self.table.max_requests


def _abort_output(msg: GenerateRequest, message: str, status: int = 400) -> TokenOutput:
    return TokenOutput(
        rid=msg.rid,
        new_token_ids=[],
        finished=True,
        finish_reason={"type": "abort", "message": message},
        prompt_tokens=len(msg.input_ids),
        error=message,
        error_status=status,
        params=msg.params,
        stream=msg.stream,
    )
