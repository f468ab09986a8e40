"""examples/extract_json.py end to end, as a user runs it: a subprocess over a small JSONL file
with the tiny random chat model (its text is gibberish; only the schema makes it valid JSON)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "extract_json.py"

# Enums, booleans and bounded integers: a random model finishes these in a few tokens.
SCHEMA = {
    "type": "object",
    "properties": {"adult": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
    "required": ["adult", "size"],
    "additionalProperties": False,
}

PEOPLE = [
    "Ana, 31, is a pilot in Lisbon.",
    "Bo is a 9-year-old pupil in Oslo.",
    "Chen (45) runs a bakery in Taipei.",
    "Dara, 70, a retired judge, lives in Dublin.",
    "Eli is a 19-year-old student in Haifa.",
]


def run_extract(model_dir: Path, *args: str | Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--model-path",
        str(model_dir),
        "--max-new-tokens",
        "40",
        "--max-total-tokens",
        "4096",
        *map(str, args),
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(PEOPLE))
    )
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    return docs, schema


def check_outputs(records: list[dict], schema: dict) -> None:
    for rec in records:
        assert set(rec) == {"id", "output", "valid", "error", "finish_reason", "completion_tokens"}
        if rec["valid"]:
            jsonschema.validate(rec["output"], schema)
            assert rec["error"] is None and rec["finish_reason"] == "stop"
            assert rec["completion_tokens"] > 0
        else:
            assert rec["error"], rec
    # The grammar forces the JSON; only a run into --max-new-tokens could leave one invalid.
    assert sum(r["valid"] for r in records) >= len(records) - 1, records


def test_extract_then_resume_skips_finished_documents(tiny_chat_model_dir, inputs, tmp_path):
    docs, schema = inputs
    out = tmp_path / "out.jsonl"
    args = ("--input", docs, "--output", out, "--schema", schema, "--batch-size", "2")
    r = run_extract(tiny_chat_model_dir, *args)
    assert r.returncode == 0, r.stderr
    records = read_jsonl(out)
    assert [rec["id"] for rec in records] == [f"d{i}" for i in range(5)]
    check_outputs(records, SCHEMA)
    summary = r.stdout.strip().splitlines()[-1]
    assert "skipped 0 already done" in summary and "processed 5" in summary, summary
    assert "tok/s" in summary

    # An interrupted run: two lines written, then half of a third cut off mid-write.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:15])
    r = run_extract(tiny_chat_model_dir, *args)
    assert r.returncode == 0, r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    assert "skipped 2 already done" in summary and "processed 3" in summary, summary
    records = read_jsonl(out)  # every line parses: the partial line was removed
    assert sorted(rec["id"] for rec in records) == [f"d{i}" for i in range(5)]
    check_outputs(records, SCHEMA)


def test_pydantic_model_schema_and_line_number_ids(tiny_chat_model_dir, tmp_path):
    pytest.importorskip("pydantic")
    (tmp_path / "person_models.py").write_text(
        "from typing import Literal\n"
        "from pydantic import BaseModel, ConfigDict, Field\n\n\n"
        "class Person(BaseModel):\n"
        '    model_config = ConfigDict(extra="forbid")\n'
        "    adult: bool\n"
        '    size: Literal["S", "M", "L"]\n'
        "    rating: int = Field(ge=1, le=5)\n"
    )
    docs = tmp_path / "people.jsonl"  # no id field: ids are line numbers
    docs.write_text("".join(json.dumps({"body": t}) + "\n" for t in PEOPLE[:3]))
    out = tmp_path / "out.jsonl"
    r = run_extract(
        tiny_chat_model_dir,
        *("--input", docs, "--output", out, "--text-field", "body"),
        *("--pydantic", f"{tmp_path / 'person_models.py'}:Person"),
    )
    assert r.returncode == 0, r.stderr
    records = read_jsonl(out)
    assert [rec["id"] for rec in records] == [1, 2, 3]
    sys.path.insert(0, str(tmp_path))
    try:
        from person_models import Person  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    check_outputs(records, Person.model_json_schema())
    for rec in records:
        if rec["valid"]:
            Person.model_validate(rec["output"])


def test_unsupported_schema_stops_before_processing(tiny_chat_model_dir, inputs, tmp_path):
    docs, schema = inputs
    schema.write_text(json.dumps({"type": "object", "not": {"required": ["x"]}}))
    out = tmp_path / "out.jsonl"
    r = run_extract(tiny_chat_model_dir, "--input", docs, "--output", out, "--schema", schema)
    assert r.returncode != 0
    assert "the schema cannot be used" in r.stderr and "not" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("schema_text", "message"),
    [
        ("{nope", "is not valid JSON"),
        ('{"type": 5}', "invalid JSON schema"),
    ],
)
def test_bad_schema_files_are_clear_errors(inputs, tmp_path, schema_text, message):
    """Caught before any model is loaded (these runs take well under a second of model time)."""
    docs, schema = inputs
    schema.write_text(schema_text)
    r = run_extract(
        Path("/nonexistent"), "--input", docs, "--output", tmp_path / "o.jsonl", "--schema", schema
    )
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_missing_input_file(tmp_path, inputs):
    _, schema = inputs
    r = run_extract(
        Path("/nonexistent"),
        "--input",
        tmp_path / "no.jsonl",
        "--output",
        tmp_path / "o.jsonl",
        "--schema",
        schema,
    )
    assert r.returncode == 2
    assert "input file not found" in r.stderr and "Traceback" not in r.stderr, r.stderr
