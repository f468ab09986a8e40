"""From a ``/generate`` call (HTTP body or ``Engine.generate`` arguments) to scheduler requests.

One call may hold several prompts and ``n`` samples each; this module checks every field,
tokenizes, and expands the call into one `GenerateRequest` per sample, in the order the
response lists them (prompt-major). It is shared by the Engine and the server's tokenizer
manager, so both accept and reject exactly the same inputs.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

from smallm.runtime.messages import GenerateRequest
from smallm.runtime.sampling import SamplingParams, SamplingParamsError


def error_param(e: ValueError) -> str | None:
    """The request field a validation error is about, when it names one."""
    if isinstance(e, RequestError):
        return e.param
    if isinstance(e, SamplingParamsError):
        first = str(e).split(" ", 1)[0]
        return first if first in {f.name for f in dataclasses.fields(SamplingParams)} else None
    return None


class RequestError(ValueError):
    """The request is malformed or out of range (HTTP 400); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass
class GenerateCall:
    """The fields of a native ``/generate`` body (COMPAT.md), after type checks."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict | list[dict] | None = None
    rid: str | list[str] | None = None
    # These three may also be lists, one value per prompt (SGLang's batch form).
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    # The replica a DP-aware router picked (see `router_fields`); None: the server picks.
    data_parallel_rank: int | None = None
    # Prefill/decode disaggregation (SGLang's router adds them in PD mode; lists for batches).
    bootstrap_host: str | list[str] | None = None
    bootstrap_port: int | list[int] | None = None
    bootstrap_room: int | list[int] | None = None

    @property
    def is_single(self) -> bool:
        """One prompt (the response is a dict, or a list of n dicts when n > 1)."""
        if self.text is not None:
            return isinstance(self.text, str)
        return bool(self.input_ids) and not isinstance(self.input_ids[0], list)

    @classmethod
    def from_json(cls, body: Any) -> GenerateCall:
        """Check a decoded JSON body; unknown keys are ignored, ``null`` means the default."""
        if not isinstance(body, dict):
            raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
        call = cls()
        text = body.get("text")
        if text is not None:
            if not (isinstance(text, str) or is_list_of(text, str)):
                raise RequestError("text must be a string or a list of strings", "text")
            call.text = text
        ids = body.get("input_ids")
        if ids is not None:
            if not (is_list_of(ids, int) or (ids and all(is_list_of(x, int) for x in ids))):
                raise RequestError(
                    "input_ids must be a list of integers or a list of such lists", "input_ids"
                )
            call.input_ids = ids
        sp = body.get("sampling_params")
        if sp is not None:
            if not (isinstance(sp, dict) or is_list_of(sp, dict)):
                raise RequestError(
                    "sampling_params must be an object or a list of objects", "sampling_params"
                )
            call.sampling_params = sp
        rid = body.get("rid")
        if rid is not None:
            if not (isinstance(rid, str) or is_list_of(rid, str)):
                raise RequestError("rid must be a string or a list of strings", "rid")
            call.rid = rid
        for name in ("return_text_in_logprobs", "stream"):
            value = body.get(name)
            if value is not None:
                if not isinstance(value, bool):
                    raise RequestError(f"{name} must be true or false, got {value!r}", name)
                setattr(call, name, value)
        value = body.get("return_logprob")
        if value is not None:
            if not (isinstance(value, bool) or is_list_of(value, bool)):
                raise RequestError(
                    f"return_logprob must be true, false or a list of them, got {value!r}",
                    "return_logprob",
                )
            call.return_logprob = value
        for name, low, high in (("logprob_start_len", -1, None), ("top_logprobs_num", 0, 1000)):
            value = body.get(name)
            if value is None:
                continue
            values = value if isinstance(value, list) else [value]
            if not values or not is_list_of(values, int):
                raise RequestError(
                    f"{name} must be an integer or a list of integers, got {value!r}", name
                )
            for v in values:
                if v < low or (high is not None and v > high):
                    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
                    raise RequestError(f"{name} must be {bounds}, got {v}", name)
            setattr(call, name, value)
        call.data_parallel_rank = router_fields(body)
        bootstrap_fields(body, call)
        return call


def bootstrap_fields(body: dict, call: GenerateCall) -> None:
    """Check ``bootstrap_host``/``bootstrap_port``/``bootstrap_room`` (each a value or a list
    with one value per prompt); all three or none."""
    checks = {
        "bootstrap_host": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
        "bootstrap_port": (
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536,
            "an integer in 1..65535",
        ),
        "bootstrap_room": (
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64,
            "an integer in [0, 2**64)",
        ),
    }
    given = {name: body.get(name) for name in checks if body.get(name) is not None}
    if not given:
        return
    if len(given) != len(checks):
        missing = ", ".join(n for n in checks if n not in given)
        raise RequestError(f"bootstrap fields come together: {missing} missing", missing)
    for name, value in given.items():
        ok, what = checks[name]
        values = value if isinstance(value, list) else [value]
        if not values or not all(ok(v) for v in values):
            raise RequestError(f"{name} must be {what} or a list of them, got {value!r}", name)
        setattr(call, name, value)


# Fields SGLang's router (sglang-router / sgl-model-gateway) adds to every body it forwards.
# Their defaults (false / null) must pass; a true value asks for something smallm does not
# produce, and a silent ignore would hand the client a response without it: 400 instead.
UNSUPPORTED_FLAGS = {
    "return_hidden_states": "hidden states are not returned by this server",
    "return_bytes": "per-token bytes are not returned by this server",
    "return_entropy": "per-token entropy is not returned by this server",
    "background": "background requests are not supported on this route",
}
# Flags that are accepted whatever their value: they only steer logging, or reasoning output
# that a model without a reasoning parser never has.
ACCEPTED_FLAGS = ("log_metrics", "no_logs", "separate_reasoning", "stream_reasoning")


def router_fields(body: dict) -> int | None:
    """Check the fields SGLang's router adds to a forwarded body; returns its
    ``data_parallel_rank`` (a non-negative int, or None). The rank's upper bound (the server's
    dp_size) is checked by the HTTP layer, which knows it. ``model`` (null or a name) is
    accepted as is."""
    for name in (*UNSUPPORTED_FLAGS, *ACCEPTED_FLAGS):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"{name} must be true or false, got {value!r}", name)
        if value and name in UNSUPPORTED_FLAGS:
            raise RequestError(f"{name}: {UNSUPPORTED_FLAGS[name]}; send false or omit it", name)
    rank = body.get("data_parallel_rank")
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise RequestError(
            f"data_parallel_rank must be a non-negative integer, got {rank!r}",
            "data_parallel_rank",
        )
    return rank


def check_dp_rank(rank: int | None, dp_size: int) -> None:
    """A ``data_parallel_rank`` must name one of the server's ``dp_size`` replicas."""
    if rank is not None and not 0 <= rank < dp_size:
        raise RequestError(
            f"data_parallel_rank must be in [0, {dp_size}) (this server has {dp_size} "
            f"data-parallel replica{'s' if dp_size != 1 else ''}), got {rank}",
            "data_parallel_rank",
        )


