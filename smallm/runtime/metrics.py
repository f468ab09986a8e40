"""Prometheus metrics with SGLang's names, so routers and the inference gateway can read them.

Each server owns its registry (no global state): gauges are set from the scheduler's periodic
`SchedulerStats`, counters and latency histograms are updated by the tokenizer manager as
requests progress.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from smallm.runtime.messages import SchedulerStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The ``/metrics`` page of one server."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

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

    def set_scheduler_stats(self, s: SchedulerStats) -> None:
        self.num_running_reqs.set(s.num_running_reqs)
        self.num_queue_reqs.set(s.num_queue_reqs)
        self.num_grammar_queue_reqs.set(s.num_grammar_queue_reqs)
        self.token_usage.set(s.token_usage)
        self.num_used_tokens.set(s.num_used_tokens)
        self.cache_hit_rate.set(s.cache_hit_rate)
        self.gen_throughput.set(s.gen_throughput)

    def request_finished(self, prompt: int, completion: int, cached: int, e2e: float) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(completion)
        self.cached_tokens.inc(cached)
        self.num_requests.inc()
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
