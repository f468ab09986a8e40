"""The grammar layer of constrained decoding, without a model: decoding is simulated by walking
random allowed tokens from each grammar's bitmask and checking what comes out."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from smallm.runtime.constrained import (
    GrammarBackend,
    GrammarCompiler,
    GrammarError,
    backend_for,
    create_grammar_backend,
    get_token_vocabulary,
)
from smallm.runtime.constrained.base import Grammar
from smallm.runtime.constrained.jump_forward import JumpForwardMap
from smallm.runtime.constrained.regex_utils import integer_range_regex, json_string_pattern
from smallm.runtime.sampling.batch_info import (
    apply_token_bitmask_,
    bitmask_words,
    pack_token_bitmask,
)

BACKENDS = ("outlines", "llguidance")
TOKENIZER_VOCAB = 49152
# The model's vocabulary is often padded past the tokenizer's: those ids must never be allowed.
MODEL_VOCAB = TOKENIZER_VOCAB + 64
CORPUS = Path(__file__).parent / "data" / "json_schemas.json"


@pytest.fixture(scope="module")
def backends(default_tokenizer) -> dict[str, GrammarBackend]:
    return {name: create_grammar_backend(name, default_tokenizer, MODEL_VOCAB) for name in BACKENDS}


@pytest.fixture(scope="module")
def compact_backends(default_tokenizer) -> dict[str, GrammarBackend]:
    return {
        name: create_grammar_backend(name, default_tokenizer, MODEL_VOCAB, whitespace_pattern="")
        for name in BACKENDS
    }


# --------------------------------------------------------------------------- the walker


class Walker:
    """Simulated decoding: a seeded random walk over allowed tokens.

    The first ``explore`` steps pick uniformly among all allowed tokens (long random tokens
    included); then the walk steers towards the end: EOS whenever allowed, a closing quote
    whenever allowed, and otherwise single-byte tokens weighted towards punctuation, so that
    strings, numbers and containers get closed.
    """

    def __init__(self, backend: GrammarBackend) -> None:
        self.vocab = backend.vocab
        self.eos = np.array(self.vocab.eos_token_ids)
        singles = [i for i, b in enumerate(self.vocab.token_bytes) if b is not None and len(b) == 1]
        self.single_ids = np.array(singles)
        # Finishing profiles (closer, other punctuation, alphanumeric) weights: a walk that did
        # not finish is retried with the next profile (e.g. RFC email local parts allow "}").
        kinds = []
        for i in singles:
            b = self.vocab.token_bytes[i]
            if b in (b"}", b"]"):
                kinds.append(0)
            elif b == b" ":
                kinds.append(3)
            elif b.isalnum() or b[0] >= 0x80:
                kinds.append(2)
            else:
                kinds.append(1)
        profiles = [(30.0, 3.0, 1.0, 0.1), (1.0, 1.0, 1.0, 0.1), (3.0, 10.0, 1.0, 0.1)]
        self.profiles = [np.array([p[k] for k in kinds]) for p in profiles]
        self.quote = self.vocab.byte_token_ids[ord('"')]
        self.buf = torch.zeros(1, bitmask_words(MODEL_VOCAB), dtype=torch.int32)

    def allowed(self, grammar: Grammar) -> np.ndarray:
        grammar.fill_bitmask(self.buf, 0)
        bits = np.unpackbits(self.buf[0].numpy().view(np.uint8), bitorder="little")
        assert not bits[TOKENIZER_VOCAB:].any(), "an id past the tokenizer's vocabulary is allowed"
        return bits[:MODEL_VOCAB].astype(bool)

    def walk(
        self,
        grammar: Grammar,
        rng: random.Random,
        explore: int = 10,
        max_steps: int = 160,
        tokenizer=None,
        profile: int = 0,
    ) -> tuple[str, bool]:
        """Returns (text, finished). With ``tokenizer``, forced strings are applied as a
        scheduler would: tokenize the jump-forward text and accept those tokens."""
        ids: list[int] = []
        for step in range(max_steps):
            if tokenizer is not None:
                forced = grammar.jump_forward()
                if forced:
                    forced_ids = tokenizer.encode(forced, add_special_tokens=False)
                    assert grammar.accept_tokens(forced_ids), repr(forced)
                    ids += forced_ids
            bits = self.allowed(grammar)
            eos_ok = bool(bits[self.eos].any())
            bits[self.eos] = False
            cands = np.flatnonzero(bits)
            if eos_ok and (not len(cands) or step >= explore or rng.random() < 0.2):
                assert grammar.accept_token(int(self.eos[0]))
                assert grammar.is_terminated()
                return self.vocab.decode(ids).decode("utf-8"), True
            assert len(cands), f"dead end after {self.vocab.decode(ids)!r}"
            tok = None
            if step >= explore:
                if self.quote is not None and bits[self.quote]:
                    tok = self.quote
                else:
                    ok = bits[self.single_ids]
                    if ok.any():
                        ids_ok, w = self.single_ids[ok], self.profiles[profile][ok]
                        tok = int(rng.choices(ids_ok.tolist(), weights=w.tolist())[0])
            if tok is None:
                tok = int(cands[rng.randrange(len(cands))])
            assert grammar.accept_token(tok), tok
            ids.append(tok)
        return self.vocab.decode(ids).decode("utf-8", "replace"), False


@pytest.fixture(scope="module")
def walkers(backends) -> dict[str, Walker]:
    return {name: Walker(be) for name, be in backends.items()}


def _walk_outputs(walker: Walker, grammar: Grammar, n: int, seed: int = 0, **kw) -> list[str]:
    rng = random.Random(seed)
    outs = []
    for _ in range(n):
        for profile in range(len(walker.profiles)):
            text, finished = walker.walk(grammar.copy(), rng, profile=profile, **kw)
            if finished:
                break
        assert finished, f"walk did not finish: {text!r}"
        outs.append(text)
    return outs


# --------------------------------------------------------------------------- vocabulary


def test_byte_level_vocabulary(default_tokenizer):
    vocab = get_token_vocabulary(default_tokenizer, MODEL_VOCAB)
    assert vocab is get_token_vocabulary(default_tokenizer, MODEL_VOCAB)  # cached per tokenizer
    assert len(vocab.token_bytes) == vocab.vocab_size == MODEL_VOCAB
    assert vocab.eos_token_ids == (default_tokenizer.eos_token_id,)
    for special in default_tokenizer.all_special_ids:
        assert vocab.token_bytes[special] is None
    assert all(b is None for b in vocab.token_bytes[TOKENIZER_VOCAB:])
    (new_york,) = default_tokenizer.encode(" New", add_special_tokens=False)
    assert vocab.token_bytes[new_york] == b" New"
    # Partial UTF-8 tokens keep their raw bytes (decoding them to str would give U+FFFD).
    partial = [b for b in vocab.token_bytes if b is not None and not _is_utf8(b)]
    assert len(partial) > 100
    # Single-byte tokens (for advancing grammars by text): all printable ASCII and UTF-8 bytes
    # in common use; SmolLM2 lacks a few control bytes and never-valid bytes (0xC0, 0xF5...).
    assert all(vocab.byte_token_ids[b] is not None for b in [9, 10, 13, *range(32, 192)])
    text = "héllo, 日本 1.5"
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    assert vocab.decode(ids) == text.encode()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_sentencepiece_vocabulary():
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok in ["▁", "a", "b", "▁a", "▁ab", "ab"]:
        vocab[tok] = len(vocab)
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b")]
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    tk = Tokenizer(model)
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    v = get_token_vocabulary(tok)
    assert v.token_bytes[:3] == [None, None, None]
    assert v.token_bytes[3 + 0x0A] == b"\n"
    assert v.token_bytes[vocab["▁ab"]] == b" ab"
    assert v.token_bytes[vocab["▁"]] == b" "
    assert v.decode(tok.encode("ab ab\n", add_special_tokens=False)) == b" ab ab\n"


# --------------------------------------------------------------------------- bitmask layout


@pytest.mark.parametrize("name", BACKENDS)
def test_bitmask_matches_sampler_layout(backends, name):
    grammar = backends[name].compile("regex", r"[0-9]{2}")
    allowed = set(grammar.allowed_token_ids())
    assert allowed and all(i < TOKENIZER_VOCAB for i in allowed)
    # Row 1 of a 3-row mask; the other rows are untouched.
    mask = torch.full((3, bitmask_words(MODEL_VOCAB)), -1, dtype=torch.int32)
    grammar.fill_bitmask(mask, 1)
    assert (mask[0] == -1).all() and (mask[2] == -1).all()
    expected = torch.zeros(1, MODEL_VOCAB, dtype=torch.bool)
    expected[0, sorted(allowed)] = True
    assert torch.equal(mask[1:2], pack_token_bitmask(expected))
    logits = torch.zeros(1, MODEL_VOCAB)
    apply_token_bitmask_(logits, mask[1:2])
    assert set(torch.isfinite(logits[0]).nonzero().view(-1).tolist()) == allowed


# --------------------------------------------------------------------------- regexes

REGEXES = {
    "ipv4": r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)",
    "date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
    "email": r"[a-z0-9._]{1,12}@[a-z0-9]{1,8}\.(com|org|net)",
    "number": r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?",
    "anchored_words": r"^(cat|dog)s?( and (cat|dog)s?)*$",
}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("rx", sorted(REGEXES))
def test_regex_walks_fullmatch(backends, walkers, name, rx):
    grammar = backends[name].compile("regex", REGEXES[rx])
    pattern = REGEXES[rx].strip("^$")
    for text in _walk_outputs(walkers[name], grammar, 4, seed=hash(rx) % 1000):
        assert re.fullmatch(pattern, text, flags=re.ASCII), text


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("text", ["1.5", "-0.25e3", "10.05", "0", "-7e+2"])
def test_number_producible_as_tokenized(backends, default_tokenizer, name, text):
    """outlines-core drops a token when the text before its last byte is a full match but the
    text after is not (``.`` after ``1``): the tokenizer's own split must still be accepted."""
    grammar = backends[name].compile("regex", REGEXES["number"])
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 1 or text == "0"
    for tok in ids:
        assert tok in grammar.allowed_token_ids()
        assert grammar.accept_token(tok)
    assert grammar.is_accepting()
    assert grammar.accept_token(default_tokenizer.eos_token_id)
    assert grammar.is_terminated()


