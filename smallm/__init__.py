"""smallm: a structured-generation language and the LLM serving runtime that executes it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The language's names (SGLang's), resolved lazily from smallm.lang so `import smallm as sgl`
# runs SGLang-style programs without importing the runtime.
_LANG_NAMES = (
    "Backend", "ChatTemplate", "EngineBackend", "OpenAI", "ProgramState", "Runtime", "RuntimeEndpoint",
    "SglFunction",
    "assistant", "assistant_begin", "assistant_end", "function", "gen", "gen_int", "gen_string",
    "get_default_backend", "greedy_token_selection", "select", "set_default_backend", "system",
    "system_begin", "system_end", "token_length_normalized",
    "unconditional_likelihood_normalized", "user", "user_begin", "user_end",
)  # fmt: skip

__all__ = ["Engine", "__version__", *_LANG_NAMES]

if TYPE_CHECKING:
    from smallm.runtime.engine import Engine


def __getattr__(name: str) -> Any:
    # Lazy, so `import smallm` (the language) does not load torch until a runtime is used, and
    # entry points can set the CPU thread policy before torch starts.
    if name == "Engine":
        from smallm.runtime.cpu_threads import prefer_passive_openmp

        prefer_passive_openmp()
        from smallm.runtime.engine import Engine

        return Engine
    if name in _LANG_NAMES:
        import smallm.lang

        return getattr(smallm.lang, name)
    raise AttributeError(f"module 'smallm' has no attribute {name!r}")
