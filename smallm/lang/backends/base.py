"""The backend interface, and the ``generate`` / ``select`` logic shared by every backend that
speaks the native ``/generate`` protocol (in-process or over HTTP)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from smallm.lang.chat_template import ChatTemplate
from smallm.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from smallm.lang.coordinator import NULL_COORDINATOR, Coordinator
from smallm.lang.sampling import split_request


class BackendError(RuntimeError):
    """The backend refused or failed a request (an HTTP error, or a request the runtime
    aborted, e.g. for an invalid grammar)."""


def _check_abort(meta: dict) -> None:
    # The Engine reports a request it refused as an aborted result; the server sends a 400.
    # Either way the program must fail there, not go on with an empty completion.
    finish = meta.get("finish_reason") or {}
    if finish.get("type") == "abort":
        raise BackendError(finish.get("message") or "the request was aborted")


class Backend(ABC):
    """Runs generations for programs. Subclasses provide one native call (``_call``) and its
    streaming form; generation, selection and chat template handling are built on those."""

    #: Whether :meth:`generate_many` / :meth:`select_many` send one request for many items
    #: (what compiled ``run_batch`` relies on).
    batches_requests = True

    #: Whether ``fork`` first prefills the shared prefix on its own (needed when the branches'
    #: requests arrive separately; a step-aligned batch sends them together anyway).
    warms_fork_prefix = True

    #: A chat-only backend generates whole assistant turns from the chat's messages
    #: (:meth:`generate_chat`) instead of continuing the rendered text.
    chat_only = False

    def generate_chat(
        self, messages: list[dict[str, Any]], params: dict[str, Any], stream: bool = False
    ) -> Any:
        """The next assistant message for ``messages``: (text, meta_info), or with ``stream``
        an iterator of (piece, meta_info). Only chat-only backends implement it."""
        raise NotImplementedError(f"{type(self).__name__} continues text; it has no chat mode")

    #: How a program's threads tell a batching backend that they wait (no-op by default).
    coordinator: Coordinator = NULL_COORDINATOR

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

    def generate(self, text: str, params: dict[str, Any]) -> tuple[Any, Any]:
        """Complete ``text`` with resolved sampling ``params``: (completion, meta_info); with
        ``n`` > 1, (list of n completions, list of their meta_info)."""
        sampling, request = split_request(params)
        out = self._call({"text": text, "sampling_params": sampling, **request})
        for o in out if isinstance(out, list) else [out]:
            _check_abort(o["meta_info"])
        if isinstance(out, list):
            return [o["text"] for o in out], [o["meta_info"] for o in out]
        return out["text"], out["meta_info"]

    def generate_stream(self, text: str, params: dict[str, Any]) -> Iterator[tuple[str, dict]]:
        """Like :meth:`generate`, yielding (new text piece, meta_info) as tokens arrive."""
        sampling, request = split_request(params)
        sent = 0
        for chunk in self._call_stream({"text": text, "sampling_params": sampling, **request}):
            _check_abort(chunk["meta_info"])
            piece = chunk["text"][sent:]
            sent = len(chunk["text"])
            if piece or chunk["meta_info"].get("finish_reason") is not None:
                yield piece, chunk["meta_info"]

    def generate_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Several completions as one native request: a list of prompts with one
        ``sampling_params`` (and logprob options) per prompt. Items must have ``n`` 1. One
        entry per item: (completion, meta_info), or the :class:`BackendError` of an item the
        runtime aborted (the others still count)."""
        if len(items) == 1:
            return [self.generate(*items[0])]
        texts, sampling_list, want, starts, tops = [], [], [], [], []
        text_in_logprobs = False
        for text, params in items:
            sampling, request = split_request(params)
            texts.append(text)
            sampling_list.append(sampling)
            want.append(bool(request.get("return_logprob", False)))
            starts.append(request.get("logprob_start_len", -1))
            tops.append(request.get("top_logprobs_num", 0))
            text_in_logprobs |= bool(request.get("return_text_in_logprobs", False))
        outs = self._call(
            {
                "text": texts,
                "sampling_params": sampling_list,
                "return_logprob": want,
                "logprob_start_len": starts,
                "top_logprobs_num": tops,
                "return_text_in_logprobs": text_in_logprobs,
            }
        )
        assert isinstance(outs, list) and len(outs) == len(items)
        results: list[Any] = []
        for o in outs:
            try:
                _check_abort(o["meta_info"])
                results.append((o["text"], o["meta_info"]))
            except BackendError as e:
                results.append(e)
        return results

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
        return self.select_many([(text, choices, temperature, method)])[0]

    def select_many(
        self, items: list[tuple[str, list[str], float, ChoicesSamplingMethod]]
    ) -> list[ChoicesDecision]:
        """:meth:`select` for several prefixes, with the same number of requests as one."""
        if any(temperature > 1e-5 for _, _, temperature, _ in items):
            raise ValueError("select supports only temperature 0")
        texts = [text for text, _, _, _ in items]
        single = len(items) == 1
        first = self._call(
            {"text": texts[0] if single else texts, "sampling_params": {"max_new_tokens": 0}}
        )
        firsts = [first] if single else first
        assert isinstance(firsts, list) and len(firsts) == len(items)
        prompts, starts = [], []
        for (text, choices, _, _), f in zip(items, firsts):
            start = max(f["meta_info"]["prompt_tokens"] - 2, 0)
            prompts += [text + c for c in choices]
            starts += [start] * len(choices)
        outs = self._call(
            {
                "text": prompts,
                "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                "return_logprob": True,
                "return_text_in_logprobs": True,
                "logprob_start_len": starts[0] if single else starts,
            }
        )
        assert isinstance(outs, list) and len(outs) == len(prompts)
        scored = []
        for text, choices, _, _ in items:
            mine, outs = outs[: len(choices)], outs[len(choices) :]
            scored.append(_score_choices(text, mine))
        unconditional: list[Any] = [None] * len(items)
        need = [i for i, item in enumerate(items) if item[3].requires_unconditional_logprobs]
        if need:
            ids = [[t[1] for t in lps] for i in need for lps in scored[i][0]]
            outs = self._call(
                {
                    "input_ids": ids,
                    "sampling_params": {"max_new_tokens": 0},
                    "return_logprob": True,
                    "logprob_start_len": 0,
                }
            )
            for i in need:
                count = len(items[i][1])
                mine, outs = outs[:count], outs[count:]
                unconditional[i] = [o["meta_info"]["input_token_logprobs"] for o in mine]
        decisions = []
        for (_, choices, _, method), (inputs, normalized, outputs), uncond in zip(
            items, scored, unconditional
        ):
            decisions.append(
                method(
                    choices=choices,
                    normalized_prompt_logprobs=normalized,
                    input_token_logprobs=inputs,
                    output_token_logprobs=outputs,
                    unconditional_token_logprobs=uncond,
                )
            )
        return decisions


def _score_choices(text: str, outs: list[dict]) -> tuple[list, list[float], list]:
    """(input logprobs, normalized score, output logprobs) of each choice of one select."""
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
    return inputs, normalized, outputs


def _mean_logprob(entries: list[list]) -> float:
    # SGLang skips the null first entry (and, as written there, exact zeros).
    values = [e[0] for e in entries if e[0]]
    return sum(values) / len(values) if values else 0.0
