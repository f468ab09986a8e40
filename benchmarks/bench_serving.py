"""Online serving benchmark: an async load generator for a running LLM server.

It speaks the SGLang-native API (``POST /generate`` with ``stream: true``; each ``data:`` event
carries the *cumulative* ``text`` and ``meta_info``, the last one is ``data: [DONE]``) and the
OpenAI API (``POST /v1/completions`` with ``stream: true`` and
``stream_options: {"include_usage": true}``; each event carries the *delta* in
``choices[0].text``, a final event carries ``usage``). So it measures smallm, SGLang, or any
OpenAI-compatible server the same way.

Prompts are synthetic English-like text (random words from a fixed word list, seeded RNG). The
script needs no tokenizer: a prompt of N "tokens" is N common words plus sentence periods, which
BPE tokenizers encode at about one token per unit (SmolLM2's: exactly). With ``--tokenizer PATH``
prompts are made to exact token counts and the native backends are sent ``input_ids``. Reported
token counts come from the server (native: ``meta_info.prompt_tokens`` / ``completion_tokens``;
OpenAI: ``usage``) whenever it sends them.

Datasets:
  random         every prompt is fresh random text of ``--random-input-len`` tokens.
  shared-prefix  ``--num-groups`` groups; each group's prompts share one ``--shared-prefix-len``
                 token prefix, followed by a distinct ``--question-len`` token question. Prompts
                 are interleaved round-robin across groups (prompt i belongs to group i % G).
Input, output (and question) lengths are drawn uniformly from ``[ratio * len, len]``
(``--random-range-ratio``, default 1.0 = fixed lengths).

Arrivals: ``--request-rate R`` sends requests as a Poisson process of R req/s (``inf``, the
default, sends them all at once); ``--max-concurrency C`` caps the requests in flight (a
semaphore; a request's clock starts when it is actually sent). Both may be combined.

Metrics (per successful request):
  TTFT  time from sending the request to the first event that adds non-empty text.
  ITL   inter-token latency. Let the text-carrying events (those that add non-empty text) arrive
        at t_0 < t_1 < ... and let k_i be the completion tokens that event i carries. For i >= 1
        the gap (t_i - t_{i-1}) is split evenly over its k_i tokens: k_i samples of
        (t_i - t_{i-1}) / k_i. The tokens of the first text event belong to TTFT, not ITL, and
        tokens after the last text event (e.g. an EOS that decodes to nothing) are not counted.
        k_i is exact when every event reports a cumulative completion-token count (the native
        API's ``meta_info.completion_tokens``): tokens from events that add no text (a
        detokenizer holding back a partial character) are carried by the next text event.
        Otherwise (OpenAI streams report usage only at the end) the final completion-token
        count is spread over the text events in proportion to their text length, at least one
        token each; such requests are flagged ``itl_estimated``.
  E2E   time from sending the request to ``[DONE]``.
  TPOT  (E2E - TTFT) / (output tokens - 1), for requests with more than one output token.
Throughputs divide the successful requests' token totals by the benchmark's duration (first
request sent to last response finished; warmup excluded).

Examples:

    # smallm (or SGLang) native API, 100 prompts of 256 tokens -> 64 tokens, all at once
    python benchmarks/bench_serving.py --backend smallm --num-prompts 100 \\
        --random-input-len 256 --random-output-len 64

    # OpenAI API, Poisson arrivals at 4 req/s, varied lengths, results to JSON
    python benchmarks/bench_serving.py --backend openai --base-url http://127.0.0.1:8000 \\
        --request-rate 4 --random-range-ratio 0.5 --output-json results.json --label vllm

    # prefix-cache workload: 8 groups sharing a 1000-token prefix, 4 requests in flight
    python benchmarks/bench_serving.py --dataset shared-prefix --num-groups 8 \\
        --shared-prefix-len 1000 --question-len 32 --num-prompts 64 --max-concurrency 4

In-process use (another script or a test)::

    from bench_serving import BenchmarkConfig, run_benchmark
    result = asyncio.run(run_benchmark(BenchmarkConfig(base_url=url, num_prompts=10)))
    print(format_result(result)); result.to_dict()

Exit status: 0 if at least one request succeeded, 1 if every request failed, 2 if the benchmark
could not start (bad arguments, no model list for ``--backend openai``, tokenizer not loadable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

BACKENDS = ("smallm", "sglang", "openai")
NATIVE_BACKENDS = ("smallm", "sglang")
DATASETS = ("random", "shared-prefix")
MAX_ERROR_MESSAGES = 5

# Common English words; each one (with its leading space) is a single token in the usual BPE
# vocabularies, so a prompt's length in words + periods approximates its length in tokens.
_WORD_TEXT = """
about above across after again against air all almost alone along already also always among
animal answer any area around arrive ask away back ball bank base bear beat because become bed
before begin behind believe below best better between big bird black blue boat body book both
box boy bread bring brother brown build burn business buy call came can car care carry case cat
catch cause center chair change child city class clean clear close cloud cold color come common
complete could country course cover cross cut dark day deep did different do dog door down draw
dream drive during each early earth east eat end enough even evening ever every eye face fact
fall family far farm fast father feel few field fill find fine fire first fish five floor
follow food foot for force form four free friend from front full game garden gave general girl
give glass go gold good great green ground group grow had half hand happen hard has have head
hear heart heat help her here high hill him his hold home horse hot hour house how idea if
important in inside into island it just keep kind king know land large last late learn leave
left less letter life light like line list listen little live long look lost low made make man
many map mark may mean men might mile mind minute miss money month moon more morning most mother
mountain move much music must name near need never new next night north nothing notice now
number object ocean off office often old once only open order other our out over own page paper
part pass people person picture piece place plan plant play point poor power press problem
pull put question quick quiet rain reach read ready real red remember rest right river road rock
room round rule run said same saw say school sea second see seem sell send sentence serve set
several shape ship short should show side simple since sing sister sit six size sleep slow small
snow some song soon sound south space special stand star start state stay step still stone stop
story street strong study such summer sun sure table take talk teacher tell ten than that the
their them then there these thing think this those though thought three through time today
together told too took top toward town tree true try turn two under until upon use very voice
wait walk wall want warm was watch water way week well went were west what wheel when where
which while white whole why wide wind window winter with without woman wood word work world
would write year yellow young
"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