@pytest.mark.parametrize("name", BACKENDS)
def test_optional_suffix_after_match(backends, default_tokenizer, name):
    # "axc" tokenizes as "ax" "c": "a" is a match, "ax" is not; outlines-core alone drops "ax".
    grammar = backends[name].compile("regex", "a(xc)?")
    assert grammar.accept_tokens(default_tokenizer.encode("axc", add_special_tokens=False))
    assert grammar.is_accepting()


def test_unicode_digit_classes_are_ascii(backends):
    grammar = backends["outlines"].compile("regex", r"\d{3}-\d{4}")
    assert grammar.regex == "[0-9]{3}-[0-9]{4}"
    assert not grammar.accept_string("\u0663")  # ARABIC-INDIC DIGIT THREE
    assert grammar.accept_string("123-")


# --------------------------------------------------------------------------- EOS, copy, errors


@pytest.mark.parametrize("name", BACKENDS)
def test_eos_only_in_accepting_states(backends, default_tokenizer, name):
    eos = default_tokenizer.eos_token_id
    grammar = backends[name].compile("regex", "ab|abcd")
    assert eos not in grammar.allowed_token_ids()
    assert not grammar.accept_token(eos)
    (z,) = default_tokenizer.encode("z", add_special_tokens=False)
    assert not grammar.accept_token(z)  # disallowed: refused, state unchanged
    assert not grammar.accept_token(MODEL_VOCAB - 1)  # padding id past the tokenizer
    assert not grammar.accept_token(default_tokenizer.convert_tokens_to_ids("<|im_start|>"))
    assert grammar.accept_string("ab")
    assert grammar.is_accepting() and eos in grammar.allowed_token_ids()
    assert grammar.accept_string("c")
    assert not grammar.is_accepting() and eos not in grammar.allowed_token_ids()
    assert not grammar.accept_token(eos)
    assert grammar.accept_string("d")
    assert grammar.allowed_token_ids() == [eos]
    assert grammar.accept_token(eos) and grammar.is_terminated()
    assert grammar.allowed_token_ids() == [eos]
    assert not grammar.accept_token(z)


