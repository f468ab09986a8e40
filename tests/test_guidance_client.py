"""guidance 0.3.x against the server (regex, select, JSON, grammar).

guidance 0.3.1 pins llguidance 1.5, older than the 1.9 the runtime needs, so it cannot live in
the test venv: the test runs ``tests/clients/guidance_driver.py`` with a Python of its own,
``$SMALLM_GUIDANCE_PYTHON`` if set, else a venv it builds once under the smallm cache
(``<cache>/clients/guidance``: ``pip install guidance==0.3.1 openai``, ~1 min)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema

from smallm.runtime.model.default_model import cache_dir

DRIVER = Path(__file__).parent / "clients" / "guidance_driver.py"
PACKAGES = ["guidance==0.3.1", "openai"]


def _guidance_python() -> str:
    explicit = os.environ.get("SMALLM_GUIDANCE_PYTHON")
    if explicit:
        return explicit
    venv = cache_dir() / "clients" / "guidance"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *PACKAGES],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert pip.returncode == 0, f"installing {PACKAGES} failed:\n{pip.stderr[-3000:]}"
        stamp.touch()
    return str(python)


def test_guidance_models(default_server):
    run = subprocess.run(
        [_guidance_python(), str(DRIVER), default_server.url],
        capture_output=True,
        text=True,
        timeout=600,
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
