"""SamplingParams: wire-dict parsing, normalisation and validation."""

from __future__ import annotations

import json
import math

import pytest

from smallm.runtime.sampling import SamplingParams, SamplingParamsError


def test_defaults_match_sglang():
    p = SamplingParams()
    assert p.max_new_tokens == 128
    assert p.min_new_tokens == 0
    assert p.n == 1
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, -1, 0.0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.ignore_eos, p.skip_special_tokens, p.spaces_between_special_tokens) == (
        False,
        True,
        True,
    )
    assert p.no_stop_trim is False
    assert p.regex is None and p.json_schema is None and p.ebnf is None and p.seed is None
    p.validate()


def test_from_dict_none_and_empty_give_defaults():
    assert SamplingParams.from_dict(None) == SamplingParams()
    assert SamplingParams.from_dict({}) == SamplingParams()


def test_from_dict_ignores_unknown_keys_and_none_values():
    p = SamplingParams.from_dict(
        {
            "stop_regex": "x+",
            "regex": None,
            "max_new_tokens": None,
            "temperature": 0.5,
            "some_future_option": {"a": 1},
        }
    )
    assert p.temperature == 0.5
    assert p.max_new_tokens == 128
    assert p.regex is None
    p.validate()


def test_stop_string_becomes_list():
    assert SamplingParams.from_dict({"stop": "\n"}).stop == ["\n"]
    assert SamplingParams.from_dict({"stop": ["a", "b"]}).stop == ["a", "b"]
    assert SamplingParams(stop="x").stop == ["x"]  # type: ignore[arg-type]


def test_integral_floats_are_accepted_for_int_fields():
    p = SamplingParams.from_dict({"max_new_tokens": 16.0, "top_k": 5.0, "seed": 7.0, "n": 1})
    assert p.max_new_tokens == 16 and isinstance(p.max_new_tokens, int)
    assert p.top_k == 5 and isinstance(p.top_k, int)
    assert p.seed == 7 and isinstance(p.seed, int)


def test_ints_are_accepted_for_float_fields():
    p = SamplingParams.from_dict({"temperature": 0, "top_p": 1})
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.top_p == 1.0 and isinstance(p.top_p, float)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 16.5),
        ("max_new_tokens", "16"),
        ("max_new_tokens", True),
        ("min_new_tokens", [1]),
        ("n", 1.5),
        ("top_k", "all"),
        ("temperature", "hot"),
        ("temperature", True),
        ("top_p", [0.9]),
        ("min_p", "0"),
        ("frequency_penalty", {}),
        ("presence_penalty", "1"),
        ("repetition_penalty", False),
        ("ignore_eos", "true"),
        ("ignore_eos", 1),
        ("skip_special_tokens", 0),
        ("spaces_between_special_tokens", "no"),
        ("no_stop_trim", 1.0),
        ("stop", 3),
        ("stop", ["a", 3]),
        ("stop_token_ids", "2"),
        ("stop_token_ids", [1, "2"]),
        ("stop_token_ids", [1.5]),
        ("regex", 42),
        ("ebnf", ["root ::= x"]),
        ("json_schema", {"type": "object"}),
        ("seed", "42"),
        ("seed", 1.25),
    ],
)
def test_wrong_types_raise_naming_the_field(field, value):
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams.from_dict({field: value})


def test_json_schema_must_be_a_json_string():
    with pytest.raises(SamplingParamsError, match=r"json_schema.*string"):
        SamplingParams.from_dict({"json_schema": {"type": "object"}})
    schema = json.dumps({"type": "object"})
    assert SamplingParams.from_dict({"json_schema": schema}).validate().json_schema == schema


def test_non_dict_sampling_params_raises():
    with pytest.raises(SamplingParamsError, match="sampling_params"):
        SamplingParams.from_dict([1, 2])  # type: ignore[arg-type]


def test_max_new_tokens_zero_is_valid():
    p = SamplingParams.from_dict({"max_new_tokens": 0}).validate()
    assert p.max_new_tokens == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", -1),
        ("min_new_tokens", -1),
        ("min_new_tokens", 200),  # > max_new_tokens (128)
        ("n", 0),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", 0),
        ("top_k", -2),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("presence_penalty", -3.0),
        ("presence_penalty", math.nan),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 2.1),
    ],
)
def test_out_of_range_values_raise_naming_the_field(field, value):
    p = SamplingParams.from_dict({field: value})
    with pytest.raises(SamplingParamsError, match=field):
        p.validate()


def test_range_message_states_the_allowed_range():
    with pytest.raises(SamplingParamsError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0).validate()


@pytest.mark.parametrize(
    "grammars",
    [
        {"regex": "a+", "json_schema": "{}"},
        {"regex": "a+", "ebnf": "root ::= 'a'"},
        {"json_schema": "{}", "ebnf": "root ::= 'a'"},
    ],
)
def test_at_most_one_grammar(grammars):
    with pytest.raises(SamplingParamsError, match="at most one of regex/json_schema/ebnf"):
        SamplingParams.from_dict(grammars).validate()


def test_stop_token_ids_checked_against_vocab_size():
    p = SamplingParams.from_dict({"stop_token_ids": [0, 99]})
    p.validate(vocab_size=100)
    p.validate()  # no vocabulary: no range check
    with pytest.raises(SamplingParamsError, match="stop_token_ids"):
        p.validate(vocab_size=99)
    with pytest.raises(SamplingParamsError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[-1]).validate(vocab_size=10)


def test_validate_rechecks_types_assigned_after_construction():
    p = SamplingParams()
    p.seed = "abc"  # type: ignore[assignment]
    with pytest.raises(SamplingParamsError, match="seed"):
        p.validate()


def test_validate_accepts_boundaries():
    SamplingParams(
        max_new_tokens=5,
        min_new_tokens=5,
        temperature=0.0,
        top_p=1.0,
        top_k=1,
        min_p=1.0,
        frequency_penalty=-2.0,
        presence_penalty=2.0,
        repetition_penalty=2.0,
        seed=-5,
    ).validate(vocab_size=10)


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(top_k=1).is_greedy
    assert SamplingParams(temperature=1e-9).is_greedy  # would overflow if divided by
    assert not SamplingParams(temperature=0.7, top_k=2).is_greedy
    assert not SamplingParams().is_greedy


def test_to_dict_round_trips_and_is_json_serialisable():
    p = SamplingParams.from_dict(
        {"stop": "x", "temperature": 0.3, "seed": 5, "json_schema": '{"type": "string"}'}
    )
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert SamplingParams.from_dict(d) == p
    assert set(d) == {f for f in SamplingParams.__dataclass_fields__}
