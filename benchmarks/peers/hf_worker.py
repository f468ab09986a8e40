"""HF transformers ``model.generate`` under the shared protocol (run with smallm's venv).

``options.dtype`` is "float32" or "bfloat16". Batches are left-padded to their longest prompt
with an attention mask; ``min_new_tokens`` = ``max_new_tokens`` makes greedy decoding ignore EOS.
"""

from __future__ import annotations

from typing import Any

from common import run_worker


class HFBackend:
    """Greedy batched generation with a causal LM loaded from the converted HF directory."""

    def __init__(self, job: dict[str, Any]):
        # Imported here so the imports count in time to ready.
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        dtype = getattr(torch, job["options"]["dtype"])
        self.model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype)
        self.model.eval()
        tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
        # Any id works as padding (masked out); the tokenizer's own pad id if it has one.
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id
        self.version = f"transformers {transformers.__version__}, torch {torch.__version__}"
        self.notes = [f"dtype {job['options']['dtype']}, torch threads {torch.get_num_threads()}"]

    def _left_pad(self, prompts: list[list[int]]) -> tuple[Any, Any]:
        width = max(len(p) for p in prompts)
        ids = [[self.pad_id] * (width - len(p)) + p for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        return self.torch.tensor(ids), self.torch.tensor(mask)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        ids, mask = self._left_pad(prompts)
        with self.torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        return (out.shape[1] - ids.shape[1]) * out.shape[0]


if __name__ == "__main__":
    run_worker(HFBackend)