@pytest.mark.parametrize("name", BACKENDS)
def test_copy_is_independent(backends, name):
    grammar = backends[name].compile("regex", "(ab)+")
    a, b = grammar.copy(), grammar.copy()
    assert a.accept_string("abab")
    assert a.is_accepting() and not b.is_accepting()
    assert b.accept_string("a") and not b.is_accepting()
    assert a.is_accepting()
    assert grammar.copy().allowed_token_ids() == b.copy().allowed_token_ids()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(
    ("kind", "spec", "needle"),
    [
        ("regex", "a(b", "regex"),
        ("regex", "[z-a]", "regex"),
        ("json_schema", "{not json", "not valid JSON"),
        ("json_schema", '{"type": "array", "uniqueItems": true}', "uniqueItems"),
        ("json_schema", '{"not": {"type": "string"}}', "not"),
        (
            "json_schema",
            '{"type": "object", "dependentRequired": {"a": ["b"]}}',
            "dependentRequired",
        ),
        ("json_schema", '{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}', "nope"),
        ("choices", '["a", 1]', "list of strings"),
        ("choices", "[]", "list of strings"),
    ],
)
def test_invalid_specs_raise(backends, name, kind, spec, needle):
    with pytest.raises(GrammarError, match=re.escape(needle)):
        backends[name].compile(kind, spec)


