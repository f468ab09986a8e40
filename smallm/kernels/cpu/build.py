"""Build (once per CPU and source) and load the fused CPU ops in ``fused_ops.cpp``.

The library is compiled with ``-march=native`` on the machine that runs it, so it is keyed by the
source, the torch version and the CPU's model and ISA flags: a cache shared between an AVX2 and
an AMX machine never hands one the other's binary. Builds go to ``<smallm cache>/ext/<key>``;
torch's build lock there lets concurrent processes share one build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from smallm.runtime.cpu_features import cpu_features

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("fused_ops.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def build_key() -> str:
    """What the compiled library depends on, hashed."""
    cpu = cpu_features()
    parts = [_SOURCE.read_bytes(), torch.__version__.encode(), " ".join(_FLAGS).encode()]
    parts += [cpu.model_name.encode(), " ".join(sorted(cpu.flags)).encode()]
    return hashlib.sha1(b"\0".join(parts)).hexdigest()[:12]


def load_fused_ops() -> ModuleType | None:
    """The compiled ops module, building it on first use; None (with a warning) when no C++
    compiler can build it, so callers fall back to plain torch ops."""
    key = build_key()
    with _lock:
        if key not in _loaded:
            _loaded[key] = _build(key)
        return _loaded[key]


def _build(key: str) -> ModuleType | None:
    from torch.utils import cpp_extension

    from smallm.runtime.model.default_model import cache_dir

    build_dir = cache_dir() / "ext" / f"fused_ops-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"smallm_fused_ops_{key}"
    fresh = not any(build_dir.glob("*.so"))
    started = time.monotonic()
    if fresh:
        logger.info("building smallm's fused CPU ops for this CPU (once, ~30 s) in %s", build_dir)
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            build_directory=str(build_dir),
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=os.environ.get("SMALLM_BUILD_VERBOSE") == "1",
        )
    except Exception as error:  # no compiler, missing headers, ...: run unfused
        logger.warning("fused CPU ops unavailable (%s); using plain torch ops", error)
        return None
    if fresh:
        logger.info("fused CPU ops built in %.1f s", time.monotonic() - started)
    return module
