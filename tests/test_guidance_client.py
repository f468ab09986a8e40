"""guidance 0.3.x against the server (regex, select, JSON, grammar).

guidance 0.3.1 pins llguidance 1.5, older than the 1.9 the runtime needs, so it cannot live in
the test venv: set ``SMALLM_GUIDANCE_PYTHON`` to a Python that has ``guidance`` and ``openai``
(``python -m venv g && g/bin/pip install guidance==0.3.1 openai``); the test runs
``tests/clients/guidance_driver.py`` with it, otherwise it is skipped."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest

PYTHON = os.environ.get("SMALLM_GUIDANCE_PYTHON")
DRIVER = Path(__file__).parent / "clients" / "guidance_driver.py"


@pytest.mark.skipif(not PYTHON, reason="set SMALLM_GUIDANCE_PYTHON to a Python with guidance")
def test_guidance_models(default_server):
    run = subprocess.run(
        [PYTHON, str(DRIVER), default_server.url], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    out, schema = report["results"], report["schema"]
    for name in ("sglang", "vllm"):
        assert re.fullmatch("[0-9]{3}", out[f"{name}/regex"]), out
        assert out[f"{name}/select"] in ("red", "green", "blue"), out
        jsonschema.validate(json.loads(out[f"{name}/json"]), schema)
        assert re.fullmatch("[0-9]{2}", out[f"{name}/grammar"]), out
    # guidance's plain OpenAI model sends only response_format: JSON works, the rest is
    # refused by guidance itself before any request.
    jsonschema.validate(json.loads(out["openai/json"]), schema)
    assert all(out[f"openai/{k}"].startswith("ERROR") for k in ("regex", "select", "grammar"))
