"""The language's examples (``examples/lang_*.py``) and every Python snippet of
``docs/language.md``, run against one server on the default model (SmolLM2-135M-Instruct).

Each example's ``main([...])`` is called in this process with ``--url`` and small inputs, and its
printed output is checked. The doc snippets run in order in one namespace, as a reader would run
them, with the doc's server address replaced by the test server's."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import traceback
from pathlib import Path
from types import ModuleType

import pytest

import smallm as sl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DOC = ROOT / "docs" / "language.md"
DOC_URL = "http://127.0.0.1:30000"  # the address the doc's snippets use


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` by path (the examples directory is not a package)."""
    spec = importlib.util.spec_from_file_location(f"smallm_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def url(default_server) -> str:
    return default_server.url


@pytest.fixture(autouse=True)
def keep_default_backend():
    """The examples and snippets set the default backend; leave it as it was."""
    before = sl.get_default_backend()
    yield
    sl.set_default_backend(before)


def run_main(name: str, args: list[str], capsys) -> tuple[str, str]:
    code = load_example(name).main(args)
    out, err = capsys.readouterr()
    assert code == 0, f"{name} exited {code}:\n{out}\n{err}"
    return out, err


# ---- the examples -------------------------------------------------------------------------


def test_quick_start_answers_paris(url, capsys):
    out, _ = run_main("lang_quick_start", ["--url", url], capsys)
    answer = next(line for line in out.splitlines() if line.startswith("A: "))
    assert "Paris" in answer
    assert "finish reason stop" in out
    assert "<|im_start|>assistant\n" in out  # the whole prompt is shown, roles rendered


def test_few_shot_qa_answers_one_line_each(url, capsys, tmp_path):
    out, err = run_main(
        "lang_few_shot_qa", ["--url", url, "--limit", "4", "--max-tokens", "12"], capsys
    )
    lines = out.splitlines()
    assert lines[-1] == "4/4 answered"
    pairs = lines[:-1]
    # Q and A lines alternate: an answer holding a newline would break the pattern.
    assert len(pairs) == 8
    assert all(line.startswith("Q: ") for line in pairs[0::2])
    answers = pairs[1::2]
    assert all(line.startswith("A: ") and line[3:].strip() for line in answers), answers
    assert "Paris" in answers[0]
    assert "4/4" in err  # the progress bar

    questions = tmp_path / "questions.txt"
    questions.write_text("What is the capital of Germany?\n\nWhat colour is grass?\n")
    out, _ = run_main("lang_few_shot_qa", ["--url", url, "--questions", str(questions)], capsys)
    lines = out.splitlines()
    assert lines[-1] == "2/2 answered" and len(lines) == 5
    assert "Berlin" in lines[1]
    compiled, _ = run_main(
        "lang_few_shot_qa", ["--url", url, "--questions", str(questions), "--compiled"], capsys
    )
    assert compiled == out  # the same greedy answers, one request per round


def test_multi_turn_chat_streams_the_same_answers(url, capsys):
    turns = ["What is the capital of France?", "And which country is Berlin the capital of?"]
    args = ["--url", url, "--max-tokens", "16", "--turn", turns[0], "--turn", turns[1]]
    streamed, _ = run_main("lang_multi_turn_chat", [*args, "--stream"], capsys)
    whole, _ = run_main("lang_multi_turn_chat", args, capsys)
    assert streamed == whole
    lines = whole.splitlines()
    assert lines[0] == f"USER: {turns[0]}" and lines[2] == f"USER: {turns[1]}"
    # The second answer depends on the first turn (the three forms of a turn all rendered).
    assert "Paris" in lines[1] and "Germany" in lines[3]
    assert lines[-1] == "5 messages: system, user, assistant, user, assistant"


def test_tree_of_thought_branches_and_chooses(url, capsys):
    args = ["--url", url, "--max-tokens", "12", "--topic", "your bedroom", "--topic", "exercise"]
    out, _ = run_main("lang_tree_of_thought", args, capsys)
    lines = out.splitlines()
    assert lines[0] == "Question: How can I sleep better at night?"
    branches = [i for i, line in enumerate(lines) if line.startswith("Branch ")]
    assert [lines[i].split(":")[0] for i in branches] == [
        "Branch 1 (your bedroom)",
        "Branch 2 (exercise)",
    ]
    for i in branches:  # each branch's nested fork gave an advantage and a problem
        assert lines[i + 1].startswith("    + ") and lines[i + 2].startswith("    - ")
    assert re.fullmatch(r"Best: idea [12], because.*", lines[-1]), lines[-1]


def test_json_extraction_outputs_validate(url, capsys, tmp_path):
    module = load_example("lang_json_extraction")
    output = tmp_path / "persons.jsonl"
    code = module.main(
        ["--url", url, "--limit", "4", "--max-tokens", "96", "--output", str(output)]
    )
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "4/4 documents gave a valid Person" in out
    assert "4/4" in err  # the progress bar
    docs = [json.loads(line) for line in module.DATA.read_text().splitlines()][:4]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in records] == [d["id"] for d in docs]
    names_found = 0
    for doc, record in zip(docs, records):
        assert record["valid"] and record["error"] is None, record
        person = module.Person.model_validate(record["person"])
        names_found += person.name in doc["text"]
    assert names_found >= 3, records  # the tiny model copies names well (ages: less so)


def test_select_with_the_three_methods(url, capsys):
    out, _ = run_main("lang_select", ["--url", url, "--limit", "2"], capsys)
    module = load_example("lang_select")
    lines = out.splitlines()
    decided = {}
    for question, _, choices in module.QUESTIONS[:2]:
        at = lines.index(question)  # then the lead, the scores and one line per method
        pairs = [line.strip().partition(" -> ") for line in lines[at + 3 : at + 6]]
        decisions = {name.strip(): choice for name, _, choice in pairs}
        assert list(decisions) == list(module.METHODS)
        assert all(f" {d}" in choices for d in decisions.values()), decisions
        decided[question] = decisions
    assert decided["What is the capital of France?"]["token_length_normalized"] == "Paris"
    assert re.search(r"^Is Paris in France\? -> (yes|no)$", out, re.M)


# ---- the doc's snippets ---------------------------------------------------------------------


def doc_snippets() -> list[tuple[int, str, bool]]:
    """(line number, code, runs) of each ```python block of the doc; a block right after a
    ``<!-- no-run -->`` line does not run."""
    lines = DOC.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            i += 1
            body = []
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            runs = not (start > 0 and lines[start - 1].strip() == "<!-- no-run -->")
            blocks.append((start + 1, "\n".join(body) + "\n", runs))
        i += 1
    return blocks


def test_doc_snippets_run(url):
    snippets = doc_snippets()
    assert len(snippets) >= 25
    assert sum(not runs for _, _, runs in snippets) <= 3  # few blocks may be skipped
    namespace: dict = {"__name__": "language_md"}
    failures, printed = [], io.StringIO()
    for line, code, runs in snippets:
        if not runs:
            compile(code, f"docs/language.md:{line}", "exec")  # still valid Python
            continue
        code = code.replace(DOC_URL, url)
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(code, f"docs/language.md:{line}", "exec"), namespace)
        except Exception:
            failures.append(f"block at line {line}:\n{traceback.format_exc(limit=-3)}")
    assert not failures, "\n".join(failures)
    text = printed.getvalue()
    assert "Paris" in text
    assert "no vision input" in text  # sl.image fails in state.error()
    assert "was not set because the program failed" in text  # VariableError
    assert "needs token ids" in text  # the OpenAI backend's unconditional select