def test_outlines_rejections_name_the_keyword(backends):
    be = backends["outlines"]
    cases = {
        '{"type": "integer", "multipleOf": 3}': "multipleOf",
        '{"type": "string", "format": "hostname"}': "'format' with value 'hostname'",
        '{"type": "string", "pattern": "^a+$", "maxLength": 3}': "'pattern'",
        '{"oneOf": [{"type": "integer"}, {"type": "number"}]}': "oneOf",
        '{"type": "number", "minimum": -1.5}': "'minimum'",
        '{"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"}': "recursive $ref",
        '{"type": "string", "pattern": "(?=a)b"}': "lookaround",
    }
    for spec, needle in cases.items():
        with pytest.raises(GrammarError, match=re.escape(needle)):
            be.compile("json_schema", spec)
    with pytest.raises(GrammarError, match="llguidance"):
        be.compile("ebnf", 'root ::= "a"')


def test_llguidance_rejections_carry_its_message(backends):
    with pytest.raises(GrammarError, match="Unknown format"):
        backends["llguidance"].compile("json_schema", '{"type": "string", "format": "no-such"}')
    with pytest.raises(GrammarError, match="oneOf"):
        backends["llguidance"].compile(
            "json_schema", '{"oneOf": [{"type": "integer"}, {"type": "number"}]}'
        )


@pytest.mark.parametrize(
    "spec",
    [
        'start: "a" (',  # Lark syntax error
        'root ::= "a" (',  # GBNF syntax error
        "start: undefined_rule",
    ],
)
def test_invalid_ebnf_raises(backends, spec):
    with pytest.raises(GrammarError) as info:
        backends["llguidance"].compile("ebnf", spec)
    assert len(str(info.value)) > 20


