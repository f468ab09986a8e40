"""lm-evaluation-harness against the server: a small multiple-choice task kept as local JSONL,
scored three ways on the default model, which must agree item by item (within 1e-3):

- ``local-completions`` on ``/v1/completions`` (``echo`` + ``logprobs`` + prompt scoring) with
  ``tokenizer_backend=remote`` (the server's ``/tokenize``, ``/detokenize``, ``/tokenizer_info``);
- ``sglang-generate`` on the native ``/generate`` (``input_token_logprobs``);
- ``hf``: transformers on the same checkpoint, in this process.

The server runs its exact path (``exact_server``: dense float32, like the HF reference), so the
scores match to float rounding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

DATA = Path(__file__).parent / "data" / "lm_eval" / "capitals.jsonl"
TASK = """task: smallm_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _run(tmp_path, model: str, model_args: str) -> tuple[float, dict[int, list[float]]]:
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "smallm_capitals.yaml").write_text(TASK.format(data=DATA))
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["smallm_capitals"],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        batch_size=1,
    )
    acc = out["results"]["smallm_capitals"]["acc,none"]
    scores = {
        s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in out["samples"]["smallm_capitals"]
    }
    return acc, scores


def test_lm_eval_backends_agree_with_hf(exact_server, default_model_dir, tmp_path):
    url = exact_server.url
    api_acc, api = _run(
        tmp_path,
        "local-completions",
        f"base_url={url}/v1/completions,model=default,tokenizer_backend=remote,max_retries=1",
    )
    gen_acc, gen = _run(
        tmp_path,
        "sglang-generate",
        f"base_url={url}/generate,tokenizer_backend=huggingface,tokenizer={default_model_dir},max_retries=1",
    )
    hf_acc, hf = _run(tmp_path, "hf", f"pretrained={default_model_dir},dtype=float32,device=cpu")
    assert len(hf) == 8 and api.keys() == gen.keys() == hf.keys()
    for doc in hf:
        assert api[doc] == pytest.approx(hf[doc], abs=1e-3), doc
        assert gen[doc] == pytest.approx(hf[doc], abs=1e-3), doc
    assert api_acc == gen_acc == hf_acc
    assert hf_acc >= 0.5  # the model knows most of these