def is_list_of(value: Any, kind: type) -> bool:
    """A non-empty list whose items are all ``kind`` (bools do not count as ints)."""
    if not isinstance(value, list) or not value:
        return False
    if kind is int:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return all(isinstance(v, kind) for v in value)


def build_requests(
    call: GenerateCall,
    tokenizer: Any,
    vocab_size: int,
    context_length: int | None = None,
) -> list[GenerateRequest]:
    """Tokenize, validate and expand ``call``; raises `RequestError`, or `SamplingParamsError`
    (a ValueError naming the field) for a bad ``sampling_params`` entry.

    With ``context_length`` a prompt that, with its ``max_new_tokens``, does not fit is
    rejected (the server's rule, as in SGLang); without it the scheduler clips
    ``max_new_tokens`` at the context end (the Engine's rule).
    """
    prompts = _token_lists(tokenizer, call)
    raw = call.sampling_params
    params_list = raw if isinstance(raw, list) else [raw] * len(prompts)
    if len(params_list) != len(prompts):
        raise RequestError(
            f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts",
            "sampling_params",
        )
    rids = _per_prompt(call.rid, len(prompts), "rid")
    want_logprobs = _per_prompt(call.return_logprob, len(prompts), "return_logprob")
    starts = _per_prompt(call.logprob_start_len, len(prompts), "logprob_start_len")
    tops = _per_prompt(call.top_logprobs_num, len(prompts), "top_logprobs_num")
    parsed = [SamplingParams.from_dict(p).validate(vocab_size) for p in params_list]
    samples = [p.n for p in parsed]
    b_hosts = _per_sample(call.bootstrap_host, samples, "bootstrap_host")
    b_ports = _per_sample(call.bootstrap_port, samples, "bootstrap_port")
    b_rooms = _per_sample(call.bootstrap_room, samples, "bootstrap_room")
    if isinstance(call.rid, list) and len(set(call.rid)) != len(call.rid):
        raise RequestError("rid entries must be distinct", "rid")
    out: list[GenerateRequest] = []
    for i, (ids, params, rid) in enumerate(zip(prompts, parsed, rids)):
        _check_prompt(ids, vocab_size, params, context_length)
        base = rid or uuid.uuid4().hex
        group = base if params.n > 1 else None
        for k in range(params.n):
            sample = dataclasses.replace(params, n=1)
            if params.n > 1 and params.seed is not None:
                sample.seed = params.seed + k  # distinct samples, still reproducible
            out.append(
                GenerateRequest(
                    rid=base if params.n == 1 else f"{base}-{k}",
                    input_ids=list(ids),
                    params=sample,
                    return_logprob=want_logprobs[i],
                    logprob_start_len=starts[i],
                    top_logprobs_num=tops[i],
                    stream=call.stream,
                    group=group,
                    data_parallel_rank=call.data_parallel_rank,
                    bootstrap_host=b_hosts[i][k],
                    bootstrap_port=b_ports[i][k],
                    bootstrap_room=b_rooms[i][k],
                )
            )
    return out


