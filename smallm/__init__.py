"""smallm: a structured-generation language and the LLM serving runtime that executes it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The language's names (SGLang's) come from smallm.lang, so `import smallm as sgl` runs
# SGLang-style programs; smallm.lang does not import torch.
from smallm.lang import *  # noqa: F403
from smallm.lang import __all__ as _LANG_NAMES

__all__ = ["Engine", "__version__", *_LANG_NAMES]

if TYPE_CHECKING:
    from smallm.runtime.engine import Engine


def __getattr__(name: str) -> Any:
    # Lazy, so `import smallm` (the language) does not load torch until a runtime is used.
    if name == "Engine":
        from smallm.runtime.engine import Engine

        return Engine
    raise AttributeError(f"module 'smallm' has no attribute {name!r}")
