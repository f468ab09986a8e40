"""KV transfer throughput between two processes on this machine (issue 15).

A receiver process registers a zeroed buffer; this process registers a random one and writes
it over in pages, each page to a shuffled destination (as KV pages land in scattered decode
slots), as one synchronous batch. Reports MB/s (10^6 bytes/s) per backend, best and median of
the repeats, after checking the receiver's bytes by hash.

    python benchmarks/bench_transfer.py [--backends mooncake,fake] [--mib 64] [--page-kib 64]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import statistics
import time

import torch

from smallm.runtime.cpu_features import cpu_features
from smallm.runtime.disaggregation.transfer import (
    TransferBackendUnavailable,
    create_transfer_engine,
)


def receiver(conn, backend: str, nbytes: int) -> None:
    engine = create_transfer_engine(backend, "127.0.0.1", timeout=120)
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    engine.register(buf.data_ptr(), nbytes)
    conn.send((engine.session_id, buf.data_ptr()))
    while conn.recv() == "hash":
        conn.send(hashlib.sha256(buf.numpy().tobytes()).hexdigest())
    engine.close()


def run(backend: str, nbytes: int, page: int, repeats: int) -> None:
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(child, backend, nbytes), daemon=True)
    proc.start()
    try:
        engine = create_transfer_engine(backend, "127.0.0.1", timeout=120)
    except TransferBackendUnavailable as e:
        print(f"{backend}: unavailable ({e})")
        proc.kill()
        return
    session, dst_base = conn.recv()
    src = torch.randint(
        0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    engine.register(src.data_ptr(), nbytes)
    pages = nbytes // page
    order = torch.randperm(pages, generator=torch.Generator().manual_seed(1)).tolist()
    src_ptrs = [src.data_ptr() + i * page for i in range(pages)]
    dst_ptrs = [dst_base + order[i] * page for i in range(pages)]
    lengths = [page] * pages
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.write(session, src_ptrs, dst_ptrs, lengths)
        seconds.append(time.perf_counter() - t)
    expected = torch.empty_like(src)
    expected.view(pages, page)[torch.tensor(order)] = src.view(pages, page)
    conn.send("hash")
    ok = conn.recv() == hashlib.sha256(expected.numpy().tobytes()).hexdigest()
    conn.send("exit")
    proc.join(30)
    engine.close()
    best, median = min(seconds), statistics.median(seconds)
    print(
        f"{backend:>8}: {nbytes / 2**20:.0f} MiB in {pages} pages of {page // 1024} KiB: "
        f"best {nbytes / best / 1e6:,.0f} MB/s ({best * 1e3:.1f} ms), median "
        f"{nbytes / median / 1e6:,.0f} MB/s over {repeats} writes; bytes {'OK' if ok else 'WRONG'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="mooncake,fake")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--page-kib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {cpu_features().summary()}; torch {torch.__version__}")
    try:
        from importlib.metadata import version

        print(f"mooncake-transfer-engine-non-cuda {version('mooncake-transfer-engine-non-cuda')}")
    except Exception:
        pass
    for backend in args.backends.split(","):
        run(backend, args.mib * 2**20, args.page_kib * 1024, args.repeats)


if __name__ == "__main__":
    main()
