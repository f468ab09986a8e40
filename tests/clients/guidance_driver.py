"""Drives a smallm server with guidance 0.3.x; run by tests/test_guidance_client.py in an
environment that has guidance (it pins llguidance 1.5, older than the runtime's, so it cannot
share the test venv). Prints one JSON object: what each guidance model class produced."""

from __future__ import annotations

import json
import sys

from guidance import assistant, gen, models, select, user
from guidance import json as gjson

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def main(url: str) -> None:
    out: dict[str, str] = {}
    classes = {
        "sglang": models.experimental.SglangModel,  # regex / ebnf extras, response_format
        "vllm": models.experimental.VLLMModel,  # guided_grammar + structured_outputs.grammar
        "openai": models.OpenAI,  # response_format only
    }
    for name, cls in classes.items():
        m = cls("default", base_url=url + "/v1", api_key="x")
        for kind in ("regex", "select", "json", "grammar"):
            try:
                with user():
                    lm = m + "A three digit number, a colour, or a JSON person."
                with assistant():
                    if kind == "regex":
                        lm += gen("x", regex="[0-9]{3}", max_tokens=10, temperature=0)
                    elif kind == "select":
                        lm += select(["red", "green", "blue"], name="x")
                    elif kind == "json":
                        lm += gjson("x", schema=SCHEMA, max_tokens=100, temperature=0)
                    else:
                        lm += "Number: " + gen("x", regex="[0-9]{2}", max_tokens=5) + " done"
                out[f"{name}/{kind}"] = lm["x"]
            except Exception as e:  # reported; the test decides what must work
                out[f"{name}/{kind}"] = f"ERROR {type(e).__name__}"
    print(json.dumps({"schema": SCHEMA, "results": out}))


if __name__ == "__main__":
    main(sys.argv[1])