@pytest.mark.parametrize(
    "spec",
    [
        'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no" | /[0-9]+/',
        'root ::= "The answer is " answer "."\nanswer ::= "yes" | "no" | [0-9]+',
    ],
)
def test_ebnf_walks(backends, walkers, spec):
    grammar = backends["llguidance"].compile("ebnf", spec)
    assert grammar.jump_forward() == "The answer is "
    for text in _walk_outputs(walkers["llguidance"], grammar, 3):
        assert re.fullmatch(r"The answer is (yes|no|[0-9]+)\.", text), text


def test_ebnf_context_free(backends, walkers):
    grammar = backends["llguidance"].compile("ebnf", 'start: "(" start ")" | "x"')
    for text in _walk_outputs(walkers["llguidance"], grammar, 3):
        depth = text.index("x")
        assert text == "(" * depth + "x" + ")" * depth


# --------------------------------------------------------------------------- choices


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(
    "choices",
    [["a", "ab", "abc"], ["New York", "New Jersey"], ["yes", "no", "maybe (?)", "日本"]],
)
def test_choices(backends, walkers, default_tokenizer, name, choices):
    grammar = backends[name].compile("choices", json.dumps(choices))
    for text in _walk_outputs(walkers[name], grammar, 4, explore=2):
        assert text in choices
    for choice in choices:
        g = grammar.copy()
        assert g.accept_tokens(default_tokenizer.encode(choice, add_special_tokens=False))
        assert g.is_accepting()
    g = grammar.copy()
    assert g.accept_string(choices[0][:1])
    assert g.is_accepting() == (choices[0][:1] in choices)


# --------------------------------------------------------------------------- JSON schemas

_DATE_TIME = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-](\d\d):(\d\d))$"
)
_HOST_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _check_date_time(value: str) -> bool:
    m = _DATE_TIME.match(value)
    if not m:
        return False
    y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
    ok = dt.date(y, mo, d) and h < 24 and mi < 60 and s <= 60
    return bool(ok) and (m.group(9) is None or (int(m.group(9)) < 24 and int(m.group(10)) < 60))


