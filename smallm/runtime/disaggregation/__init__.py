"""Prefill/decode disaggregation: the KV transfer engines and the prefill side's bootstrap service.

``transfer.py`` moves bytes between registered memory of two processes (Mooncake over TCP, or a
fake for plumbing tests); ``kv_plan.py`` says which bytes: a request's KV slots on the prefill
side to its slots on the decode side (coalesced ranges), and the first-token record;
``bootstrap.py`` is the HTTP service through which a decode server finds a prefill server's ranks
(SGLang's ``/route`` protocol). Nothing here imports torch; the scheduler side is
``smallm/runtime/scheduler/disagg_prefill.py`` and ``disagg_decode.py``.
"""
