"""The detokenizer process: token ids -> text, off the scheduler's and the HTTP loop's cores.

For each scheduler step it receives one `BatchTokenOutput` and sends one `BatchTextOutput`:
streaming requests get their cumulative text (never half a multi-byte character, never text a
stop string may still claim), finished requests their final text with stop strings trimmed.
Other messages (stats, flush results) pass through unchanged.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from smallm.runtime.ipc import IpcEndpoints, die_with_parent, parent_alive, setup_worker_logging

logger = logging.getLogger(__name__)


class Detokenizer:
    """Per-request text state, keyed by rid; dropped when the request finishes."""

    def __init__(self, tokenizer: Any):
        from smallm.runtime.detokenize import TextAssembler

        self._assembler = TextAssembler
        self.tokenizer = tokenizer
        self.states: dict[str, Any] = {}

    def process(self, batch: Any) -> Any:
        from smallm.runtime.messages import BatchTextOutput, TextOutput

        out = []
        for o in batch.outputs:
            state = self.states.get(o.rid)
            if state is None:
                state = self._assembler(self.tokenizer, o.params, o.stream)
                self.states[o.rid] = state
            state.push(o.new_token_ids)
            if o.finished:
                del self.states[o.rid]
                text = state.final_text(o.finish_reason)
            elif state.stream:
                text = state.stream_text()
            else:
                text = None
            out.append(TextOutput(o, text))
        return BatchTextOutput(out)


def run_detokenizer_process(args: Any, endpoints: IpcEndpoints, ready_pipe: Any, parent_pid: int):
    die_with_parent()
    setup_worker_logging(args.log_level, "detokenizer")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import zmq

    from smallm.runtime.messages import BatchTokenOutput, ShutdownRequest
    from smallm.runtime.model.loader import resolve_model_path
    from smallm.runtime.tokenizer import load_tokenizer

    try:
        path = args.tokenizer_path or resolve_model_path(args.model_path)
        detok = Detokenizer(load_tokenizer(path))
    except Exception as e:
        logger.exception("the detokenizer failed to start")
        ready_pipe.send({"ok": False, "error": f"{type(e).__name__}: {e}"})
        sys.exit(1)
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.bind(endpoints.detokenizer_input)
    send = ctx.socket(zmq.PUSH)
    send.connect(endpoints.tokenizer_input)
    ready_pipe.send({"ok": True})
    ready_pipe.close()
    shutdowns = 0
    try:
        while True:
            if not recv.poll(1000):
                if not parent_alive(parent_pid):
                    return
                continue
            msg = recv.recv_pyobj()
            if isinstance(msg, ShutdownRequest):
                shutdowns += 1
                if shutdowns >= msg.replicas:
                    return
                continue
            send.send_pyobj(detok.process(msg) if isinstance(msg, BatchTokenOutput) else msg)
    except Exception:
        logger.exception("the detokenizer loop failed")
        sys.exit(1)
    finally:
        recv.close(linger=0)
        send.close(linger=0)
        ctx.term()
