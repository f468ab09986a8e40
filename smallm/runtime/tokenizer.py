"""Loading a model's tokenizer and rendering chat messages with its template."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Any:
    """The HF tokenizer in ``path``; ``chat_template`` (a Jinja string or a file) overrides its
    own template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if chat_template is not None:
        p = Path(chat_template)
        tok.chat_template = p.read_text() if p.is_file() else chat_template
    return tok


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt=True) -> str:
    """The prompt text for ``messages`` under the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model's tokenizer has no chat template; pass --chat-template or send a raw prompt"
        )
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def eos_token_ids(tokenizer: Any, model_eos: tuple[int, ...] = ()) -> list[int]:
    """Every id that ends generation: the model config's and the tokenizer's."""
    ids = set(model_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)
