"""Prefill/decode disaggregation vs one co-located server on the same machine (issue 15).

Two set-ups on the same cores, one after the other:

- ``colocated``: one ``smallm serve`` (default model, default threads: every core) computes
  prompts and decodes; a long prompt's prefill chunks (``--chunked-prefill-size``, 512 tokens)
  ride in the same forward steps as the running decodes.
- ``pd``: a prefill server pinned to one core and a decode server pinned to another (each
  ``--torch-threads 1``), the KV moved by Mooncake's transfer engine over TCP (``--backend``;
  smallm's ``fake`` engine when ``mooncake.engine`` does not import), with
  ``sglang-router --pd-disaggregation`` in front. The router and this client are not pinned.

The workload: ``--decoders`` streams of short prompts that decode ``--decode-output-len`` tokens
each, started first and kept going (each stream sends its next request as soon as the last
ends) until every "long prompt" has finished; ``--long-prompts`` prompts of ``--long-input-len``
tokens (``MIN,MAX``, uniform) with few output tokens arrive every ``--long-interval`` seconds
while the decoders run. Everything is streamed through the native ``/generate`` (text prompts,
greedy, ``ignore_eos``) by ``bench_serving.py``'s client, which times each token's arrival.

Reported per set-up: output throughput (all requests' output tokens / the run's duration),
the decoders' inter-token latency p50/p99/max, TTFT p50/p99 of the short and of the long
prompts. For ``pd``, the KV transfer over the timed run, from the prefill server's
``smallm:kv_transfer_seconds`` histogram (``/metrics``: the write of a room's KV and first-token
record, on its transfer thread) and ``kv_transfer_bytes`` / ``kv_bytes_per_token``
(``/server_info``): time per token = transfer seconds / tokens moved. Without those series
(an older server) it falls back to the scheduler stats' ``kv_transfer_seconds``, and failing
that prints bytes per token only. The transfer is measured three times: 3 long prompts alone
before the timed run, the timed run, and 3 long prompts alone after it (once the run has churned
the KV pools).

    python benchmarks/bench_pd.py [--decoders 4] [--decode-output-len 128]
        [--long-prompts 10] [--long-input-len 1000,1500] [--long-interval 1.5]
        [--backend mooncake|fake] [--only colocated,pd,pd-scattered] [--max-total-tokens 65536]

Run it on an otherwise idle machine with at least two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import bench_serving as bs
from bench_process import BenchProcess

from smallm.lang.backends.runtime import free_port
from smallm.runtime.cpu_features import cpu_features

# pd-scattered: the same pair with --disable-pd-contiguous-kv (prompts' KV slots taken from the
# free list as they come), to show what allocating them in runs is worth once the pools churn.
SETUPS = ("colocated", "pd", "pd-scattered")


def _server(flags: list[str], cores: set[int] | None = None) -> BenchProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "smallm.launch_server", "--port", str(port)]
    cmd += ["--log-level", "warning", *flags]
    return BenchProcess(cmd, f"http://127.0.0.1:{port}", log_prefix="bench-pd-", cores=cores)


def _pd_router(prefill: str, bootstrap_port: int, decode: str) -> BenchProcess:
    port = free_port()
    cmd = [
        sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
        "--prefill", prefill, str(bootstrap_port), "--decode", decode,
        "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
        "--prometheus-port", str(free_port()), "--log-level", "warn",
    ]  # fmt: skip
    return BenchProcess(cmd, f"http://127.0.0.1:{port}", log_prefix="bench-pd-")


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


# ---- the workload ----------------------------------------------------------------------------


@dataclass
class Workload:
    decoders: int
    decode_input_len: int
    decode_output_len: int
    long_prompts: int
    long_input_len: tuple[int, int]
    long_output_len: int
    long_interval: float
    lead: float  # seconds the decoders run before the first long prompt
    seed: int


@dataclass
class RunResult:
    short: list[bs.RequestOutput] = field(default_factory=list)
    long: list[bs.RequestOutput] = field(default_factory=list)
    duration: float = 0.0


def _spec(rng: random.Random, n_tokens: int, out: int) -> bs.RequestSpec:
    # bench_serving's word text: about one token per word for SmolLM2's tokenizer.
    return bs.RequestSpec(bs.random_text(rng, n_tokens), n_tokens, out)


async def run_workload(url: str, w: Workload, tag: str) -> RunResult:
    """Decoders first, then the long prompts at a fixed interval; the decoders stop starting
    new requests once every long prompt has finished. ``tag`` keeps prompts of different runs
    (warm-up, timed) apart so that no run hits another's prefix cache."""
    cfg = bs.BenchmarkConfig(base_url=url, backend="smallm", temperature=0.0, ignore_eos=True)
    rng = random.Random(f"{tag}-{w.seed}")
    lo, hi = w.long_input_len
    longs = [_spec(rng, rng.randint(lo, hi), w.long_output_len) for _ in range(w.long_prompts)]
    res = RunResult()
    longs_done = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()

        async def decoder(i: int) -> None:
            # Each stream draws its prompts from its own RNG: the same prompts in every set-up.
            drng = random.Random(f"{tag}-{w.seed}-decoder-{i}")
            while True:
                spec = _spec(drng, w.decode_input_len, w.decode_output_len)
                res.short.append(await bs.send_request(session, cfg, spec, None))
                if longs_done.is_set():
                    return

        async def long_prompts() -> None:
            tasks = []
            for k, spec in enumerate(longs):
                delay = start + w.lead + k * w.long_interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(bs.send_request(session, cfg, spec, None)))
            res.long.extend(await asyncio.gather(*tasks))
            longs_done.set()

        await asyncio.gather(long_prompts(), *(decoder(i) for i in range(w.decoders)))
        res.duration = time.perf_counter() - start
    return res


