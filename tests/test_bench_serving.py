"""benchmarks/bench_serving.py against an in-process fake server (native and OpenAI streaming)."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serving.py"
_spec = importlib.util.spec_from_file_location("bench_serving", _PATH)
bs = importlib.util.module_from_spec(_spec)
sys.modules["bench_serving"] = bs
_spec.loader.exec_module(bs)

MODEL_ID = "fake-model"


def word_tokens(text: str) -> int:
    """The fake tokenizer: a word, a period or a blank line is one token."""
    return len(re.findall(r"\w+|\.|\n\n", text))


@dataclass
class FakeServer:
    """Streams ``max_new_tokens`` fake tokens (" t0", " t1", ...) with a short sleep per event.

    Request number i (in arrival order) fails with HTTP 400 when ``fail_every`` divides i, and
    with a mid-stream error event when ``stream_error_every`` divides i - 1.
    """

    token_sleep: float = 0.002
    native_tokens_per_event: int = 1
    openai_tokens_per_event: int = 2
    fail_every: int = 0
    stream_error_every: int = 0
    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    sent_prompt_tokens: list[int] = field(default_factory=list)
    sent_completion_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._counter = itertools.count()

    def _admit(self, body: dict[str, Any]) -> tuple[int, web.Response | None]:
        self.bodies.append(body)
        i = next(self._counter)
        if self.fail_every and i % self.fail_every == 0:
            err = {"error": {"message": f"bad request #{i}", "type": "BadRequest", "code": 400}}
            return i, web.json_response(err, status=400)
        return i, None

    def _mid_error(self, i: int) -> bool:
        return bool(self.stream_error_every) and (i - 1) % self.stream_error_every == 0

    async def _stream(self, request: web.Request, events: list[dict[str, Any]], fail: bool):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for j, ev in enumerate(events):
            await asyncio.sleep(self.token_sleep)
            if fail and j == len(events) // 2:
                err = {"error": {"message": "KV cache exhausted", "code": 500}}
                await resp.write(f"data: {json.dumps(err)}\n\n".encode())
                break
            await resp.write(f"data: {json.dumps(ev)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        i, early = self._admit(body)
        if early is not None:
            return early
        n = body["sampling_params"]["max_new_tokens"]
        n_prompt = len(body["input_ids"]) if "input_ids" in body else word_tokens(body["text"])
        events, text, step = [], "", self.native_tokens_per_event
        for start in range(0, n, step):
            text += "".join(f" t{k}" for k in range(start, min(n, start + step)))
            done = start + step >= n
            meta = {
                "prompt_tokens": n_prompt,
                "completion_tokens": min(n, start + step),
                "finish_reason": {"type": "length", "length": n} if done else None,
            }
            events.append({"text": text, "meta_info": meta})
        if not self._mid_error(i):
            self.sent_prompt_tokens.append(n_prompt)
            self.sent_completion_tokens.append(n)
        return await self._stream(request, events, self._mid_error(i))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        i, early = self._admit(body)
        if early is not None:
            return early
        n, n_prompt, step = (
            body["max_tokens"],
            len(body["prompt"].split()),
            self.openai_tokens_per_event,
        )
        events = []
        for start in range(0, n, step):
            delta = "".join(f" t{k}" for k in range(start, min(n, start + step)))
            finish = "length" if start + step >= n else None
            events.append({"choices": [{"index": 0, "text": delta, "finish_reason": finish}]})
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
        events.append({"choices": [], "usage": usage})
        if not self._mid_error(i):
            self.sent_prompt_tokens.append(n_prompt)
            self.sent_completion_tokens.append(n)
        return await self._stream(request, events, self._mid_error(i))

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        return app


@contextmanager
def serve(**kwargs: Any) -> Iterator[FakeServer]:
    """Run a FakeServer on a free port in a background thread with its own event loop."""
    server = FakeServer(**kwargs)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def start() -> None:
        runner = web.AppRunner(server.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        server.url = f"http://127.0.0.1:{port}"
        holder["runner"] = runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def run(server: FakeServer, **kwargs: Any) -> Any:
    defaults = dict(
        base_url=server.url,
        num_prompts=12,
        random_input_len=40,
        random_output_len=8,
        disable_tqdm=True,
    )
    config = bs.BenchmarkConfig(**{**defaults, **kwargs})
    return asyncio.run(bs.run_benchmark(config))


def check_success(result: Any, server: FakeServer, n: int, out_len: int, itl_per_req: int) -> None:
    assert result.completed == n and result.failed == 0 and not result.errors
    assert result.total_output_tokens == sum(server.sent_completion_tokens) == n * out_len
    assert result.total_input_tokens == sum(server.sent_prompt_tokens)
    assert result.token_counts_from_server
    for o in result.requests:
        assert o.success and o.output_tokens == out_len
        assert o.ttft is not None and 0 < o.ttft <= o.e2e
        assert len(o.itl) == itl_per_req and all(x >= 0 for x in o.itl)
        assert o.generated_text == "".join(f" t{k}" for k in range(out_len))
    assert result.itl.count == n * itl_per_req and result.itl.mean_ms > 0
    assert result.ttft.p50_ms <= result.e2e.p99_ms
    assert result.duration_s > 0 and result.output_throughput > 0
    assert result.request_throughput == pytest.approx(n / result.duration_s)


@pytest.mark.parametrize("backend", ["smallm", "sglang"])
def test_native_all_at_once(backend: str) -> None:
    with serve() as server:
        result = run(server, backend=backend)
    check_success(result, server, 12, 8, itl_per_req=7)
    assert result.max_concurrency_observed == 12
    assert result.itl_estimated_requests == 0
    body = server.bodies[0]
    assert body["stream"] is True and "text" in body
    assert body["sampling_params"] == {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    # Prompt sizes follow the word-count approximation exactly.
    assert server.sent_prompt_tokens == [40] * 12


def test_native_multi_token_events_and_max_concurrency() -> None:
    with serve(native_tokens_per_event=3) as server:
        result = run(server, max_concurrency=3, random_output_len=9)
    # Events carry 3 tokens each: the first event's 3 belong to TTFT, the rest give 6 samples.
    check_success(result, server, 12, 9, itl_per_req=6)
    assert result.max_concurrency_observed == 3
    for o in result.requests:
        assert o.itl[0] == o.itl[1] == o.itl[2]


def test_openai_request_rate() -> None:
    with serve(openai_tokens_per_event=2) as server:
        result = run(server, backend="openai", request_rate=200.0, api_key="sk-test")
    # 4 chunks of 2 tokens (counts spread by text length, from usage) -> 6 ITL samples.
    check_success(result, server, 12, 8, itl_per_req=6)
    assert result.itl_estimated_requests == 12
    assert result.model == MODEL_ID
    body = server.bodies[0]
    assert body["model"] == MODEL_ID and body["max_tokens"] == 8 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    starts = sorted(o.start_time for o in result.requests)
    assert starts[-1] > 0.005  # Poisson arrivals are spread out, not simultaneous


def test_shared_prefix_dataset() -> None:
    config = bs.BenchmarkConfig(
        dataset="shared-prefix",
        num_prompts=8,
        num_groups=2,
        shared_prefix_len=100,
        question_len=10,
        random_output_len=4,
    )
    specs = bs.build_requests(config)
    assert [s.group for s in specs] == [0, 1] * 4
    for s in specs:
        prefix = specs[s.group].prompt.split("\n\n")[0]
        assert s.prompt.startswith(prefix + "\n\n") and word_tokens(s.prompt) == s.prompt_len == 111
    assert len({s.prompt for s in specs}) == 8
    assert specs == bs.build_requests(config)  # deterministic in the seed
    with serve() as server:
        result = run(server, dataset="shared-prefix", num_groups=2, shared_prefix_len=50)
    check_success(result, server, 12, 8, itl_per_req=7)


def test_errors_are_counted() -> None:
    with serve(fail_every=3, stream_error_every=5) as server:
        result = run(server, max_concurrency=4)
    # Arrivals 0..11: HTTP 400 for 0, 3, 6, 9; a mid-stream error for 1 and 11 (6 is a 400).
    assert result.completed == 6 and result.failed == 6
    messages = {e.message: e.count for e in result.errors}
    assert sum(messages.values()) == 6
    assert sum(1 for m in messages if m.startswith("HTTP 400: bad request #")) == 4
    assert messages["stream error: KV cache exhausted"] == 2
    assert result.total_output_tokens == 6 * 8
    text = bs.format_result(result)
    assert "Failed requests:" in text and "KV cache exhausted" in text


def test_cli_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    with serve() as server:
        argv = ["--base-url", server.url, "--num-prompts", "4", "--random-output-len", "5"]
        argv += ["--disable-tqdm", "--label", "run1", "--warmup-requests", "2"]
        assert bs.main([*argv, "--output-json", str(out), "--output-details"]) == 0
    data = json.loads(out.read_text())
    assert data["label"] == "run1" and data["completed"] == 4 and data["request_rate"] == "inf"
    assert data["total_output_tokens"] == 20 and len(data["requests"]) == 4
    assert {"mean_ms", "p50_ms", "p90_ms", "p99_ms"} <= data["itl"].keys()
    assert data["warmup_requests"] == 2 and data["warmup_failed"] == 0
    assert "Serving Benchmark Result: run1" in capsys.readouterr().out

    with serve(fail_every=1) as server:
        argv = ["--base-url", server.url, "--num-prompts", "3", "--disable-tqdm"]
        assert bs.main(argv) == 1
    captured = capsys.readouterr()
    assert "Successful requests:" in captured.out and "bad request #" in captured.out
    assert "Traceback" not in captured.out + captured.err

    # Nothing listening: connection errors are failures, not tracebacks; openai cannot start.
    dead = "http://127.0.0.1:9"
    assert bs.main(["--base-url", dead, "--num-prompts", "2", "--disable-tqdm"]) == 1
    assert bs.main(["--base-url", dead, "--backend", "openai", "--disable-tqdm"]) == 2
    assert "pass --model" in capsys.readouterr().err


def test_compute_itl() -> None:
    # Exact counts; an event with no new tokens has its gap folded into the next one.
    events = [(1.0, 3, 1), (1.2, 3, 2), (1.3, 1, 0), (1.5, 3, 1)]
    samples, estimated = bs.compute_itl(events, 4)
    assert not estimated and samples == pytest.approx([0.1, 0.1, 0.3])
    # Unknown per-event counts: 9 tokens -> one each, the other 6 by text length 1:1:4.
    events = [(0.0, 1, None), (1.0, 1, None), (2.0, 4, None)]
    samples, estimated = bs.compute_itl(events, 9)
    assert estimated and samples == pytest.approx([0.5, 0.5] + [0.2] * 5)
    assert bs.compute_itl([(0.0, 5, 5)], 5) == ([], False)


def test_tokenizer_exact_lengths(default_model_dir: str) -> None:
    tok = bs.load_tokenizer(default_model_dir)
    config = bs.BenchmarkConfig(
        num_prompts=3, random_input_len=33, random_output_len=4, random_range_ratio=0.5
    )
    specs = bs.build_requests(config, tok)
    for s in specs:
        assert s.input_ids is not None and len(s.input_ids) == s.prompt_len
        assert 17 <= s.prompt_len <= 33
        assert s.prompt == tok.decode(s.input_ids)
    with serve() as server:
        cfg = bs.BenchmarkConfig(
            base_url=server.url,
            tokenizer=default_model_dir,
            disable_tqdm=True,
            **{
                k: getattr(config, k)
                for k in (
                    "num_prompts",
                    "random_input_len",
                    "random_output_len",
                    "random_range_ratio",
                )
            },
        )
        result = asyncio.run(bs.run_benchmark(cfg))
    assert result.completed == 3
    # The native backend is sent the exact token ids.
    assert sorted(len(b["input_ids"]) for b in server.bodies) == sorted(s.prompt_len for s in specs)
    assert result.total_input_tokens == sum(s.prompt_len for s in specs)
