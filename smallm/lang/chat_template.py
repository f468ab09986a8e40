"""Role prefixes and suffixes, derived from a tokenizer's Jinja chat template.

A program builds chat prompts incrementally (``s += user(...)``), so it needs each role as a
fixed ``prefix + content + suffix``. We get those strings by rendering probe conversations with
a sentinel content and cutting around the sentinel, so the exact template of the model (not a
hand-written copy) decides the prompt text.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

logger = logging.getLogger(__name__)

_SENTINEL = "\u2063SMALLM_SENTINEL\u2063"
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Fixed strings around each role's content.

    ``default_system_prompt`` is inserted before the first non-system turn when the template
    itself would do so (SmolLM2 and Qwen templates do); ``stop_str`` are added to every gen's
    stop strings so an assistant gen ends at the end of its turn.
    """

    name: str
    role_prefix_and_suffix: dict[str, tuple[str, str]]
    default_system_prompt: str | None = None
    stop_str: tuple[str, ...] = ()

    def get_prefix_and_suffix(
        self, role: str, messages: list[dict] | None = None
    ) -> tuple[str, str]:
        """The (prefix, suffix) around a ``role`` turn."""
        try:
            return self.role_prefix_and_suffix[role]
        except KeyError:
            raise ValueError(f"chat template {self.name!r} has no role {role!r}") from None

    @property
    def generation_prompt(self) -> str:
        """What opens an assistant turn the model is to write."""
        return self.role_prefix_and_suffix["assistant"][0]


CHATML = ChatTemplate(
    name="chatml",
    role_prefix_and_suffix={r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ROLES},
    stop_str=("<|im_end|>",),
)

# Templates with no role markup (for base models): content is appended verbatim.
PLAIN = ChatTemplate(name="plain", role_prefix_and_suffix={r: ("", "") for r in ROLES})


def from_hf_tokenizer(tokenizer: Any, name: str | None = None) -> ChatTemplate:
    """Derive a :class:`ChatTemplate` from a HF tokenizer's ``chat_template``; ChatML when the
    tokenizer has none or its template cannot be probed (say so in the log)."""
    if not getattr(tokenizer, "chat_template", None):
        return CHATML
    try:
        return _probe(tokenizer, name or getattr(tokenizer, "name_or_path", "hf"))
    except Exception as e:  # any template failure falls back, with a warning
        logger.warning("could not derive role strings from the chat template (%s); using ChatML", e)
        return CHATML


def _probe(tokenizer: Any, name: str) -> ChatTemplate:
    def render(roles: list[str], gen_prompt: bool = False) -> str:
        msgs = [{"role": r, "content": _SENTINEL} for r in roles]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)

    roles: dict[str, tuple[str, str]] = {}
    try:
        sys_only = render(["system"])
        sys_prefix, sys_suffix = sys_only.split(_SENTINEL)
        roles["system"] = (sys_prefix, sys_suffix)
        head = ["system"]
    except Exception:  # some templates reject a system role
        sys_only, head = "", []
    # Each later turn is what its rendering adds to the conversation before it.
    su = render([*head, "user"])
    if not su.startswith(sys_only):
        raise ValueError("rendering is not incremental")
    roles["user"] = tuple(su[len(sys_only) :].split(_SENTINEL))  # type: ignore[assignment]
    sua = render([*head, "user", "assistant"])
    if not sua.startswith(su):
        raise ValueError("rendering is not incremental")
    a_prefix, a_suffix = sua[len(su) :].split(_SENTINEL)
    # The generation prompt is the authoritative assistant prefix (they normally agree).
    gen = render([*head, "user"], gen_prompt=True)
    if gen.startswith(su) and len(gen) > len(su):
        a_prefix = gen[len(su) :]
    roles["assistant"] = (a_prefix, a_suffix)
    if "system" not in roles:
        roles["system"] = roles["user"]

    # A default system message appears when a conversation starts with a user turn.
    default_system = None
    u_only = render(["user"])
    u_prefix, u_suffix = roles["user"]
    lead = u_only[: len(u_only) - len(u_prefix + _SENTINEL + u_suffix)]
    sys_prefix, sys_suffix = roles["system"]
    if lead and "system" in head and lead.startswith(sys_prefix) and lead.endswith(sys_suffix):
        default_system = lead[len(sys_prefix) : len(lead) - len(sys_suffix)]
    stop = a_suffix.strip()
    return ChatTemplate(
        name=name,
        role_prefix_and_suffix=roles,
        default_system_prompt=default_system or None,
        stop_str=(stop,) if stop else (),
    )


def load(chat_template: Any, tokenizer_path: str | None = None) -> ChatTemplate:
    """Resolve a backend's ``chat_template`` argument: a :class:`ChatTemplate`, the names
    "chatml" / "plain", a Jinja string (rendered with the tokenizer's special tokens), or None
    (derive from the tokenizer at ``tokenizer_path``, else ChatML)."""
    if isinstance(chat_template, ChatTemplate):
        return chat_template
    if chat_template in ("chatml", "default"):
        return CHATML
    if chat_template == "plain":
        return PLAIN
    tokenizer = None
    if tokenizer_path:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except Exception as e:
            logger.warning("cannot load tokenizer %s (%s); using ChatML", tokenizer_path, e)
    if isinstance(chat_template, str):
        if tokenizer is None:
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast(tokenizer_object=_empty_tokenizer())
        tokenizer.chat_template = chat_template
        return from_hf_tokenizer(tokenizer, name="custom")
    return from_hf_tokenizer(tokenizer) if tokenizer is not None else CHATML


def _empty_tokenizer() -> Any:
    # A jinja-only override needs some tokenizer object to render with.
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