# ---- KV transfer accounting (pd) -------------------------------------------------------------


@dataclass
class TransferSnapshot:
    """One server's cumulative KV transfer counters."""

    transfers: int
    nbytes: int
    seconds: float | None  # None when the server exports no transfer time
    source: str  # where ``seconds`` came from


_HIST = re.compile(r"^smallm:kv_transfer_seconds_(sum|count)\{([^}]*)\} ([0-9.e+-]+)$", re.M)


def _transfer_snapshot(url: str, mode: str) -> TransferSnapshot:
    """``mode`` is the server's ``engine_type``: on a prefill server the time is the write of
    a room's KV and first-token record; on a decode server, transfer request to the KV's
    arrival (the prefill side's queueing and compute included)."""
    stats = _get_json(url + "/server_info").get("scheduler_stats") or {}
    transfers = int(stats.get("kv_transfers", 0))
    nbytes = int(stats.get("kv_transfer_bytes", 0))
    seconds: float | None = None
    source = "none"
    found = {
        kind: float(v)
        for kind, labels, v in _HIST.findall(_get_text(url + "/metrics"))
        if f'engine_type="{mode}"' in labels
    }
    if "sum" in found:
        seconds, source = found["sum"], "/metrics smallm:kv_transfer_seconds"
    elif "kv_transfer_seconds" in stats:
        seconds, source = float(stats["kv_transfer_seconds"]), "scheduler_stats"
    return TransferSnapshot(transfers, nbytes, seconds, source)


def _wait_transfers(url: str, mode: str, at_least: int, timeout: float = 15) -> TransferSnapshot:
    """The server's counters once they count ``at_least`` transfers: scheduler stats reach
    the front end a few times a second."""
    deadline = time.monotonic() + timeout
    while True:
        snap = _transfer_snapshot(url, mode)
        if snap.transfers >= at_least or time.monotonic() > deadline:
            return snap
        time.sleep(0.25)