def sample_room(room: int | None, k: int) -> int | None:
    """The bootstrap room of sample ``k`` of an ``n > 1`` request sent with room ``room``.

    The router sends one room per prompt, and every sample needs its own KV transfer: the
    prefill and decode servers each expand the same body into the same n rooms (sample 0 keeps
    the router's), so each sample's KV goes to its own decode-side request.
    """
    if room is None or k == 0:
        return room
    return (room + k * 0x9E3779B97F4A7C15) % (1 << 64)


def _per_sample(value: Any, samples: list[int], name: str) -> list[list]:
    """A bootstrap field as one value per sample of each prompt (``samples[i]`` = prompt i's n).

    A value, or a list with one per prompt, is what SGLang's router sends for ``/generate``;
    each sample k > 0 of a prompt then gets the room ``sample_room(room, k)``. A list with one
    per sample (sample-major: every prompt's sample 0, then every prompt's sample 1, ...) is
    what it sends for an OpenAI request with ``n`` > 1, already one room per sample.
    """
    count, total = len(samples), sum(samples)
    if isinstance(value, list) and len(value) == total and total != count:
        if len(set(samples)) != 1:
            raise RequestError(f"{name} per sample needs the same n for every prompt", name)
        return [[value[i + k * count] for k in range(n)] for i, n in enumerate(samples)]
    if isinstance(value, list) and len(value) != count:
        raise RequestError(
            f"{name} has {len(value)} entries for {count} prompts ({total} samples)", name
        )
    per_prompt = value if isinstance(value, list) else [value] * count
    if name != "bootstrap_room":
        return [[v] * n for v, n in zip(per_prompt, samples)]
    return [[sample_room(v, k) for k in range(n)] for v, n in zip(per_prompt, samples)]


def _per_prompt(value: Any, count: int, name: str) -> list:
    """A top-level option as one value per prompt (a list must have one entry per prompt)."""
    if not isinstance(value, list):
        return [value] * count
    if len(value) != count:
        raise RequestError(f"{name} has {len(value)} entries for {count} prompts", name)
    return value


def _token_lists(tokenizer: Any, call: GenerateCall) -> list[list[int]]:
    if (call.text is None) == (call.input_ids is None):
        raise RequestError("give exactly one of text and input_ids")
    if call.text is not None:
        texts = [call.text] if isinstance(call.text, str) else list(call.text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise RequestError("text must be a string or a non-empty list of strings", "text")
        return [tokenizer.encode(t) for t in texts]
    ids = call.input_ids
    if not ids:
        raise RequestError("the prompt is empty", "input_ids")
    if not isinstance(ids[0], list):
        return [list(ids)]
    if not all(isinstance(x, list) for x in ids):
        raise RequestError("input_ids must be a list of ints or a list of lists of ints")
    return [list(x) for x in ids]


def _check_prompt(
    ids: list[int], vocab_size: int, params: SamplingParams, context_length: int | None
) -> None:
    if not ids:
        raise RequestError("the prompt is empty (it has no tokens)", "text")
    for tok in ids:
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab_size:
            raise RequestError(
                f"token id {tok!r} is outside the vocabulary (0..{vocab_size - 1})", "input_ids"
            )
    if context_length is None:
        return
    n = len(ids)
    if n >= context_length:
        raise RequestError(
            f"the prompt has {n} tokens, more than the context length allows "
            f"({context_length} tokens including at least one generated)",
            "text",
        )
    if n + params.max_new_tokens > context_length:
        raise RequestError(
            f"the prompt ({n} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds "
            f"the context length of {context_length} tokens",
            "max_new_tokens",
        )
