"""smallm: a structured-generation language and the LLM serving runtime that executes it."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