@dataclass
class TransferDelta:
    """What moved between two snapshots of one server."""

    rooms: int
    nbytes: int
    seconds: float | None
    source: str

    @classmethod
    def between(cls, a: TransferSnapshot, b: TransferSnapshot) -> TransferDelta:
        secs = None if a.seconds is None or b.seconds is None else b.seconds - a.seconds
        return cls(b.transfers - a.transfers, b.nbytes - a.nbytes, secs, b.source)


def measure_transfers(prefill: str, decode: str, run) -> tuple[object, dict]:
    """Run ``run()`` and return its result with the transfers it caused on both servers."""
    p0, d0 = _transfer_snapshot(prefill, "prefill"), _transfer_snapshot(decode, "decode")
    result, sent = run()
    p1 = _wait_transfers(prefill, "prefill", p0.transfers + sent)
    d1 = _wait_transfers(decode, "decode", d0.transfers + sent)
    return result, {
        "requests": sent,
        "prefill": TransferDelta.between(p0, p1),
        "decode": TransferDelta.between(d0, d1),
    }


# ---- the set-ups -----------------------------------------------------------------------------


def _warm(url: str, w: Workload) -> None:
    # Every kernel shape the run uses (long prefill chunks, batched decode), and for pd the
    # bootstrap lookup and the transfer engine's first connection; prompts unlike the run's.
    warm = Workload(**{**vars(w), "long_prompts": 2, "long_interval": 0.5, "lead": 0.5})
    warm.decode_output_len = min(w.decode_output_len, 32)
    asyncio.run(run_workload(url, warm, "warm"))


def run_colocated(w: Workload, server_flags: list[str]) -> tuple[RunResult, dict]:
    server = _server(server_flags)
    try:
        server.wait_ready()
        _warm(server.url, w)
        return asyncio.run(run_workload(server.url, w, "run")), {}
    finally:
        server.stop()


def run_pd(w: Workload, server_flags: list[str], backend: str, cores: list[int]) -> tuple:
    bootstrap = free_port()
    common = [*server_flags, "--torch-threads", "1", "--disaggregation-transfer-backend", backend]
    prefill_flags = ["--disaggregation-mode", "prefill"]
    prefill_flags += ["--disaggregation-bootstrap-port", str(bootstrap)]
    prefill = _server([*common, *prefill_flags], {cores[0]})
    decode = _server([*common, "--disaggregation-mode", "decode"], {cores[1]})
    router = None
    try:
        prefill.wait_ready()
        decode.wait_ready()
        router = _pd_router(prefill.url, bootstrap, decode.url)
        router.wait_ready(120)
        _warm(router.url, w)
        info = _get_json(prefill.url + "/server_info")

        def timed() -> tuple[RunResult, int]:
            res = asyncio.run(run_workload(router.url, w, "run"))
            return res, len(res.short) + len(res.long)

        def alone(tag: str) -> tuple[None, int]:
            # Long prompts one at a time on idle servers: each room's write undisturbed.
            rng = random.Random(f"alone-{tag}-{w.seed}")
            cfg = bs.BenchmarkConfig(base_url=router.url, backend="smallm", ignore_eos=True)

            async def send() -> None:
                async with aiohttp.ClientSession() as session:
                    for _ in range(3):
                        spec = _spec(rng, w.long_input_len[1], 1)
                        out = await bs.send_request(session, cfg, spec, None)
                        if not out.success:
                            raise RuntimeError(f"long prompt alone failed: {out.error}")

            asyncio.run(send())
            return None, 3

        # Alone before the run (the KV pools nearly fresh) and after it (the pools churned by
        # the run: free slots come back in the order requests and cache evictions release them).
        _, before = measure_transfers(prefill.url, decode.url, lambda: alone("before"))
        result, under_load = measure_transfers(prefill.url, decode.url, timed)
        _, after = measure_transfers(prefill.url, decode.url, lambda: alone("after"))
        return result, {"info": info, "before": before, "under load": under_load, "after": after}
    finally:
        if router is not None:
            router.stop()
        decode.stop()
        prefill.stop()


