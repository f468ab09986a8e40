"""Prometheus metrics with SGLang's names, so routers and the inference gateway can read them.

Each server owns its registry (no global state): gauges are set from the scheduler's periodic
`SchedulerStats`, counters and latency histograms are updated by the tokenizer manager as
requests progress.

Labels follow SGLang's: the front end's counters and histograms carry ``model_name``; the
scheduler gauges carry ``model_name, engine_type, tp_rank, pp_rank``, and ``dp_rank`` when the
server runs several data-parallel replicas (one series per replica, as SGLang's schedulers
each export their own). ``sglang:cache_config_info`` (always 1) carries the KV page geometry
in its labels, which llm-d's endpoint picker reads.

A prefill or decode server (``--disaggregation-mode``) says so in ``engine_type`` and adds the
KV transfer series: SGLang's queue gauges (``sglang:num_prefill_inflight_queue_reqs``;
``sglang:num_decode_prealloc_queue_reqs``, ``sglang:num_decode_transfer_queue_reqs``), its
failure counters (``sglang:num_bootstrap_failed_reqs_total``,
``sglang:num_transfer_failed_reqs_total``) and latest-transfer gauges
(``sglang:kv_transfer_latency_ms``, ``sglang:kv_transfer_speed_gb_s``), plus smallm's
``smallm:kv_transfer_bytes_total``, the ``smallm:kv_transfer_seconds`` histogram and
``smallm:disaggregation_requests_total{outcome}`` (ok, transfer_failed, bootstrap_failed).
A transfer's time is the write on a prefill server and, on a decode server, the wait from its
transfer request to the KV's arrival (the prefill side's compute included).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from smallm.runtime.messages import SchedulerStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TRANSFER_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The ``/metrics`` page of one server.

    ``dp_size`` > 1 adds the ``dp_rank`` label to the scheduler gauges; ``page_size`` and
    ``num_pages`` describe the KV cache in ``sglang:cache_config_info``.
    """

    def __init__(
        self,
        model_name: str,
        dp_size: int = 1,
        page_size: int = 1,
        num_pages: int = 0,
        disaggregation_mode: str = "null",
    ):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.dp_size = dp_size
        self.disaggregation_mode = disaggregation_mode
        labels = ["model_name"]
        r = self.registry
        # SGLang's scheduler labels; one tensor/pipeline rank here.
        engine_type = disaggregation_mode if disaggregation_mode != "null" else "unified"
        self._rank_labels = {"engine_type": engine_type, "tp_rank": "0", "pp_rank": "0"}
        rank_names = ["model_name", *self._rank_labels, *(["dp_rank"] if dp_size > 1 else [])]
        self._rank_gauges: dict[str, Gauge] = {}

        def gauge(name: str, doc: str) -> str:
            self._rank_gauges[name] = Gauge(name, doc, rank_names, registry=r)
            return name

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_running_reqs = gauge(
            "sglang:num_running_reqs", "Requests being decoded or prefilled"
        )
        self.num_queue_reqs = gauge("sglang:num_queue_reqs", "Requests waiting for admission")
        self.num_grammar_queue_reqs = gauge(
            "sglang:num_grammar_queue_reqs", "Requests waiting for a grammar to compile"
        )
        self.token_usage = gauge("sglang:token_usage", "Share of KV cache slots in use (0..1)")
        self.num_used_tokens = gauge("sglang:num_used_tokens", "KV cache slots in use")
        self.cache_hit_rate = gauge(
            "sglang:cache_hit_rate", "Share of prompt tokens found in the prefix cache"
        )
        self.gen_throughput = gauge("sglang:gen_throughput", "Generated tokens per second")
        # prometheus_client appends _total to counter names itself.
        self.prompt_tokens = counter("sglang:prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("sglang:generation_tokens", "Generated tokens")
        self.cached_tokens = counter("sglang:cached_tokens", "Prompt tokens reused from the cache")
        self.num_requests = counter("sglang:num_requests", "Finished requests")
        self.ttft = histogram(
            "sglang:time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS
        )
        self.itl = histogram(
            "sglang:inter_token_latency_seconds", "Time between output tokens", _ITL_BUCKETS
        )
        self.e2e = histogram(
            "sglang:e2e_request_latency_seconds", "Request latency", _LATENCY_BUCKETS
        )
        if disaggregation_mode != "null":
            self._pd_metrics(disaggregation_mode, gauge, counter)
        Gauge(
            "sglang:cache_config_info",
            "KV cache geometry (the value is 1; the labels carry it)",
            ["model_name", "page_size", "num_pages"],
            registry=r,
        ).labels(model_name, str(page_size), str(num_pages)).set(1)
        # Every replica's series exists (at 0) from the start, as the other metrics do.
        for rank in range(dp_size):
            for g in self._rank_gauges.values():
                g.labels(**self._gauge_labels(rank))

    def _pd_metrics(self, mode: str, gauge, counter) -> None:
        r, m = self.registry, self.model_name
        if mode == "prefill":
            self.pd_transfer_queue = gauge(
                "sglang:num_prefill_inflight_queue_reqs",
                "Requests whose KV is pinned until written to their decode server",
            )
            self.kv_transfer_speed = gauge(
                "sglang:kv_transfer_speed_gb_s", "KV write speed of the latest report (GB/s)"
            )
        else:
            self.pd_prealloc_queue = gauge(
                "sglang:num_decode_prealloc_queue_reqs",
                "Requests waiting for KV memory or their prefill rank",
            )
            self.pd_transfer_queue = gauge(
                "sglang:num_decode_transfer_queue_reqs", "Requests waiting for their KV"
            )
        self.kv_transfer_latency = gauge(
            "sglang:kv_transfer_latency_ms", "Mean KV transfer time of the latest report (ms)"
        )
        self.bootstrap_failed = counter(
            "sglang:num_bootstrap_failed_reqs", "Requests that never found their prefill rank"
        )
        self.transfer_failed = counter(
            "sglang:num_transfer_failed_reqs", "Rooms whose KV transfer failed or timed out"
        )
        mode_labels = ["model_name", "engine_type"]
        self.kv_transfer_bytes = Counter(
            "smallm:kv_transfer_bytes", "KV bytes moved", mode_labels, registry=r
        ).labels(m, mode)
        self.kv_transfer_seconds = Histogram(
            "smallm:kv_transfer_seconds",
            "Time per KV transfer (prefill: the write; decode: request to arrival)",
            mode_labels,
            buckets=_TRANSFER_BUCKETS,
            registry=r,
        ).labels(m, mode)
        requests = Counter(
            "smallm:disaggregation_requests",
            "Disaggregated requests by outcome",
            [*mode_labels, "outcome"],
            registry=r,
        )
        self.pd_outcomes = {
            o: requests.labels(m, mode, o) for o in ("ok", "transfer_failed", "bootstrap_failed")
        }
        # Cumulative scheduler counters last seen per replica: the counters grow by the delta.
        self._pd_seen: dict[int, tuple[int, int, int, int]] = {}

    def _set_pd_stats(self, s: SchedulerStats, labels: dict[str, str]) -> None:
        now = (s.kv_transfers, s.kv_transfer_bytes, s.kv_transfer_failures, s.kv_bootstrap_failures)
        before = self._pd_seen.get(s.dp_rank, (0, 0, 0, 0))
        ok, nbytes, failed, no_bootstrap = (max(a - b, 0) for a, b in zip(now, before))
        self._pd_seen[s.dp_rank] = now
        self.pd_outcomes["ok"].inc(ok)
        self.kv_transfer_bytes.inc(nbytes)
        self.pd_outcomes["transfer_failed"].inc(failed)
        self.transfer_failed.inc(failed)
        self.pd_outcomes["bootstrap_failed"].inc(no_bootstrap)
        self.bootstrap_failed.inc(no_bootstrap)
        for seconds in s.kv_transfer_latencies:
            self.kv_transfer_seconds.observe(seconds)
        values = {self.pd_transfer_queue: s.pd_transfer_queue_reqs}
        if self.disaggregation_mode == "decode":
            values[self.pd_prealloc_queue] = s.pd_prealloc_queue_reqs
        if s.kv_transfer_latencies:
            mean = sum(s.kv_transfer_latencies) / len(s.kv_transfer_latencies)
            values[self.kv_transfer_latency] = mean * 1e3
            if self.disaggregation_mode == "prefill" and ok and mean > 0:
                values[self.kv_transfer_speed] = nbytes / (mean * ok) / 1e9
        for name, value in values.items():
            self._rank_gauges[name].labels(**labels).set(value)

    def _gauge_labels(self, dp_rank: int) -> dict[str, str]:
        labels = {"model_name": self.model_name, **self._rank_labels}
        if self.dp_size > 1:
            labels["dp_rank"] = str(dp_rank)
        return labels

    @classmethod
    def for_server(cls, args: Any, model_name: str, max_total_tokens: int) -> ServerMetrics:
        """The metrics of a server started with ``args`` (a ServerArgs); ``max_total_tokens``
        is one replica's KV capacity."""
        page = args.page_size
        return cls(
            model_name,
            dp_size=args.dp_size,
            page_size=page,
            num_pages=max_total_tokens // page,
            disaggregation_mode=args.disaggregation_mode,
        )

    def set_scheduler_stats(self, s: SchedulerStats) -> None:
        """Set one replica's gauges (its ``dp_rank`` series when the server has several)."""
        values = {
            self.num_running_reqs: s.num_running_reqs,
            self.num_queue_reqs: s.num_queue_reqs,
            self.num_grammar_queue_reqs: s.num_grammar_queue_reqs,
            self.token_usage: s.token_usage,
            self.num_used_tokens: s.num_used_tokens,
            self.cache_hit_rate: s.cache_hit_rate,
            self.gen_throughput: s.gen_throughput,
        }
        labels = self._gauge_labels(s.dp_rank)
        for name, value in values.items():
            self._rank_gauges[name].labels(**labels).set(value)
        if self.disaggregation_mode != "null":
            self._set_pd_stats(s, labels)

    def request_finished(self, prompt: int, completion: int, cached: int, e2e: float) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(completion)
        self.cached_tokens.inc(cached)
        self.num_requests.inc()
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
