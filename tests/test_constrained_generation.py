"""Constrained decoding end to end: the scheduler masks every step, jump-forward appends forced
text, and outputs always satisfy their constraint (default model, in-process Engine)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jsonschema
import pytest

from smallm.runtime.engine import Engine

CORPUS = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())


@pytest.fixture(scope="module")
def engine(default_model_dir):
    with Engine(default_model_dir, max_total_tokens=32768) as e:
        yield e


def chat(engine: Engine, text: str) -> str:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def test_json_schema_corpus_outputs_validate_or_are_rejected(engine):
    """Every schema compiles or is rejected up front naming why; every finished output
    validates. A 135M model at temperature 0 can run away inside a free-form string or array;
    closing near max_new_tokens (json_closing.py) ends such documents validly."""
    prompts = [
        chat(
            engine,
            f"Give an example {c['name'].replace('_', ' ')} as compact JSON matching "
            f"this JSON schema: {json.dumps(c['schema'])}",
        )
        for c in CORPUS
    ]
    params = [
        {
            "max_new_tokens": 256,
            "temperature": 0,
            "repetition_penalty": 1.15,
            "json_schema": json.dumps(c["schema"]),
        }
        for c in CORPUS
    ]
    outs = engine.generate(prompts, params)
    counts = {"stop": 0, "length": 0, "abort": 0}
    for case, out in zip(CORPUS, outs):
        reason = out["meta_info"]["finish_reason"]
        counts[reason["type"]] += 1
        if reason["type"] == "abort":
            assert reason["message"].startswith("invalid json_schema"), reason
        elif reason["type"] == "stop":
            jsonschema.validate(json.loads(out["text"]), case["schema"])
    assert sum(counts.values()) == len(CORPUS) >= 60
    # Measured (77 schemas): 70 finished, 7 rejected, none cut. Without closing near the
    # limit, 13 were cut at max_new_tokens (and 2 without the repetition penalty).
    assert counts["length"] == 0, counts
    assert counts["stop"] >= 0.85 * len(CORPUS), counts
    engine.scheduler.check_idle_accounting()


def test_json_closes_before_the_token_limit(engine):
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
        "required": ["title", "story"],
        "additionalProperties": False,
    }
    prompt = chat(engine, "Write a very long story about the sea, as JSON with a title.")
    params = {"max_new_tokens": 40, "temperature": 0, "json_schema": json.dumps(schema)}
    closer = engine.scheduler.json_closer
    margin = closer.margin
    try:
        closer.margin = 0  # off: the story runs into the limit and is cut
        cut = engine.generate(prompt, params)
    finally:
        closer.margin = margin
    closed = engine.generate(prompt, params)
    assert cut["meta_info"]["finish_reason"]["type"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut["text"])
    assert closed["meta_info"]["finish_reason"]["type"] == "stop"
    assert closed["meta_info"]["completion_tokens"] <= 40
    jsonschema.validate(json.loads(closed["text"]), schema)


REGEXES = {
    "ipv4": r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])",
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
    "email": r"[a-z0-9._]{1,20}@[a-z0-9]{1,12}\.(com|org|net)",
    # Bounded: at temperature 1 a 135M model happily writes digits until max_new_tokens.
    "decimal": r"-?\d{1,6}\.\d{1,6}",
    "scientific": r"-?\d{1,3}(\.\d{1,4})?[eE][+-]?\d{1,3}",
}


@pytest.mark.parametrize("name", REGEXES)
def test_regex_outputs_fullmatch(engine, name):
    regex = REGEXES[name]
    prompt = chat(engine, f"Write an example {name}.")
    greedy = {"max_new_tokens": 48, "temperature": 0, "regex": regex}
    sampled = [{**greedy, "temperature": 1.0, "seed": s} for s in range(3)]
    outs = engine.generate([prompt] * 4, [greedy, *sampled])
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        assert re.fullmatch(regex, out["text"]), (name, out["text"])


def test_token_boundary_numbers_are_producible(engine):
    # "1.5" is tokenized "1" "." "5" by SmolLM2: the mask must allow "." after the complete
    # match "1" (outlines-core alone drops it).
    outs = engine.generate(
        [chat(engine, "What is one and a half as a decimal number?")] * 2,
        [
            {"max_new_tokens": 8, "temperature": 0, "regex": r"\d+(\.\d+)?"},
            {"max_new_tokens": 8, "temperature": 0, "regex": r"-?\d+(\.\d+)?(e-?\d+)?"},
        ],
    )
    for out in outs:
        assert re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", out["text"]), out["text"]
    assert outs[0]["text"].startswith("1.5")


def test_mixed_batch_with_free_requests_and_n(engine):
    free = {"max_new_tokens": 16, "temperature": 0}
    alone = engine.generate("The capital of France is", free)["text"]
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    outs = engine.generate(
        ["The capital of France is", chat(engine, "Is water wet? Answer in JSON."),
         chat(engine, "Pick a colour."), chat(engine, "A year:")],
        [free,
         {"max_new_tokens": 32, "temperature": 0, "json_schema": json.dumps(schema)},
         {"max_new_tokens": 8, "temperature": 0.8, "n": 3, "seed": 1, "regex": "(red|green|blue)"},
         {"max_new_tokens": 8, "temperature": 0, "ebnf": 'start: YEAR\nYEAR: /(19|20)[0-9][0-9]/'}],
    )  # fmt: skip
    assert outs[0]["text"] == alone  # the masks of other rows leave free rows alone
    jsonschema.validate(json.loads(outs[1]["text"]), schema)
    assert all(o["text"] in ("red", "green", "blue") for o in outs[2:5])
    assert re.fullmatch(r"(19|20)[0-9][0-9]", outs[5]["text"])


def test_choices_sharing_prefixes(engine):
    regex = "(New York|New Jersey|Newark)"
    outs = engine.generate(
        [chat(engine, "Name a place near New York City.")] * 4,
        [{"max_new_tokens": 8, "temperature": 1.0, "seed": s, "regex": regex} for s in range(4)],
    )
    assert all(o["text"] in ("New York", "New Jersey", "Newark") for o in outs)


def test_jump_forward_saves_decode_steps_and_stays_valid(engine):
    schema = {
        "type": "object",
        "properties": {
            "first_name": {"type": "string", "maxLength": 12},
            "last_name": {"type": "string", "maxLength": 12},
            "year_of_birth": {"type": "integer", "minimum": 1900, "maximum": 2025},
            "is_student": {"type": "boolean"},
        },
        "required": ["first_name", "last_name", "year_of_birth", "is_student"],
        "additionalProperties": False,
    }
    prompt = chat(engine, "Describe a person named Ada Lovelace as JSON.")
    params = {"max_new_tokens": 96, "temperature": 0, "json_schema": json.dumps(schema)}
    results = {}
    for jump in (False, True):
        engine.scheduler.config.disable_jump_forward = not jump
        try:
            before = engine.scheduler.forward_steps
            out = engine.generate(prompt, params)
            results[jump] = (out, engine.scheduler.forward_steps - before)
        finally:
            engine.scheduler.config.disable_jump_forward = False
    for out, _ in results.values():
        jsonschema.validate(json.loads(out["text"]), schema)
    (off, off_steps), (on, on_steps) = results[False], results[True]
    assert off["meta_info"]["jump_forward_tokens"] == 0
    assert on["meta_info"]["jump_forward_tokens"] > 5
    # Greedy text may differ where the forced tokens differ from what the model would have
    # sampled (different context tokens); both are valid, and forced text costs no steps.
    assert on_steps < off_steps


@pytest.mark.parametrize(
    ("key", "spec", "message"),
    [
        ("regex", "([a-z", "invalid regex"),
        ("json_schema", "{not json", "invalid json_schema"),
        ("json_schema", json.dumps({"type": "object", "not": {"required": ["a"]}}), "not"),
        ("ebnf", "start: (", "invalid ebnf"),
    ],
)
def test_invalid_constraints_fail_the_request_not_the_engine(engine, key, spec, message):
    out = engine.generate("x", {"max_new_tokens": 4, key: spec})
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and message in reason["message"]
    ok = engine.generate("Hello", {"max_new_tokens": 2, "temperature": 0})
    assert ok["meta_info"]["completion_tokens"] == 2


# outlines-core needs ~3-4 s (on this machine) to index this regex over a 49k vocabulary.
SLOW_REGEX = r"(\w{1,6}\s){1,4}"


def test_slow_grammar_does_not_delay_free_requests(tiny_chat_model_dir):
    import threading
    import time

    with Engine(str(tiny_chat_model_dir), max_total_tokens=4096, grammar_backend="outlines") as e:
        results = {}

        def run(name: str, params: dict) -> None:
            t0 = time.perf_counter()
            out = e.generate("Some words:", params)
            results[name] = (time.perf_counter() - t0, out)

        slow = threading.Thread(
            target=run, args=("slow", {"max_new_tokens": 40, "temperature": 0, "regex": SLOW_REGEX})
        )
        slow.start()
        time.sleep(0.1)
        run("free", {"max_new_tokens": 8, "temperature": 0})
        assert "slow" not in results  # the grammar is still compiling
        slow.join(120)
    (free_s, free), (slow_s, constrained) = results["free"], results["slow"]
    assert free["meta_info"]["completion_tokens"] == 8
    assert free_s < 1.5 < slow_s, (free_s, slow_s)
    assert re.fullmatch(SLOW_REGEX, constrained["text"]), constrained["text"]


def test_grammar_compile_timeout_fails_only_that_request(tiny_chat_model_dir):
    with Engine(
        str(tiny_chat_model_dir),
        max_total_tokens=4096,
        grammar_backend="outlines",
        grammar_compile_timeout=2.0,
    ) as e:
        # outlines takes minutes on this one (209 s measured)
        out = e.generate("x", {"max_new_tokens": 4, "regex": r"(\w{1,30}\s){1,30}"})
        reason = out["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "timed out after 2s" in reason["message"]
        assert e.generate("x", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
        # The runaway build was killed: the next outlines compile does not wait behind it.
        t0 = time.perf_counter()
        out = e.generate("x", {"max_new_tokens": 3, "temperature": 0, "regex": "[0-9]{3}"})
        assert re.fullmatch("[0-9]{3}", out["text"]) and time.perf_counter() - t0 < 5


@pytest.mark.parametrize(
    ("text", "inside"),
    [('{"a":"x', True), ('{"a":"x"', False), ('{"a":"x\\"y', True), ('{"a":"x\\\\"', False),
     ('{"a":[1,2', False), ('{"a":"}{', True)],
)  # fmt: skip
def test_json_lexer_knows_when_it_is_inside_a_string(text, inside):
    from smallm.runtime.scheduler.json_closing import inside_string

    assert inside_string(text) is inside
