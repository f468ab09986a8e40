"""Per-request sampling parameters (the ``sampling_params`` dict of the SGLang wire protocol)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SamplingParams", "SamplingParamsError"]

# Temperatures below this are treated as greedy: dividing logits by them would overflow float32
# and the distribution is a point mass for all practical purposes anyway.
GREEDY_TEMPERATURE = 1e-6


class SamplingParamsError(ValueError):
    """A sampling parameter has the wrong type or is out of range (the message names the field)."""


def _as_int(name: str, value: Any) -> int:
    # bool is an Integral, but `max_new_tokens: true` is a client bug, not a number.
    if isinstance(value, bool):
        raise SamplingParamsError(f"{name} must be an integer, got a boolean ({value!r})")
    if isinstance(value, numbers.Integral):
        return int(value)
    # JSON clients (and JavaScript) often send integral values as floats, e.g. 16.0.
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise SamplingParamsError(f"{name} must be an integer, got {value!r}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingParamsError(f"{name} must be a number, got {value!r}")
    return float(value)


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SamplingParamsError(f"{name} must be a boolean (true/false), got {value!r}")
    return value


def _as_opt_str(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    hint = (
        " (a JSON string: serialise it with json.dumps)"
        if name in ("json_schema", "structural_tag")
        else ""
    )
    raise SamplingParamsError(f"{name} must be a string{hint}, got {type(value).__name__}")


def _as_str_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise SamplingParamsError(f"{name} must be a string or a list of strings, got {value!r}")
    # An empty stop string would match at every position and end generation immediately.
    return [s for s in value if s]


def _as_int_list(name: str, value: Any) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [_as_int(name, v) for v in value]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return [int(value)]
    raise SamplingParamsError(f"{name} must be a list of integers, got {value!r}")


def _as_opt_int(name: str, value: Any) -> int | None:
    return None if value is None else _as_int(name, value)


def _as_bias(name: str, value: Any) -> dict[int, float] | None:
    """OpenAI's ``logit_bias``: token id (JSON object keys are strings) -> bias."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SamplingParamsError(f"{name} must be an object mapping token ids to numbers")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise SamplingParamsError(f"{name} keys must be token ids, got {key!r}") from None
        out[token] = _as_float(name, bias)
    return out or None


_INT_FIELDS = ("max_new_tokens", "min_new_tokens", "n", "top_k")
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)
_BOOL_FIELDS = (
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
)
_GRAMMAR_FIELDS = ("regex", "json_schema", "ebnf", "structural_tag")

_COERCE = {
    **dict.fromkeys(_INT_FIELDS, _as_int),
    **dict.fromkeys(_FLOAT_FIELDS, _as_float),
    **dict.fromkeys(_BOOL_FIELDS, _as_bool),
    **dict.fromkeys(_GRAMMAR_FIELDS, _as_opt_str),
    "stop": _as_str_list,
    "stop_token_ids": _as_int_list,
    "seed": _as_opt_int,
    "logit_bias": _as_bias,
}


@dataclass
class SamplingParams:
    """How to sample one request's completion. Defaults and meanings follow SGLang.

    Construction normalises types (and raises `SamplingParamsError` on wrong ones); call
    `validate` to check ranges.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    # SGLang's structural tag as a JSON string: {"structures": [{"begin", "schema", "end"}],
    # "triggers": [...]} (free text; a trigger opens a structure checked against its schema).
    structural_tag: str | None = None
    seed: int | None = None
    # Added to the logits of these token ids before sampling (OpenAI: -100 bans, 100 forces).
    logit_bias: dict[int, float] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a wire ``sampling_params`` dict.

        Unknown keys are ignored and ``None`` means "use the default". Values are normalised
        (``"stop": "x"`` becomes ``["x"]``, ``16.0`` becomes ``16`` for integer fields), as on
        every construction. Raises `SamplingParamsError` naming the field on a wrong type.
        Ranges are checked by `validate`, not here.
        """
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise SamplingParamsError(f"sampling_params must be an object, got {type(d).__name__}")
        return cls(**{name: d[name] for name in _COERCE if d.get(name) is not None})

    def __post_init__(self) -> None:
        self._normalise()

    def _normalise(self) -> None:
        for name, coerce in _COERCE.items():
            setattr(self, name, coerce(name, getattr(self, name)))

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Check ranges; raise `SamplingParamsError` naming the field and the allowed range.

        Types are re-checked (and normalised) too, in case a field was assigned after
        construction. ``vocab_size`` enables the ``stop_token_ids`` range check. Returns self.
        """
        self._normalise()

        _check(self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0", self.max_new_tokens)
        _check(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            f"must be in [0, max_new_tokens={self.max_new_tokens}]",
            self.min_new_tokens,
        )
        _check(self.n >= 1, "n", "must be >= 1", self.n)
        _check(
            0.0 <= self.temperature < math.inf,
            "temperature",
            "must be finite and >= 0",
            self.temperature,
        )
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        _check(
            self.top_k == -1 or self.top_k >= 1,
            "top_k",
            "must be -1 (disabled) or >= 1",
            self.top_k,
        )
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, name, "must be in [-2, 2]", value)
        _check(
            0.0 < self.repetition_penalty <= 2.0,
            "repetition_penalty",
            "must be in (0, 2]",
            self.repetition_penalty,
        )
        grammars = [name for name in _GRAMMAR_FIELDS if getattr(self, name) is not None]
        if len(grammars) > 1:
            raise SamplingParamsError(
                "at most one of regex/json_schema/ebnf/structural_tag may be set, got "
                + ", ".join(grammars)
            )
        for tok, bias in (self.logit_bias or {}).items():
            _check(-100.0 <= bias <= 100.0, "logit_bias", "values must be in [-100, 100]", bias)
            _check(
                tok >= 0 and (vocab_size is None or tok < vocab_size),
                "logit_bias",
                "keys must be token ids in the vocabulary",
                tok,
            )
        if vocab_size is not None:
            for tok in self.stop_token_ids:
                _check(
                    0 <= tok < vocab_size,
                    "stop_token_ids",
                    f"entries must be in [0, {vocab_size})",
                    tok,
                )
        return self

    @property
    def is_greedy(self) -> bool:
        """True when the choice is the argmax: temperature 0 (or negligibly small) or top_k 1."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (``from_dict`` round-trips it)."""
        return dataclasses.asdict(self)


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    # Written as "raise unless ok" so NaN, which fails every comparison, is rejected too.
    if not ok:
        raise SamplingParamsError(f"{name} {rule}, got {value!r}")