def _format_checker() -> jsonschema.FormatChecker:
    # jsonschema only checks date-time/time/hostname/uri with optional packages: check them here.
    checker = jsonschema.FormatChecker(
        formats=jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers
    )
    checker.checks("date-time", raises=(ValueError,))(_check_date_time)
    checker.checks("time", raises=(ValueError,))(lambda v: _check_date_time("2000-01-01T" + v))
    checker.checks("hostname")(
        lambda v: len(v) <= 253 and all(_HOST_LABEL.match(p) for p in v.split("."))
    )
    checker.checks("uri")(lambda v: re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:\S*$", v) is not None)
    return checker


FORMAT_CHECKER = _format_checker()


def _validate(text: str, schema) -> None:
    value = json.loads(text)
    jsonschema.validate(value, schema, format_checker=FORMAT_CHECKER)


def _corpus() -> list[dict]:
    return json.loads(CORPUS.read_text())


def test_corpus_is_large_and_valid():
    corpus = _corpus()
    assert len(corpus) >= 60
    assert len({e["name"] for e in corpus}) == len(corpus)
    for entry in corpus:
        jsonschema.Draft202012Validator.check_schema(entry["schema"])


_KEYWORDS = [
    *("uniqueItems", "contains", "oneOf", "anyOf", "allOf", "multipleOf", "minProperties"),
    *("maxProperties", "dependentRequired", "patternProperties", "format", "pattern"),
    *("minimum", "maximum", "exclusiveMinimum", "$ref", "minLength", "maxLength", "minItems"),
    *("maxItems", "enum", "const", "additionalProperties", "required", "prefixItems"),
]


def _names_keyword(message: str) -> bool:
    if re.search(r"""['"](not|if|then|else)['"]""", message):
        return True
    return any(re.search(rf"(?<![A-Za-z]){re.escape(k)}(?![A-Za-z])", message) for k in _KEYWORDS)


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_json_schema_corpus(backends, walkers, name, capsys):
    """Every corpus schema either compiles and all its walks validate, or is rejected with a
    GrammarError that names the keyword (or the reason) it cannot enforce."""
    backend, walker = backends[name], walkers[name]
    accepted, rejected, compile_s = [], {}, []
    for i, entry in enumerate(_corpus()):
        spec = json.dumps(entry["schema"])
        t0 = time.perf_counter()
        try:
            grammar = backend.compile("json_schema", spec)
        except GrammarError as e:
            assert _names_keyword(str(e)), f"{entry['name']}: rejection names no keyword: {e}"
            rejected[entry["name"]] = str(e)
            continue
        compile_s.append(time.perf_counter() - t0)
        for text in _walk_outputs(walker, grammar, 3, seed=i):
            try:
                _validate(text, entry["schema"])
            except Exception as e:
                raise AssertionError(f"{entry['name']}: {text!r} is invalid: {e}") from None
        accepted.append(entry["name"])
    total = len(accepted) + len(rejected)
    with capsys.disabled():
        print(
            f"\n[{name}] json_schema corpus: {len(accepted)}/{total} compiled "
            f"({100 * len(accepted) / total:.0f}%), median compile "
            f"{1000 * sorted(compile_s)[len(compile_s) // 2]:.1f} ms, max {1000 * max(compile_s):.0f} ms; "
            f"rejected: {', '.join(sorted(rejected))}"
        )
    # Both engines handle the everyday schemas; these must never be rejected.
    for must in ("person_fixed", "array_min_max", "enum_in_object", "format_datetime", "ref_defs"):
        assert must in accepted
    assert len(accepted) / total > 0.75


@pytest.mark.parametrize("name", BACKENDS)
def test_json_formats_and_bounds(backends, walkers, name):
    schema = {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "when": {"type": "string", "format": "date-time"},
            "day": {"type": "string", "format": "date"},
            "mail": {"type": "string", "format": "email"},
            "age": {"type": "integer", "minimum": 18, "exclusiveMaximum": 65},
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "code": {"type": "string", "pattern": "^[A-Z]{2}\\d{2}$"},
        },
        "required": ["id", "when", "day", "mail", "age", "score", "code"],
        "additionalProperties": False,
    }
    grammar = backends[name].compile("json_schema", json.dumps(schema))
    for text in _walk_outputs(walkers[name], grammar, 3, seed=7, max_steps=400):
        _validate(text, schema)


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("name", BACKENDS)
def test_jump_forward_fixed_keys(backends, compact_backends, walkers, default_tokenizer, name):
    grammar = backends[name].compile("json_schema", json.dumps(PERSON))
    assert grammar.jump_forward() == "{"  # then an optional space: a branch
    compact = compact_backends[name].compile("json_schema", json.dumps(PERSON))
    assert compact.jump_forward() == '{"name":"'
    for g in (grammar, compact):
        for text in _walk_outputs(walkers[name], g, 3, tokenizer=default_tokenizer):
            _validate(text, PERSON)
    # After the name's closing quote, the separator and the next key are forced.
    g = compact.copy()
    assert g.accept_string('{"name":"Ann"')
    assert g.jump_forward() == ',"age":'
    assert g.accept_string(',"age":')
    assert g.jump_forward() is None  # a digit or '-' comes next