class BenchmarkError(RuntimeError):
    """The benchmark cannot run (bad configuration, model list or tokenizer unavailable)."""


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass
class BenchmarkConfig:
    """Everything a run needs; the CLI flags map 1:1 onto these fields."""

    base_url: str = "http://127.0.0.1:30000"
    backend: str = "smallm"
    model: str | None = None
    api_key: str | None = None
    dataset: str = "random"
    num_prompts: int = 50
    random_input_len: int = 256
    random_output_len: int = 64
    random_range_ratio: float = 1.0
    shared_prefix_len: int = 512
    num_groups: int = 4
    question_len: int = 32
    request_rate: float = math.inf
    max_concurrency: int | None = None
    seed: int = 1
    temperature: float = 0.0
    ignore_eos: bool = True
    warmup_requests: int = 0
    tokenizer: str | None = None
    request_timeout: float = 3600.0
    disable_tqdm: bool = False
    label: str | None = None
    output_json: str | None = None
    output_details: bool = False


@dataclass
class RequestSpec:
    """One prompt to send. ``prompt_len`` is exact with a tokenizer, else an estimate."""

    prompt: str
    prompt_len: int
    output_len: int
    input_ids: list[int] | None = None
    group: int | None = None


@dataclass
class RequestOutput:
    """What happened to one request. Times are in seconds."""

    success: bool = False
    error: str | None = None
    status: int | None = None
    start_time: float = 0.0  # relative to the benchmark's start (absolute while in flight)
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    itl_estimated: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    prompt_tokens_from_server: bool = False
    output_tokens_from_server: bool = False
    num_text_events: int = 0
    generated_text: str = ""


