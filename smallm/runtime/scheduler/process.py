"""The scheduler process: owns the model and all KV memory; steps while there is work.

Reads requests from the tokenizer manager (ZMQ PULL), runs ``Scheduler.step`` in a loop and
pushes each step's outputs, as one message, to the detokenizer. A few times a second it also
sends `SchedulerStats` (the load gauges). It never waits on a socket while it has work.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Any

from smallm.runtime.cpu_threads import pin_replica, prefer_passive_openmp
from smallm.runtime.ipc import IpcEndpoints, die_with_parent, parent_alive, setup_worker_logging

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.5


def run_scheduler_process(
    args: Any, endpoints: IpcEndpoints, ready_pipe: Any, parent_pid: int, dp_rank: int = 0
):
    """Process entry point of replica ``dp_rank``. Sends ``{"ok": True, ...model info}`` or
    ``{"ok": False, "error"}`` through ``ready_pipe`` once loaded; exits non-zero if the loop
    fails."""
    die_with_parent()
    if args.matmul_backend == "openblas":
        prefer_passive_openmp()
    dp_size = getattr(args, "dp_size", 1)
    if dp_size > 1:
        # Replicas share the machine: each gets its slice of the cores and of the memory
        # budget (--max-total-tokens, when given, is per replica).
        args = dataclasses.replace(
            args,
            torch_threads=pin_replica(dp_rank, dp_size, args.torch_threads),
            mem_fraction_static=args.mem_fraction_static / dp_size,
        )
    setup_worker_logging(args.log_level, "scheduler" if dp_size == 1 else f"scheduler-{dp_rank}")
    # SIGINT goes to the whole process group on Ctrl-C; the front end decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        worker = _SchedulerWorker(args, endpoints, dp_rank)
    except Exception as e:
        logger.exception("the scheduler failed to start")
        ready_pipe.send({"ok": False, "error": f"{type(e).__name__}: {e}"})
        sys.exit(1)
    ready_pipe.send({"ok": True, **worker.info()})
    ready_pipe.close()
    try:
        worker.loop(parent_pid)
    except Exception:
        logger.exception("the scheduler loop failed")
        sys.exit(1)
    finally:
        worker.close()


class _SchedulerWorker:
    def __init__(self, args: Any, endpoints: IpcEndpoints, dp_rank: int = 0):
        import zmq

        from smallm.runtime.model.loader import resolve_model_path
        from smallm.runtime.model.model_runner import ModelRunner
        from smallm.runtime.scheduler.scheduler import Scheduler
        from smallm.runtime.tokenizer import eos_token_ids, load_tokenizer

        self.model_path = resolve_model_path(args.model_path)
        tokenizer = load_tokenizer(args.tokenizer_path or self.model_path, args.chat_template)
        self.runner = ModelRunner(args.runner_config(self.model_path))
        eos = eos_token_ids(tokenizer, self.runner.model_config.eos_token_ids)
        self.scheduler = Scheduler(self.runner, args.scheduler_config(), eos, tokenizer)
        if args.disaggregation_mode == "prefill":
            from smallm.runtime.scheduler.disagg_prefill import PrefillManager

            self.scheduler.pd = PrefillManager(self.scheduler, args, dp_rank)
        elif args.disaggregation_mode == "decode":
            from smallm.runtime.scheduler.disagg_decode import DecodeManager

            self.scheduler.pd = DecodeManager(self.scheduler, args)
        # KV-cache events (None when off): this replica's publisher, fed by the radix cache.
        from smallm.runtime.server.kv_events import create_kv_event_publisher

        self.kv_events = create_kv_event_publisher(args, dp_rank)
        if self.kv_events is not None:
            self.scheduler.cache.set_event_listener(self.kv_events.listener)
        self.ctx = zmq.Context()
        self.recv = self.ctx.socket(zmq.PULL)
        self.recv.bind(endpoints.scheduler_input_of(dp_rank))
        self.dp_rank = dp_rank
        self.send = self.ctx.socket(zmq.PUSH)
        self.send.connect(endpoints.detokenizer_input)
        self._generated = 0

    def info(self) -> dict[str, Any]:
        cfg = self.runner.model_config
        return {
            "model_path": str(self.model_path),
            "vocab_size": cfg.vocab_size,
            "context_length": self.runner.context_length,
            "max_total_tokens": self.runner.kv_pool.capacity,
            "max_running_requests": self.scheduler.max_running,
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "attention_backend": type(self.runner.attn_backend).__name__,
            "pid": os.getpid(),
            "dp_rank": self.dp_rank,
            "torch_threads": self.runner.config.torch_threads,
            # KV bytes one token occupies (layers x 2 x kv_heads x head_dim x item size): what
            # a disaggregated server moves per prompt token.
            "kv_bytes_per_token": self.runner.kv_pool.nbytes // (self.runner.kv_pool.capacity + 1),
        }

    def loop(self, parent_pid: int) -> None:
        import zmq

        from smallm.runtime.messages import BatchTokenOutput, FlushCacheResult, ShutdownRequest

        poller = zmq.Poller()
        poller.register(self.recv, zmq.POLLIN)
        if self.scheduler.pd is not None:
            for sock in self.scheduler.pd.wake_sockets:  # a prefill server's decode-side messages
                poller.register(sock, zmq.POLLIN)
        last_stats = last_parent_check = time.monotonic()
        generated_at_last_stats = 0
        while True:
            busy = self.scheduler.has_work()
            # Block only when idle (or only waiting on background work: a grammar compiling, a KV
            # transfer on its thread or peer);
            # while busy, just take what has arrived.
            timeout = 100 if not busy else 5 if self.scheduler.waiting_only_for_background else 0
            if dict(poller.poll(timeout)).get(self.recv):
                while True:
                    try:
                        msg = self.recv.recv_pyobj(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if isinstance(msg, ShutdownRequest):
                        logger.info("shutting down")
                        self.send.send_pyobj(msg)  # the detokenizer leaves after our last output
                        return
                    self.scheduler.submit(msg)
            if self.scheduler.has_work():
                outputs = self.scheduler.step()
                tokens = [o for o in outputs if not isinstance(o, FlushCacheResult)]
                for o in outputs:
                    if isinstance(o, FlushCacheResult):
                        self.send.send_pyobj(o)
                if tokens:
                    self._generated += sum(len(o.new_token_ids) for o in tokens)
                    self.send.send_pyobj(BatchTokenOutput(tokens))
            now = time.monotonic()
            # Also right when the last request ends, so idle gauges are exact at once.
            went_idle = busy and not self.scheduler.has_work()
            if went_idle or now - last_stats >= STATS_INTERVAL_S:
                rate = (self._generated - generated_at_last_stats) / max(now - last_stats, 1e-3)
                stats = self.scheduler.stats(gen_throughput=rate)
                stats.dp_rank = self.dp_rank
                self.send.send_pyobj(stats)
                last_stats, generated_at_last_stats = now, self._generated
            if now - last_parent_check >= 1.0:
                last_parent_check = now
                if not parent_alive(parent_pid):
                    logger.error("the server process is gone; exiting")
                    return

    def close(self) -> None:
        self.scheduler.shutdown()
        if self.scheduler.pd is not None:
            self.scheduler.pd.close()
        if self.kv_events is not None:
            self.kv_events.close()
        self.recv.close(linger=0)
        self.send.close(linger=0)
        self.ctx.term()