def test_jump_forward_map_precomputes_forced_strings():
    jf = JumpForwardMap.build(r'\{"k":(true|false)\}')
    tracker = jf.tracker()
    assert tracker.forced() == '{"k":'
    tracker.feed(b'{"k":t')
    assert tracker.forced() == "rue}"
    tracker = jf.tracker()
    tracker.feed(b"{" + b'"k\xc3')  # a split UTF-8 character: nothing is forced mid-char
    assert tracker.forced() is None
    lost = jf.tracker()
    lost.feed(b"x")
    assert lost.state is None and lost.forced() is None


@pytest.mark.parametrize("name", BACKENDS)
def test_accept_string_is_tokenization_independent(backends, default_tokenizer, name):
    grammar = backends[name].compile("json_schema", json.dumps(PERSON))
    by_text, by_tokens = grammar.copy(), grammar.copy()
    doc = '{"name": "Zoë", "age": 41}'
    assert by_text.accept_string(doc)
    assert by_tokens.accept_tokens(default_tokenizer.encode(doc, add_special_tokens=False))
    assert by_text.is_accepting() and by_tokens.is_accepting()
    assert by_text.allowed_token_ids() == by_tokens.allowed_token_ids()
    assert not grammar.copy().accept_string('{"nam": 1}')


# --------------------------------------------------------------------------- regex helpers


@pytest.mark.parametrize(
    ("lo", "hi"), [(0, 120), (-40, 55), (18, None), (None, -5), (7, 7), (-1000, -999), (95, 1234)]
)
def test_integer_range_regex(lo, hi):
    rx = re.compile(integer_range_regex(lo, hi))
    for n in range(-1300, 1300):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(rx.fullmatch(str(n))) == inside, n
    assert not rx.fullmatch("-0") and not rx.fullmatch("007")


def test_json_string_pattern_never_breaks_json():
    rx = re.compile(json_string_pattern("^a.b[^x]c\\S\\s\\d$"))
    assert rx.fullmatch('"a-b-c- 1"')
    for bad in ('"a"b-c- 1"', '"a\\b-c- 1"', '"a-b"c- 1"', '"a-b-c-\t1"'):
        assert not rx.fullmatch(bad)
    assert re.fullmatch(json_string_pattern('^say "hi"$'), '"say \\"hi\\""')


# --------------------------------------------------------------------------- registry, compiler


def test_registry(default_tokenizer):
    with pytest.raises(ValueError, match="unknown grammar backend"):
        create_grammar_backend("xgrammar", default_tokenizer, MODEL_VOCAB)
    assert backend_for("json_schema") == "llguidance"
    assert backend_for("regex") == backend_for("choices") == "outlines"
    assert backend_for("ebnf", "outlines") == "llguidance"
    assert backend_for("regex", "llguidance") == "llguidance"
    with pytest.raises(GrammarError):
        backend_for("yaml")


class _SlowBackend(GrammarBackend):
    name = "slow"

    def __init__(self, inner: GrammarBackend, delay: float) -> None:
        self.inner, self.delay, self.calls = inner, delay, 0

    def compile(self, kind: str, spec: str) -> Grammar:
        self.calls += 1
        time.sleep(self.delay)
        return self.inner.compile(kind, spec)


def test_grammar_compiler_cache_and_copies(backends):
    slow = _SlowBackend(backends["llguidance"], 0.2)
    compiler = GrammarCompiler({"slow": slow, "llguidance": backends["llguidance"]})
    try:
        t0 = time.perf_counter()
        handle = compiler.submit("slow", "regex", "(ab)+")
        assert time.perf_counter() - t0 < 0.05  # submit never blocks
        assert not handle.done()
        while not handle.done():
            time.sleep(0.01)
        first = handle.result()
        t0 = time.perf_counter()
        again = compiler.submit("slow", "regex", "(ab)+")
        assert again.done()
        second = again.result()
        assert time.perf_counter() - t0 < 0.05 and slow.calls == 1
        assert compiler.hits == 1 and compiler.misses == 1
        assert first is not second
        assert first.accept_string("ab") and first.is_accepting()
        assert not second.is_accepting()
        # A spec error comes out of result(), and is cached too.
        bad = compiler.submit("llguidance", "regex", "a(b")
        with pytest.raises(GrammarError, match="regex"):
            bad.result()
        with pytest.raises(GrammarError, match="regex"):
            compiler.submit("llguidance", "regex", "a(b").result()
        with pytest.raises(GrammarError, match="not available"):
            compiler.submit("nope", "regex", "a").result()
    finally:
        compiler.shutdown()