@dataclass
class LatencyStats:
    """Summary of a latency distribution, in milliseconds (None when there are no samples)."""

    count: int = 0
    mean_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        if not seconds:
            return cls()
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(x) for x in np.percentile(ms, [50, 90, 99]))
        return cls(count=len(ms), mean_ms=float(ms.mean()), p50_ms=p50, p90_ms=p90, p99_ms=p99)


@dataclass
class ErrorSummary:
    message: str
    count: int


@dataclass
class BenchmarkResult:
    label: str | None
    backend: str
    base_url: str
    model: str | None
    dataset: str
    num_prompts: int
    request_rate: float
    max_concurrency: int | None
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    tpot: LatencyStats
    max_concurrency_observed: int
    token_counts_from_server: bool
    itl_estimated_requests: int
    errors: list[ErrorSummary]
    warmup_requests: int = 0
    warmup_failed: int = 0
    config: BenchmarkConfig | None = None
    requests: list[RequestOutput] = field(default_factory=list, repr=False)

    def to_dict(self, details: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (infinite rates become the string "inf"); per-request records only
        with ``details``."""
        d = asdict(self)
        if not details:
            d.pop("requests")
        return _jsonable(d)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def _sample_len(rng: random.Random, length: int, ratio: float) -> int:
    hi = max(1, length)
    lo = max(1, min(hi, math.ceil(hi * ratio)))
    return rng.randint(lo, hi)


def random_text(rng: random.Random, n_tokens: int) -> str:
    """About ``n_tokens`` tokens of text: sentences of 6-14 random words, each word and each
    period counting as one token."""
    parts: list[str] = []
    used = 0
    while used < n_tokens:
        k = min(rng.randint(6, 14), n_tokens - used)
        words = [rng.choice(WORDS) for _ in range(k)]
        used += k
        if used < n_tokens:
            words[-1] += "."
            used += 1
        parts.append(" ".join(words))
    return " ".join(parts)


def _random_ids(tokenizer: Any, rng: random.Random, n_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n_tokens:
        text = random_text(rng, n_tokens - len(ids) + 8)
        ids.extend(tokenizer.encode(" " + text, add_special_tokens=False))
    return ids[:n_tokens]


def load_tokenizer(path: str) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise BenchmarkError(f"--tokenizer needs the transformers package: {e}") from e
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise BenchmarkError(f"cannot load tokenizer {path!r}: {e}") from e


def build_requests(config: BenchmarkConfig, tokenizer: Any = None) -> list[RequestSpec]:
    """The prompts of a run, deterministic in ``config.seed``. With a tokenizer, prompts have
    exact token counts and carry ``input_ids`` (sent to the native backends)."""
    rng = random.Random(config.seed)
    ratio = config.random_range_ratio
    specs: list[RequestSpec] = []

    def make(n_tokens: int) -> tuple[str, list[int] | None]:
        if tokenizer is None:
            return random_text(rng, n_tokens), None
        ids = _random_ids(tokenizer, rng, n_tokens)
        return tokenizer.decode(ids), ids

    if config.dataset == "random":
        for _ in range(config.num_prompts):
            in_len = _sample_len(rng, config.random_input_len, ratio)
            out_len = _sample_len(rng, config.random_output_len, ratio)
            text, ids = make(in_len)
            specs.append(RequestSpec(text, in_len, out_len, ids))
    elif config.dataset == "shared-prefix":
        prefixes = [make(config.shared_prefix_len) for _ in range(config.num_groups)]
        for i in range(config.num_prompts):
            g = i % config.num_groups
            q_len = _sample_len(rng, config.question_len, ratio)
            out_len = _sample_len(rng, config.random_output_len, ratio)
            q_text, q_ids = make(q_len)
            p_text, p_ids = prefixes[g]
            if p_ids is not None and q_ids is not None:
                ids = p_ids + q_ids
                specs.append(RequestSpec(tokenizer.decode(ids), len(ids), out_len, ids, g))
            else:
                prompt = f"{p_text}\n\n{q_text}"
                specs.append(
                    RequestSpec(prompt, config.shared_prefix_len + 1 + q_len, out_len, None, g)
                )
    else:
        raise BenchmarkError(f"unknown dataset {config.dataset!r} (choose from {DATASETS})")
    return specs


# --------------------------------------------------------------------------------------------
# One request
# --------------------------------------------------------------------------------------------


def _headers(config: BenchmarkConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def _url(config: BenchmarkConfig, route: str) -> str:
    return config.base_url.rstrip("/") + route


def make_payload(
    config: BenchmarkConfig, spec: RequestSpec, model: str | None
) -> tuple[str, dict[str, Any]]:
    """The (url, JSON body) of one streaming request."""
    if config.backend in NATIVE_BACKENDS:
        body: dict[str, Any] = {
            "sampling_params": {
                "max_new_tokens": spec.output_len,
                "temperature": config.temperature,
                "ignore_eos": config.ignore_eos,
            },
            "stream": True,
        }
        if spec.input_ids is not None:
            body["input_ids"] = spec.input_ids
        else:
            body["text"] = spec.prompt
        return _url(config, "/generate"), body
    body = {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
    return _url(config, "/v1/completions"), body


def _error_message(body: str) -> str:
    """The message of an error response body (OpenAI / SGLang / FastAPI shapes, or raw text)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body.strip()[:300] or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)[:300]
    return str(obj)[:300]


