"""Start the process trio and serve HTTP until SIGTERM/SIGINT or a worker dies.

    HTTP process (this one): aiohttp on uvloop + TokenizerManager (+ the coordinator)
    Scheduler process(es): model, KV memory, radix cache    (spawned; --dp-size of them)
    Detokenizer process: token ids -> text                  (spawned)

With ``--dp-size N`` there are N scheduler replicas (``scheduler-0`` ...), each with its own
model, KV pool and radix cache on its own slice of the cores; the front end's coordinator
places every request on one of them and they all push to the one detokenizer. A replica that
dies takes the server down (exit 1) unless ``--dp-tolerate-failure``: then only its requests
fail (503) and the others serve on.

Workers are spawned (not forked: torch and forking do not mix) and talk over ZMQ ``ipc://``
sockets in a private temp directory that is removed at exit. Exit codes: 0 after a clean
shutdown, 1 if a worker failed to start or died.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from typing import Any

from smallm.runtime.config import ServerArgs
from smallm.runtime.ipc import IpcEndpoints

logger = logging.getLogger("smallm.server")

WORKER_START_TIMEOUT_S = 600.0
WATCHDOG_INTERVAL_S = 0.25


class _Worker:
    def __init__(self, name: str, process: Any, ready: Any):
        self.name = name
        self.process = process
        self.ready = ready

    def stop(self, timeout: float) -> None:
        p = self.process
        p.join(timeout)
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def launch_server(args: ServerArgs) -> int:
    """Run a server in this process (and its two workers); returns the exit code."""
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s [http] %(levelname)s %(name)s: %(message)s",
    )
    from smallm.runtime.server.http.log_filters import install_http_log_filters

    install_http_log_filters()
    from smallm.runtime.model.loader import resolve_model_path

    # Resolve once here (converting the default GGUF if needed) so the workers get a path.
    try:
        model_path = str(resolve_model_path(args.model_path))
    except Exception as e:
        logger.error("cannot load the model: %s", e)
        return 1
    args = dataclasses.replace(args, model_path=model_path)
    ipc_dir = tempfile.mkdtemp(prefix="smallm-ipc-")  # mode 0700
    workers: list[_Worker] = []
    code = 1
    bootstrap = None
    try:
        if args.disaggregation_mode == "prefill":
            # The bootstrap service runs here, once per server; every replica registers its
            # rank with it (dp_group = its dp_rank) when it starts.
            from smallm.runtime.disaggregation.bootstrap import BootstrapError, BootstrapServer

            bootstrap = BootstrapServer(args.host, args.disaggregation_bootstrap_port)
            try:
                bootstrap.start_in_thread()
            except BootstrapError as e:
                logger.error(
                    "cannot serve the bootstrap service on %s:%d (--disaggregation-bootstrap-port)"
                    ": %s",
                    args.host,
                    args.disaggregation_bootstrap_port,
                    e.__cause__ or e,
                )
                return 1
        endpoints = IpcEndpoints.in_dir(ipc_dir)
        workers = _start_workers(args, endpoints)
        infos = _wait_ready(workers)
        if infos is None:
            return code
        code = _run_http(args, endpoints, workers, infos[_scheduler_name(0, args.dp_size)])
        return code
    finally:
        # After a clean shutdown the workers are leaving on their own; after a failure the
        # survivors wait for work that will never come: don't wait long for them.
        for w in workers:
            w.stop(timeout=10 if code == 0 else 1)
        if bootstrap is not None:
            bootstrap.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)


def _start_workers(args: ServerArgs, endpoints: IpcEndpoints) -> list[_Worker]:
    from smallm.runtime.scheduler.process import run_scheduler_process
    from smallm.runtime.server.detokenizer import run_detokenizer_process

    ctx = mp.get_context("spawn")
    workers = []
    targets: list[tuple[str, Any, tuple]] = [
        (_scheduler_name(r, args.dp_size), run_scheduler_process, (r,)) for r in range(args.dp_size)
    ]
    targets.append(("detokenizer", run_detokenizer_process, ()))
    for name, target, extra in targets:
        reader, writer = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=target,
            args=(args, endpoints, writer, os.getpid(), *extra),
            name=f"smallm-{name}",
        )
        p.start()
        writer.close()
        workers.append(_Worker(name, p, reader))
    return workers


def _scheduler_name(rank: int, dp_size: int) -> str:
    return "scheduler" if dp_size == 1 else f"scheduler-{rank}"


def _replica_rank(name: str) -> int | None:
    """The dp_rank of a scheduler worker's name (None for other workers)."""
    if name == "scheduler":
        return 0
    if name.startswith("scheduler-"):
        return int(name.removeprefix("scheduler-"))
    return None


