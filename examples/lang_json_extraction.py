"""Structured extraction with a pydantic model: one JSON object per document of a JSONL file.

``sl.gen("json", json_schema=Person)`` turns the pydantic model's JSON schema into a grammar
that masks every token the model could write, so each finished output parses and has the
model's fields and types. The documents run through ``run_batch`` (concurrently, with a
progress bar); every output is checked with ``Person.model_validate_json`` and written as one
line of the output file:

    {"id": "p1", "person": {"name": ..., "age": ..., ...} | null, "valid": true, "error": null}

The instruction comes before the document, so every program shares that prefix and the
server's prefix cache computes it once. (The model is tiny: it copies names and cities well and
is often wrong about ages; the schema guarantees the shape, not the facts.)

Usage (from the repository root; the sample documents are in examples/data/people.jsonl):

    python examples/lang_json_extraction.py                  # the default model, in-process
    python examples/lang_json_extraction.py --url http://127.0.0.1:30000 \\
        --input examples/data/people.jsonl --output people.persons.jsonl --limit 4

Each input line is a JSON object with an "id" and a "text". Without ``--url`` the default model
(SmolLM2-135M-Instruct) is loaded in this process; with it, the programs run on that smallm or
SGLang server. ``examples/extract_json.py`` is the same job as a complete tool (any schema,
resuming an interrupted run) on the Engine and the HTTP API directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

import smallm as sl

DATA = Path(__file__).resolve().parent / "data" / "people.jsonl"


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=60)
    age: int = Field(ge=0, le=120)
    city: str = Field(min_length=1, max_length=40)
    occupation: str = Field(min_length=1, max_length=40)
    retired: bool


INSTRUCTION = (
    "Extract the person described in the text below as a JSON object with the fields name, "
    "age, city, occupation and retired."
)


@sl.function
def extract_person(s, text, json_tokens=128):
    s += sl.system("You are a helpful assistant.")
    s += sl.user(INSTRUCTION + "\n\nText: " + text)
    s += sl.assistant(sl.gen("json", max_tokens=json_tokens, json_schema=Person))


def make_backend(url: str | None) -> sl.Backend:
    """A server's native API if ``url`` is given, else the default model in this process."""
    return sl.RuntimeEndpoint(url) if url else sl.EngineBackend()


def to_record(doc_id: object, state: sl.ProgramState) -> dict:
    """The output line of one document: the validated person, or why there is none."""
    record: dict = {"id": doc_id, "person": None, "valid": False, "error": None}
    if state.error() is not None:
        record["error"] = f"{type(state.error()).__name__}: {state.error()}"
        return record
    if state.get_meta_info("json")["finish_reason"]["type"] == "length":
        record["error"] = "the token limit cut the JSON short (raise --max-tokens)"
        return record
    try:
        person = Person.model_validate_json(state["json"])
    except ValidationError as e:
        record["error"] = str(e)
        return record
    record.update(person=person.model_dump(), valid=True)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: the default model, in-process)")
    p.add_argument("--input", default=str(DATA), help="JSONL documents with id and text")
    p.add_argument("--output", default="-", help="JSONL results (default: - for stdout)")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per JSON object (128)")
    p.add_argument(
        "--compiled",
        action="store_true",
        help="step-aligned: all documents' gens go to the backend as one batched request",
    )
    args = p.parse_args(argv)

    lines = Path(args.input).read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line) for line in lines if line.strip()][: args.limit]

    backend = make_backend(args.url)
    sl.set_default_backend(backend)
    try:
        states = extract_person.run_batch(
            [{"text": doc["text"], "json_tokens": args.max_tokens} for doc in docs],
            progress_bar=True,
            compiled=args.compiled,
            temperature=0,
        )
        records = [
            to_record(doc.get("id", i + 1), st) for i, (doc, st) in enumerate(zip(docs, states))
        ]
    finally:
        backend.shutdown()

    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    try:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    # The readable summary goes wherever the JSONL does not.
    log = sys.stderr if out is sys.stdout else sys.stdout
    valid = sum(r["valid"] for r in records)
    print(f"{valid}/{len(records)} documents gave a valid Person", file=log)
    for record in records:
        person = record["person"]
        shown = (
            f"{person['name']}, {person['age']}, {person['occupation']} in {person['city']}"
            if person
            else f"error: {record['error']}"
        )
        print(f"  {record['id']}: {shown}", file=log)
    return 0 if valid == len(records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