def test_a_slow_backend_does_not_hold_up_another(backends):
    slow = _SlowBackend(backends["llguidance"], 1.0)
    compiler = GrammarCompiler({"slow": slow, "llguidance": backends["llguidance"]})
    try:
        stuck = compiler.submit("slow", "regex", "(ab)+")
        t0 = time.perf_counter()
        fast = compiler.submit("llguidance", "json_schema", '{"type": "integer"}')
        assert fast.result().accept_string("12")
        assert time.perf_counter() - t0 < 0.5 and not stuck.done()
    finally:
        compiler.shutdown()


def test_grammar_compiler_timeout(backends):
    slow = _SlowBackend(backends["llguidance"], 0.5)
    compiler = GrammarCompiler({"slow": slow}, timeout_s=0.1)
    try:
        handle = compiler.submit("slow", "regex", "x+")
        assert not handle.done()
        time.sleep(0.15)
        assert handle.done()
        with pytest.raises(GrammarError, match=r"timed out after 0\.1s"):
            handle.result()
        # The compilation finished in the background and serves later requests from the cache.
        time.sleep(0.5)
        assert compiler.submit("slow", "regex", "x+").result().accept_string("xx")
        assert slow.calls == 1
    finally:
        compiler.shutdown()


def test_grammar_compiler_lazy_backend_and_threads(backends):
    built = []

    def factory():
        built.append(threading.current_thread().name)
        return backends["outlines"]

    compiler = GrammarCompiler({"outlines": factory})
    try:
        grammar = compiler.compile("outlines", "choices", '["x", "y"]')
        assert built and built[0].startswith("grammar")
        assert grammar.accept_string("y") and grammar.is_accepting()
    finally:
        compiler.shutdown()


class _BrokenBackend(GrammarBackend):
    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    def compile(self, kind: str, spec: str) -> Grammar:
        self.calls += 1
        raise RuntimeError("boom")


def test_grammar_compiler_unexpected_errors_are_not_cached():
    broken = _BrokenBackend()
    compiler = GrammarCompiler({"broken": broken})
    try:
        for _ in range(2):
            handle = compiler.submit("broken", "regex", "a")
            with pytest.raises(GrammarError, match="RuntimeError: boom"):
                handle.result()
        assert broken.calls == 2
    finally:
        compiler.shutdown()


def test_a_runaway_outlines_compile_is_killed_and_the_next_one_works(default_tokenizer):
    from smallm.runtime.constrained.outlines_backend import OutlinesBackend

    backend = OutlinesBackend(default_tokenizer, 49152, build_timeout_s=2.0)
    first = backend._index_worker._proc
    t0 = time.perf_counter()
    # Takes outlines minutes (209 s measured) to compile.
    with pytest.raises(GrammarError, match="longer than 2s; stopped"):
        backend.compile("regex", r"(\w{1,30}\s){1,30}")
    assert time.perf_counter() - t0 < 10
    assert first.poll() is not None  # killed, not left running
    t0 = time.perf_counter()
    grammar = backend.compile("regex", r"[0-9]{3}-[0-9]{4}")  # a fresh child, already booted
    assert time.perf_counter() - t0 < 3
    assert grammar.accept_string("555-1234") and grammar.is_accepting()
    with pytest.raises(GrammarError, match="regex"):
        backend.compile("regex", "(a|")  # a spec error from the child comes back as usual
    worker = backend._index_worker._proc
    backend._index_worker.close()
    assert worker.poll() is not None
