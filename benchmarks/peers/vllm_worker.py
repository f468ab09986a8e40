"""vLLM (CPU build) under the shared protocol (run with the vLLM peer venv's Python).

``LLM(...)`` starts engine worker processes with multiprocessing, which re-imports the main
module: everything stays under ``if __name__ == "__main__"``, in a real file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common import run_worker


class VLLMBackend:
    """Greedy, EOS-ignoring generation through ``LLM.generate`` on token-id prompts."""

    def __init__(self, job: dict[str, Any]):
        # vLLM compiles the model on first load and caches the result per configuration: a
        # cache hit makes time to ready much shorter, so say which it was.
        compiled_before = _compiled_entries()
        # Imported here so the imports count in time to ready.
        import vllm
        from vllm import LLM, SamplingParams

        self.sampling_params = SamplingParams
        opts = job["options"]
        self.llm = LLM(
            model=job["model_dir"],
            dtype=opts.get("dtype", "bfloat16"),
            max_model_len=opts.get("max_model_len", 2048),
            max_num_seqs=opts.get("max_num_seqs", 256),
            seed=0,
        )
        self.version = f"vllm {vllm.__version__}"
        self.notes = [
            f"dtype {opts.get('dtype', 'bfloat16')}",
            "compiled at start (cold compile cache)"
            if _compiled_entries() - compiled_before
            else "compile cache hit",
            f"VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}",
        ]

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        params = self.sampling_params(
            max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
        )
        return sum(len(o.outputs[0].token_ids) for o in outputs)


def _compiled_entries() -> set[str]:
    """Names in vLLM's ahead-of-time compile cache (one per compiled configuration)."""
    cache = Path.home() / ".cache" / "vllm" / "torch_compile_cache" / "torch_aot_compile"
    return {p.name for p in cache.iterdir()} if cache.is_dir() else set()


if __name__ == "__main__":
    run_worker(VLLMBackend)
