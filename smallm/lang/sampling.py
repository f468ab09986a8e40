"""Sampling parameters of a ``gen``: program defaults merged with per-call overrides, then turned
into the native ``/generate`` ``sampling_params`` dict."""

from __future__ import annotations

import json
from typing import Any

# Keys a ``gen`` may set (SGLang's names; ``max_tokens`` is accepted as ``max_new_tokens``).
GEN_KEYS = (
    "max_new_tokens", "min_new_tokens", "n", "stop", "stop_token_ids", "temperature", "top_p",
    "top_k", "min_p", "frequency_penalty", "presence_penalty", "ignore_eos", "regex",
    "json_schema", "dtype", "return_logprob", "logprob_start_len", "top_logprobs_num",
    "return_text_in_logprobs",
)  # fmt: skip

# SGLang's defaults when neither the program run nor the gen sets a value.
DEFAULTS: dict[str, Any] = {"max_new_tokens": 128, "temperature": 1.0, "stop": []}

# Requests options that live at the top level of /generate, not in sampling_params.
REQUEST_KEYS = (
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
)

# Regexes for ``dtype``: ASCII classes only (a Unicode ``\d`` makes much larger automata).
# As SGLang's, numbers may end in spaces / newlines: that is how the model says "done" (the
# gen's stop strings " " and "\n" then end it); without it a number runs to max_tokens.
INT_REGEX = r"[-+]?[0-9]+[ \n]*"
FLOAT_REGEX = r"[-+]?[0-9]+(\.[0-9]+)?[ \n]*"
BOOL_REGEX = r"(True|False)"
STR_REGEX = r"\"[\w\d\s]*\""


def dtype_regex(dtype: Any) -> str:
    """The regex that constrains a ``gen`` of this ``dtype`` (int, float, str, bool)."""
    table = {int: INT_REGEX, float: FLOAT_REGEX, str: STR_REGEX, bool: BOOL_REGEX}
    table.update({t.__name__: r for t, r in list(table.items())})
    if dtype not in table:
        raise ValueError(f"invalid dtype {dtype!r}; expected int, float, str or bool")
    return table[dtype]


def json_schema_string(schema: Any) -> str:
    """A JSON schema as the JSON string the native API wants: from a str, a dict, or a pydantic
    model class."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    if hasattr(schema, "model_json_schema"):
        return json.dumps(schema.model_json_schema())
    raise TypeError(f"json_schema must be a str, dict or pydantic model, not {type(schema)}")


def as_list(stop: Any) -> list:
    """``stop`` / ``stop_token_ids`` as a fresh list (None, a single value or a sequence)."""
    if stop is None or stop == ():
        return []
    if isinstance(stop, (str, int)):
        return [stop]
    return list(stop)


def resolve(defaults: dict[str, Any], overrides: dict[str, Any], extra_stop: list[str]) -> dict:
    """Merge program defaults and a gen's overrides (None means unset) into one flat dict; adds
    the chat template's stop strings as SGLang does."""
    merged = dict(DEFAULTS)
    merged.update({k: v for k, v in defaults.items() if v is not None})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    merged["stop"] = as_list(merged.get("stop")) + [s for s in extra_stop if s]
    if merged.get("dtype") is not None:
        # As in SGLang: dtype wins over regex, and numbers also stop at whitespace.
        dtype = merged.pop("dtype")
        merged["regex"] = dtype_regex(dtype)
        if dtype in (int, float, "int", "float"):
            merged["stop"] += [" ", "\n"]
    else:
        merged.pop("dtype", None)
    if merged.get("json_schema") is not None:
        merged["json_schema"] = json_schema_string(merged["json_schema"])
    return merged


def split_request(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split resolved params into (sampling_params, top-level request options)."""
    sampling = {k: v for k, v in params.items() if k not in REQUEST_KEYS}
    if not sampling.get("stop"):
        sampling.pop("stop", None)
    request = {k: params[k] for k in REQUEST_KEYS if k in params}
    return sampling, request
