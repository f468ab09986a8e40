"""The backend interface, and the ``generate`` / ``select`` logic shared by every backend that
speaks the native ``/generate`` protocol (in-process or over HTTP)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from smallm.lang.chat_template import ChatTemplate
from smallm.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from smallm.lang.sampling import split_request


class Backend(ABC):
    """Runs generations for programs. Subclasses provide one native call (``_call``) and its
    streaming form; generation, selection and chat template handling are built on those."""

    @property
    @abstractmethod
    def chat_template(self) -> ChatTemplate:
        """Role strings for this backend's model."""

    @abstractmethod
    def _call(self, payload: dict[str, Any]) -> dict | list[dict]:
        """One native ``/generate`` request (``text`` or ``input_ids``, ``sampling_params``,
        logprob options) -> its native result dict, or a list for a list input."""

    @abstractmethod
    def _call_stream(self, payload: dict[str, Any]) -> Iterator[dict]:
        """A streaming ``/generate`` for one prompt: result dicts with cumulative ``text``."""

    @abstractmethod
    def flush_cache(self) -> bool:
        """Empty the prefix cache; True on success."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release resources this backend owns (nothing by default)."""

    # ---- built on _call -------------------------------------------------------------------

    def generate(self, text: str, params: dict[str, Any]) -> tuple[str, dict]:
        """Complete ``text`` with resolved sampling ``params``: (completion, meta_info)."""
        sampling, request = split_request(params)
        out = self._call({"text": text, "sampling_params": sampling, **request})
        assert isinstance(out, dict)
        return out["text"], out["meta_info"]

    def generate_stream(self, text: str, params: dict[str, Any]) -> Iterator[tuple[str, dict]]:
        """Like :meth:`generate`, yielding (new text piece, meta_info) as tokens arrive."""
        sampling, request = split_request(params)
        sent = 0
        for chunk in self._call_stream({"text": text, "sampling_params": sampling, **request}):
            piece = chunk["text"][sent:]
            sent = len(chunk["text"])
            if piece or chunk["meta_info"].get("finish_reason") is not None:
                yield piece, chunk["meta_info"]

    def select(
        self,
        text: str,
        choices: list[str],
        temperature: float,
        method: ChoicesSamplingMethod,
    ) -> ChoicesDecision:
        """Score ``text + choice`` for each choice and let ``method`` decide.

        Same requests as SGLang's RuntimeEndpoint.select, so servers see identical traffic: one
        prefill-only call on the prefix (warms the cache, gives its token count), then one
        batched call with prompt logprobs from two tokens before the choice (room for the
        tokenizer merging the prefix's last token with the choice's first)."""
        if temperature > 1e-5:
            raise ValueError("select supports only temperature 0")
        first = self._call({"text": text, "sampling_params": {"max_new_tokens": 0}})
        assert isinstance(first, dict)
        start = max(first["meta_info"]["prompt_tokens"] - 2, 0)
        outs = self._call(
            {
                "text": [text + c for c in choices],
                "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                "return_logprob": True,
                "return_text_in_logprobs": True,
                "logprob_start_len": start,
            }
        )
        assert isinstance(outs, list)
        inputs = [o["meta_info"]["input_token_logprobs"] for o in outs]
        outputs = [o["meta_info"].get("output_token_logprobs", []) for o in outs]
        normalized = [_mean_logprob(x) for x in inputs]
        for i, lps in enumerate(inputs):
            # If the first scored token lies wholly inside the prefix, no merge happened:
            # drop it from the choice's score (SGLang's "token healing" correction).
            first_text = lps[0][2]
            if len(lps) > 1 and first_text is not None and text.endswith(first_text):
                normalized[i] = (normalized[i] * len(lps) - (lps[0][0] or 0.0)) / (len(lps) - 1)
                inputs[i] = lps[1:]
        unconditional = None
        if method.requires_unconditional_logprobs:
            ids = [[t[1] for t in lps] for lps in inputs]
            outs = self._call(
                {
                    "input_ids": ids,
                    "sampling_params": {"max_new_tokens": 0},
                    "return_logprob": True,
                    "logprob_start_len": 0,
                }
            )
            unconditional = [o["meta_info"]["input_token_logprobs"] for o in outs]
        return method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=inputs,
            output_token_logprobs=outputs,
            unconditional_token_logprobs=unconditional,
        )


def _mean_logprob(entries: list[list]) -> float:
    # SGLang skips the null first entry (and, as written there, exact zeros).
    values = [e[0] for e in entries if e[0]]
    return sum(values) / len(values) if values else 0.0