# ---- reporting -------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def summarize(res: RunResult) -> dict:
    ok_short = [o for o in res.short if o.success]
    ok_long = [o for o in res.long if o.success]
    itl = bs.LatencyStats.of([x for o in ok_short for x in o.itl])
    all_itl = [x for o in ok_short for x in o.itl]
    out_tokens = sum(o.output_tokens for o in ok_short + ok_long)
    errors = sorted({o.error or "?" for o in res.short + res.long if not o.success})
    return {
        "tok_s": out_tokens / res.duration if res.duration else 0.0,
        "itl": itl,
        "itl_max_ms": max(all_itl) * 1e3 if all_itl else None,
        "ttft_short": bs.LatencyStats.of([o.ttft for o in ok_short if o.ttft is not None]),
        "ttft_long": bs.LatencyStats.of([o.ttft for o in ok_long if o.ttft is not None]),
        "short": len(ok_short),
        "long": len(ok_long),
        "failed": len(res.short) + len(res.long) - len(ok_short) - len(ok_long),
        "errors": errors,
        "duration": res.duration,
        "long_tokens": sum(o.prompt_tokens for o in ok_long),
    }


def transfer_report(pd: dict, long_len: int) -> list[str]:
    per_token = int(pd["info"].get("kv_bytes_per_token") or 0)
    lines = [
        f"KV transfer ({per_token} B/token = layers x 2 x kv_heads x head_dim x dtype size); "
        "write = the prefill server's, wait = the decode server's transfer request to arrival:"
    ]
    for label, what in (
        (f"3 x {long_len}-token prompts alone, before the run", pd["before"]),
        ("the timed run", pd["under load"]),
        (f"3 x {long_len}-token prompts alone, after the run", pd["after"]),
    ):
        p: TransferDelta = what["prefill"]
        d: TransferDelta = what["decode"]
        if not per_token or not p.rooms:
            lines.append(f"  {label}: no transfer counted (no kv_bytes_per_token or counters)")
            continue
        tokens = p.nbytes / per_token
        line = (
            f"  {label}: {p.rooms} rooms ({what['requests']} requests), "
            f"{p.nbytes / 1e6:.1f} MB, {tokens:.0f} tokens"
        )
        if p.seconds is not None and p.seconds > 0:
            line += (
                f"; write {p.seconds / p.rooms * 1e3:.1f} ms/room, "
                f"{p.seconds / tokens * 1e6:.1f} us/token, {p.nbytes / p.seconds / 1e9:.2f} GB/s"
            )
        else:
            line += "; no write time on the prefill server (n/a)"
        if d.seconds is not None and d.rooms:
            line += f"; decode wait {d.seconds / d.rooms * 1e3:.0f} ms/room"
        lines.append(line + f" [{p.source}]")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoders", type=int, default=4, help="concurrent short-prompt streams")
    p.add_argument("--decode-input-len", type=int, default=32)
    p.add_argument("--decode-output-len", type=int, default=128)
    p.add_argument("--long-prompts", type=int, default=10)
    p.add_argument("--long-input-len", default="1000,1500", help="MIN,MAX prompt tokens")
    p.add_argument("--long-output-len", type=int, default=4)
    p.add_argument("--long-interval", type=float, default=1.5, help="seconds between arrivals")
    p.add_argument("--lead", type=float, default=2.0, help="seconds before the first long one")
    p.add_argument("--backend", choices=("mooncake", "fake"), default="mooncake")
    p.add_argument("--only", default="", help=f"comma-separated set-ups of {', '.join(SETUPS)}")
    p.add_argument(
        "--max-total-tokens",
        type=int,
        default=65536,
        help="KV slots per server; the default run never evicts from the radix cache (a "
        "churned pool scatters a request's slots and slows its transfer, see benchmarks.md)",
    )
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    lo, _, hi = args.long_input_len.partition(",")
    try:
        long_len = (int(lo), int(hi or lo))
    except ValueError:
        long_len = (0, 0)
    if not 1 <= long_len[0] <= long_len[1]:
        p.error("--long-input-len must be MIN,MAX with 1 <= MIN <= MAX")
    if args.decoders < 1 or args.long_prompts < 1:
        p.error("--decoders and --long-prompts must be >= 1")
    chosen = [s for s in SETUPS if not args.only or s in args.only.split(",")]
    if not chosen:
        p.error(f"--only: choose from {', '.join(SETUPS)}")
    cores = sorted(os.sched_getaffinity(0))
    if any(s.startswith("pd") for s in chosen) and len(cores) < 2:
        p.error(f"pd pins its servers to two cores; this process may use {cores}")
    backend = args.backend
    if backend == "mooncake":
        try:
            import mooncake.engine  # noqa: F401
        except ImportError as e:
            print(f"WARNING: mooncake.engine does not import ({e}); using the fake engine")
            backend = "fake"

    w = Workload(
        decoders=args.decoders,
        decode_input_len=args.decode_input_len,
        decode_output_len=args.decode_output_len,
        long_prompts=args.long_prompts,
        long_input_len=long_len,
        long_output_len=args.long_output_len,
        long_interval=args.long_interval,
        lead=args.lead,
        seed=args.seed,
    )
    flags = ["--max-total-tokens", str(args.max_total_tokens)]
    rows: dict[str, dict] = {}
    pd_infos: dict[str, dict] = {}
    for name in chosen:
        print(f"running {name} ...", flush=True)
        t0 = time.monotonic()
        if name == "colocated":
            res, _ = run_colocated(w, flags)
        else:
            extra = ["--disable-pd-contiguous-kv"] if name == "pd-scattered" else []
            res, pd_infos[name] = run_pd(w, [*flags, *extra], backend, cores[:2])
        rows[name] = summarize(res)
        print(f"  done in {time.monotonic() - t0:.0f} s", flush=True)

    print()
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"machine: {cpu_features().summary()}, {len(cores)} cores")
    print(
        f"workload: {w.decoders} decoder streams ({w.decode_input_len}-token prompts, "
        f"{w.decode_output_len} output tokens, back to back) + {w.long_prompts} long prompts "
        f"of {long_len[0]}-{long_len[1]} tokens ({w.long_output_len} output tokens) every "
        f"{w.long_interval:g} s from t={w.lead:g} s; streamed /generate, greedy, ignore_eos"
    )
    print(
        f"set-ups: colocated = one server, default threads; pd = prefill on core {cores[0]} + "
        f"decode on core {cores[1] if len(cores) > 1 else '?'} (--torch-threads 1 each), "
        f"{backend} transfer, sglang-router --pd-disaggregation"
    )
    print()
    print(
        "| set-up | output tok/s | ITL p50 ms | ITL p99 ms | ITL max ms | TTFT short p50 / p99 ms "
        "| TTFT long p50 / p99 ms | requests (short + long) | failed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['tok_s']:.1f} | {_ms(r['itl'].p50_ms)} | {_ms(r['itl'].p99_ms)} | "
            f"{_ms(r['itl_max_ms'])} | {_ms(r['ttft_short'].p50_ms)} / "
            f"{_ms(r['ttft_short'].p99_ms)} | {_ms(r['ttft_long'].p50_ms)} / "
            f"{_ms(r['ttft_long'].p99_ms)} | {r['short']} + {r['long']} | {r['failed']} |"
        )
    for name, r in rows.items():
        for err in r["errors"]:
            print(f"{name} error: {err}")
    for name, info in pd_infos.items():
        print()
        print(f"{name}:")
        print("\n".join(transfer_report(info, long_len[1])))


if __name__ == "__main__":
    main()