def _wait_ready(workers: list[_Worker]) -> dict[str, dict] | None:
    infos: dict[str, dict] = {}
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while len(infos) < len(workers):
        for w in workers:
            if w.name in infos:
                continue
            if w.ready.poll(0.1):
                try:
                    msg = w.ready.recv()
                except EOFError:
                    msg = {"ok": False, "error": "exited before it was ready"}
                if not msg.get("ok"):
                    logger.error("the %s process failed to start: %s", w.name, msg.get("error"))
                    return None
                infos[w.name] = msg
            elif not w.process.is_alive():
                logger.error(
                    "the %s process exited during start-up (code %s)",
                    w.name,
                    w.process.exitcode,
                )
                return None
        if time.monotonic() > deadline:
            logger.error("the workers did not start within %.0fs", WORKER_START_TIMEOUT_S)
            return None
    return infos


def _run_http(args: ServerArgs, endpoints: IpcEndpoints, workers: list[_Worker], info: dict):
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is a dependency; this only keeps odd platforms working
        runner = asyncio.run
    return runner(_serve(args, endpoints, workers, info))


async def _serve(args: ServerArgs, endpoints: IpcEndpoints, workers: list[_Worker], info: dict):
    from aiohttp import web

    from smallm.runtime.metrics import ServerMetrics
    from smallm.runtime.server.coordinator import DataParallelCoordinator
    from smallm.runtime.server.http.app import build_app
    from smallm.runtime.server.http.context import ServerContext
    from smallm.runtime.server.tokenizer_manager import ModelInfo, TokenizerManager
    from smallm.runtime.tokenizer import load_tokenizer

    tokenizer_path = args.tokenizer_path or args.model_path
    tokenizer = load_tokenizer(tokenizer_path, args.chat_template)
    model_info = ModelInfo(
        model_path=args.model_path,
        tokenizer_path=str(tokenizer_path),
        served_model_name=args.served_model_name or args.model_path,
        vocab_size=info["vocab_size"],
        context_length=info["context_length"],
        max_total_tokens=info["max_total_tokens"],
        max_running_requests=info["max_running_requests"],
        extra={
            k: info[k] for k in ("dtype", "attention_backend", "kv_bytes_per_token") if k in info
        },
    )
    metrics = (
        ServerMetrics.for_server(args, model_info.served_model_name, model_info.max_total_tokens)
        if args.enable_metrics
        else None
    )
    coordinator = DataParallelCoordinator(
        args.dp_size,
        args.load_balance_method,
        capacity_tokens=info["max_total_tokens"],
        route_by_room=args.disaggregation_mode == "prefill",
    )
    tm = TokenizerManager(
        endpoints, model_info, tokenizer, metrics, args.log_requests, coordinator=coordinator
    )
    await tm.start()
    ctx = ServerContext(args, model_info, tm, metrics)
    ctx.worker_pids = {w.name: w.process.pid for w in workers}
    app = build_app(ctx)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as e:
        logger.error("cannot listen on %s:%s: %s", args.host, args.port, e)
        await tm.shutdown_workers()
        await runner.cleanup()
        await tm.close()
        return 1

    stop = asyncio.Event()
    exit_code = 0
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def watchdog() -> None:
        nonlocal exit_code
        lost: set[str] = set()
        while not stop.is_set():
            for w in workers:
                if w.name in lost or w.process.is_alive():
                    continue
                message = f"the {w.name} process exited (code {w.process.exitcode})"
                rank = _replica_rank(w.name)
                if rank is not None and args.dp_tolerate_failure:
                    lost.add(w.name)
                    tm.fail_replica(rank, message)
                    if tm.coordinator.live_ranks:
                        logger.error(
                            "%s; its requests failed, serving on replicas %s",
                            message,
                            tm.coordinator.live_ranks,
                        )
                        continue
                logger.error("%s; failing pending requests and exiting", message)
                tm.fail_all(message)
                exit_code = 1
                stop.set()
                return
            await asyncio.sleep(WATCHDOG_INTERVAL_S)

    dog = asyncio.create_task(watchdog())
    logger.info(
        "smallm is ready: serving %s at %s (pid %d)",
        model_info.served_model_name,
        args.url,
        os.getpid(),
    )
    print(f"smallm server ready at {args.url}", flush=True)
    await stop.wait()

    ctx.draining = True
    if exit_code == 0:
        logger.info(
            "shutting down: draining %d requests (up to %.0fs)",
            tm.num_pending,
            args.shutdown_timeout,
        )
        deadline = time.monotonic() + args.shutdown_timeout
        while tm.num_pending and time.monotonic() < deadline and not tm.unavailable:
            await asyncio.sleep(0.05)
        if tm.num_pending:
            logger.warning("aborting %d requests still running", tm.num_pending)
            tm.abort_all()
            await asyncio.sleep(0.5)
            tm.fail_all("the server is shutting down")
        await tm.shutdown_workers()
    else:
        await asyncio.sleep(1.0)  # let clients see the 503s and /health's unhealthy answer
    dog.cancel()
    await asyncio.sleep(0.05)  # let handlers flush their last bytes
    await runner.cleanup()
    await tm.close()
    logger.info("stopped (exit code %d)", exit_code)
    return exit_code