def _distribute(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` into len(weights) integers >= 1 proportional to ``weights`` (largest
    remainder); all ones when ``total`` is too small."""
    n = len(weights)
    if total <= n:
        return [1] * n
    extra = total - n
    wsum = sum(weights)
    if wsum <= 0:
        weights, wsum = [1] * n, n
    exact = [extra * w / wsum for w in weights]
    parts = [int(x) for x in exact]
    order = sorted(range(n), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: extra - sum(parts)]:
        parts[i] += 1
    return [1 + p for p in parts]


def compute_itl(
    events: Sequence[tuple[float, int, int | None]], total_tokens: int | None
) -> tuple[list[float], bool]:
    """Inter-token latencies from the text-carrying events ``(time, n_chars, tokens or None)``,
    as defined in the module docstring. Returns ``(samples_in_seconds, estimated)``."""
    if len(events) < 2:
        return [], False
    counts = [k for _, _, k in events]
    estimated = any(k is None for k in counts)
    if estimated:
        counts = _distribute(total_tokens or 0, [c for _, c, _ in events])
    samples: list[float] = []
    last_t = events[0][0]
    for (t, _, _), k in zip(events[1:], counts[1:]):
        if k:
            samples.extend([(t - last_t) / k] * k)
            last_t = t
    return samples, estimated


class _StreamState:
    """Accumulates the events of one streamed response."""

    def __init__(self) -> None:
        self.text = ""
        self.events: list[tuple[float, int, int | None]] = []
        self.first_text_time: float | None = None
        self.last_count = 0
        self.pending = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def add(self, t: float, delta: str, cumulative_tokens: int | None) -> None:
        if cumulative_tokens is not None:
            self.pending += max(0, cumulative_tokens - self.last_count)
            self.last_count = max(self.last_count, cumulative_tokens)
        if delta:
            if self.first_text_time is None:
                self.first_text_time = t
            self.text += delta
            self.events.append(
                (t, len(delta), self.pending if cumulative_tokens is not None else None)
            )
            self.pending = 0


def _int_or_none(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _apply_native(state: _StreamState, t: float, obj: dict[str, Any]) -> str | None:
    """Fold one native event into ``state``; returns an error message or None."""
    meta = obj.get("meta_info") or {}
    text = obj.get("text")
    if isinstance(text, list):  # a batch response; we only send single prompts
        text = text[0] if text else ""
    text = text if isinstance(text, str) else ""
    delta = text[len(state.text) :] if len(text) > len(state.text) else ""
    ct = _int_or_none(meta.get("completion_tokens"))
    pt = _int_or_none(meta.get("prompt_tokens"))
    if pt is not None:
        state.prompt_tokens = pt
    if ct is not None:
        state.completion_tokens = ct
    state.add(t, delta, ct)
    finish = meta.get("finish_reason")
    if isinstance(finish, dict) and finish.get("type") == "abort":
        return f"aborted: {finish.get('message', '')}"
    return None


def _apply_openai(state: _StreamState, t: float, obj: dict[str, Any]) -> str | None:
    choices = obj.get("choices") or []
    delta = ""
    if choices and isinstance(choices[0], dict):
        delta = choices[0].get("text") or ""
    usage = obj.get("usage") or {}
    ct = _int_or_none(usage.get("completion_tokens"))
    pt = _int_or_none(usage.get("prompt_tokens"))
    if pt is not None:
        state.prompt_tokens = pt
    if ct is not None:
        state.completion_tokens = ct
    # Per-chunk usage (continuous usage stats) gives exact token counts per event.
    state.add(t, delta if isinstance(delta, str) else "", ct if choices else None)
    return None


async def _iter_sse_data(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, str]]:
    """Yield ``(arrival_time, payload)`` for each ``data:`` line of an event stream."""
    buf = bytearray()
    async for chunk in resp.content.iter_any():
        t = time.perf_counter()
        buf.extend(chunk)
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl]).rstrip(b"\r")
            del buf[: nl + 1]
            if line.startswith(b"data:"):
                yield t, line[5:].strip().decode("utf-8", "replace")
    line = bytes(buf).strip()
    if line.startswith(b"data:"):
        yield time.perf_counter(), line[5:].strip().decode("utf-8", "replace")


async def send_request(
    session: aiohttp.ClientSession,
    config: BenchmarkConfig,
    spec: RequestSpec,
    model: str | None,
    tokenizer: Any = None,
) -> RequestOutput:
    """Send one streaming request and measure it. Never raises for HTTP, protocol or connection
    errors: they are returned as ``success=False`` with a message."""
    url, body = make_payload(config, spec, model)
    apply = _apply_native if config.backend in NATIVE_BACKENDS else _apply_openai
    out = RequestOutput()
    state = _StreamState()
    error: str | None = None
    done = False
    st = time.perf_counter()
    out.start_time = st
    try:
        async with session.post(url, json=body, headers=_headers(config)) as resp:
            out.status = resp.status
            if resp.status != 200:
                error = f"HTTP {resp.status}: {_error_message(await resp.text())}"
            elif not resp.content_type.startswith("text/event-stream"):
                # A server that ignored ``stream``: one JSON answer.
                obj = await resp.json(content_type=None)
                if isinstance(obj, list):
                    obj = obj[0] if obj else {}
                if not isinstance(obj, dict):
                    error = f"unexpected response: {str(obj)[:200]}"
                elif "error" in obj:
                    error = f"error: {_error_message(json.dumps(obj))}"
                else:
                    error = apply(state, time.perf_counter(), obj)
                    done = True
            else:
                async for t, data in _iter_sse_data(resp):
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        error = f"malformed event: {data[:200]}"
                        break
                    if not isinstance(obj, dict):
                        continue
                    if "error" in obj:
                        error = f"stream error: {_error_message(data)}"
                        break
                    error = apply(state, t, obj)
                    if error:
                        break
                if error is None and not done:
                    error = "stream ended before [DONE]"
    except asyncio.TimeoutError:
        error = f"timeout after {config.request_timeout:g} s"
    except aiohttp.ClientError as e:
        error = f"{type(e).__name__}: {e}"
    except Exception as e:  # never let one request take the run down
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()

    out.e2e = end - st
    out.generated_text = state.text
    out.num_text_events = len(state.events)
    if error is not None:
        out.error = error
        return out
    out.success = True
    if state.first_text_time is not None:
        out.ttft = state.first_text_time - st
    if state.prompt_tokens is not None:
        out.prompt_tokens, out.prompt_tokens_from_server = state.prompt_tokens, True
    else:
        out.prompt_tokens = spec.prompt_len
    if state.completion_tokens is not None:
        out.output_tokens, out.output_tokens_from_server = state.completion_tokens, True
    elif tokenizer is not None:
        out.output_tokens = len(tokenizer.encode(state.text, add_special_tokens=False))
    else:
        out.output_tokens = len(state.events)
    out.itl, out.itl_estimated = compute_itl(state.events, out.output_tokens)
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def validate_config(config: BenchmarkConfig) -> None:
    if config.backend not in BACKENDS:
        raise BenchmarkError(f"unknown backend {config.backend!r} (choose from {BACKENDS})")
    if config.dataset not in DATASETS:
        raise BenchmarkError(f"unknown dataset {config.dataset!r} (choose from {DATASETS})")
    if config.num_prompts < 1:
        raise BenchmarkError("--num-prompts must be >= 1")
    if not 0.0 <= config.random_range_ratio <= 1.0:
        raise BenchmarkError("--random-range-ratio must be in [0, 1]")
    if config.random_input_len < 1 or config.random_output_len < 1 or config.question_len < 1:
        raise BenchmarkError("input, output and question lengths must be >= 1")
    if config.dataset == "shared-prefix" and (
        config.num_groups < 1 or config.shared_prefix_len < 1
    ):
        raise BenchmarkError("--num-groups and --shared-prefix-len must be >= 1")
    if not config.request_rate > 0:
        raise BenchmarkError("--request-rate must be > 0 (inf = all at once)")
    if config.max_concurrency is not None and config.max_concurrency < 1:
        raise BenchmarkError("--max-concurrency must be >= 1")
    if config.warmup_requests < 0:
        raise BenchmarkError("--warmup-requests must be >= 0")


async def fetch_model_id(session: aiohttp.ClientSession, config: BenchmarkConfig) -> str:
    """The first model id of ``GET /v1/models``."""
    url = _url(config, "/v1/models")
    try:
        async with session.get(url, headers=_headers(config)) as resp:
            if resp.status != 200:
                msg = _error_message(await resp.text())
                raise BenchmarkError(f"GET {url} -> HTTP {resp.status}: {msg}; pass --model")
            obj = await resp.json(content_type=None)
        return str(obj["data"][0]["id"])
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise BenchmarkError(f"GET {url} failed ({type(e).__name__}: {e}); pass --model") from e
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise BenchmarkError(f"GET {url}: no model id in the answer; pass --model") from e


async def _fetch_native_model(
    session: aiohttp.ClientSession, config: BenchmarkConfig
) -> str | None:
    """``model_path`` from ``GET /get_model_info``, for the report only (None if unavailable)."""
    try:
        timeout = aiohttp.ClientTimeout(total=5)
        url = _url(config, "/get_model_info")
        async with session.get(url, headers=_headers(config), timeout=timeout) as resp:
            if resp.status != 200:
                return None
            obj = await resp.json(content_type=None)
        path = obj.get("model_path") if isinstance(obj, dict) else None
        return str(path) if path else None
    except Exception:
        return None


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds after the start) of n requests: a Poisson process of ``rate`` req/s
    starting at 0, or all zeros for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals-{seed}")
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def summarize(
    config: BenchmarkConfig,
    outputs: list[RequestOutput],
    duration: float,
    max_in_flight: int,
    model: str | None,
) -> BenchmarkResult:
    ok = [o for o in outputs if o.success]
    total_in = sum(o.prompt_tokens for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    errors: dict[str, int] = {}
    for o in outputs:
        if not o.success:
            msg = o.error or "unknown error"
            errors[msg] = errors.get(msg, 0) + 1
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    return BenchmarkResult(
        label=config.label,
        backend=config.backend,
        base_url=config.base_url,
        model=model,
        dataset=config.dataset,
        num_prompts=len(outputs),
        request_rate=config.request_rate,
        max_concurrency=config.max_concurrency,
        completed=len(ok),
        failed=len(outputs) - len(ok),
        duration_s=duration,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=per_s(len(ok)),
        input_throughput=per_s(total_in),
        output_throughput=per_s(total_out),
        total_token_throughput=per_s(total_in + total_out),
        ttft=LatencyStats.of([o.ttft for o in ok if o.ttft is not None]),
        itl=LatencyStats.of([x for o in ok for x in o.itl]),
        e2e=LatencyStats.of([o.e2e for o in ok]),
        tpot=LatencyStats.of(
            [
                (o.e2e - o.ttft) / (o.output_tokens - 1)
                for o in ok
                if o.ttft is not None and o.output_tokens > 1
            ]
        ),
        max_concurrency_observed=max_in_flight,
        token_counts_from_server=all(
            o.prompt_tokens_from_server and o.output_tokens_from_server for o in ok
        ),
        itl_estimated_requests=sum(o.itl_estimated for o in ok),
        errors=[ErrorSummary(m, c) for m, c in errors.items()],
        config=config,
        requests=outputs,
    )


async def run_benchmark(
    config: BenchmarkConfig,
    requests: list[RequestSpec] | None = None,
    *,
    tokenizer: Any = None,
) -> BenchmarkResult:
    """Run one benchmark against ``config.base_url`` and return its measurements.

    ``requests`` overrides the generated prompts; ``tokenizer`` (an HF tokenizer object)
    overrides loading ``config.tokenizer``. Raises ``BenchmarkError`` only when the run cannot
    start; request failures are counted in the result.
    """
    validate_config(config)
    if tokenizer is None and config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    if requests is None:
        requests = build_requests(config, tokenizer)

    timeout = aiohttp.ClientTimeout(total=config.request_timeout)
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = config.model
        if model is None:
            if config.backend == "openai":
                model = await fetch_model_id(session, config)
            else:
                model = await _fetch_native_model(session, config)

        warmup_failed = 0
        if config.warmup_requests:
            warm_cfg = replace(
                config,
                dataset="random",
                num_prompts=config.warmup_requests,
                seed=config.seed + 7919,
                random_output_len=min(config.random_output_len, 16),
                random_range_ratio=1.0,
            )
            warm = await asyncio.gather(
                *(
                    send_request(session, config, spec, model, tokenizer)
                    for spec in build_requests(warm_cfg, tokenizer)
                )
            )
            warmup_failed = sum(not o.success for o in warm)

        sem = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        in_flight = 0
        max_in_flight = 0
        pbar = tqdm(total=len(requests), disable=config.disable_tqdm, desc="requests", unit="req")

        async def one(spec: RequestSpec) -> RequestOutput:
            nonlocal in_flight, max_in_flight
            if sem is not None:
                await sem.acquire()
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            try:
                return await send_request(session, config, spec, model, tokenizer)
            finally:
                in_flight -= 1
                if sem is not None:
                    sem.release()
                pbar.update(1)

        tasks: list[asyncio.Task[RequestOutput]] = []
        start = time.perf_counter()
        try:
            offsets = arrival_offsets(len(requests), config.request_rate, config.seed)
            for spec, at in zip(requests, offsets):
                delay = start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(spec)))
            outputs = list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            pbar.close()
        duration = time.perf_counter() - start

    for o in outputs:
        o.start_time -= start
    result = summarize(config, outputs, duration, max_in_flight, model)
    result.warmup_requests = config.warmup_requests
    result.warmup_failed = warmup_failed
    return result


# --------------------------------------------------------------------------------------------
# Reporting and CLI
# --------------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_result(result: BenchmarkResult) -> str:
    """The human-readable results table."""
    w = 44
    title = " Serving Benchmark Result" + (f": {result.label} " if result.label else " ")
    lines = [title.center(w + 16, "=")]

    def row(name: str, value: Any) -> None:
        lines.append(f"{name + ':':<{w}}{value}")

    row("Backend", result.backend)
    row("Base URL", result.base_url)
    row("Model", result.model or "n/a")
    row("Dataset", result.dataset)
    row("Request rate (req/s)", result.request_rate)
    row("Max concurrency (limit)", result.max_concurrency or "none")
    row("Successful requests", result.completed)
    row("Failed requests", result.failed)
    row("Benchmark duration (s)", _fmt(result.duration_s))
    row("Total input tokens", result.total_input_tokens)
    row("Total output tokens", result.total_output_tokens)
    row("Request throughput (req/s)", _fmt(result.request_throughput))
    row("Input token throughput (tok/s)", _fmt(result.input_throughput))
    row("Output token throughput (tok/s)", _fmt(result.output_throughput))
    row("Total token throughput (tok/s)", _fmt(result.total_token_throughput))
    row("Max concurrency observed", result.max_concurrency_observed)
    for name, short, stats in (
        ("Time to First Token", "TTFT", result.ttft),
        ("Inter-Token Latency", "ITL", result.itl),
        ("Time per Output Token", "TPOT", result.tpot),
        ("End-to-End Latency", "E2E", result.e2e),
    ):
        lines.append(f" {name} ".center(w + 16, "-"))
        for stat, value in (
            ("Mean", stats.mean_ms),
            ("P50", stats.p50_ms),
            ("P90", stats.p90_ms),
            ("P99", stats.p99_ms),
        ):
            row(f"{stat} {short} (ms)", _fmt(value))
    lines.append("=" * (w + 16))
    notes = []
    if result.completed and not result.token_counts_from_server:
        notes.append("some token counts were estimated (the server did not report them)")
    if result.itl_estimated_requests:
        notes.append(
            f"ITL split by text length for {result.itl_estimated_requests} request(s) "
            "(no per-event token counts in the stream)"
        )
    if result.warmup_failed:
        notes.append(f"{result.warmup_failed}/{result.warmup_requests} warmup requests failed")
    lines.extend(f"note: {n}" for n in notes)
    if result.errors:
        lines.append(f"Errors ({result.failed} failed, {len(result.errors)} distinct):")
        for e in result.errors[:MAX_ERROR_MESSAGES]:
            lines.append(f"  [{e.count}x] {e.message}")
        if len(result.errors) > MAX_ERROR_MESSAGES:
            lines.append(f"  ... and {len(result.errors) - MAX_ERROR_MESSAGES} more")
    return "\n".join(lines)


def write_json(result: BenchmarkResult, path: str, details: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result.to_dict(details), f, indent=2)
        f.write("\n")


def build_parser() -> argparse.ArgumentParser:
    d = BenchmarkConfig()
    p = argparse.ArgumentParser(
        description="Online serving benchmark (SGLang-native /generate or OpenAI /v1/completions).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--base-url", default=d.base_url)
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--model", default=None, help="openai: default is the first id of /v1/models")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument("--random-input-len", type=int, default=d.random_input_len)
    p.add_argument("--random-output-len", type=int, default=d.random_output_len)
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=d.random_range_ratio,
        help="lengths are drawn uniformly from [ratio * len, len]",
    )
    p.add_argument("--shared-prefix-len", type=int, default=d.shared_prefix_len)
    p.add_argument("--num-groups", type=int, default=d.num_groups)
    p.add_argument(
        "--question-len",
        type=int,
        default=d.question_len,
        help="shared-prefix: tokens of each prompt's distinct question",
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=d.request_rate,
        help="Poisson arrival rate in req/s; inf sends all requests at once",
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=d.ignore_eos,
        help="send ignore_eos so every output has the requested length",
    )
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests)
    p.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer path: exact prompt token counts (native backends get input_ids)",
    )
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds")
    p.add_argument("--output-json", default=None, metavar="FILE")
    p.add_argument(
        "--output-details", action="store_true", help="include per-request records in the JSON"
    )
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--label", default=None, help="a name for this run in the table and JSON")
    return p


def parse_args(argv: Sequence[str] | None = None) -> BenchmarkConfig:
    return BenchmarkConfig(**vars(build_parser().parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        result = asyncio.run(run_benchmark(config))
    except BenchmarkError as e:
        print(f"bench_serving: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_serving: interrupted", file=sys.stderr)
        return 130
    print(format_result(result))
    if config.output_json:
        write_json(result, config.output_json, config.output_details)
        print(f"results written to {config.output_json}")
    if result.completed == 0:
        print("bench_serving: every request failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
