"""llama.cpp (llama-cpp-python) under the shared protocol (run with the llama.cpp peer venv).

Greedy decoding is done here, by argmax over the logits llama.cpp returns: in the 0.3.36 build
used on these machines ``Llama.sample()`` and ``create_completion`` crashed, while ``eval`` works.
EOS is ignored simply by not checking for it.

* One prompt: ``Llama.eval`` on the prompt, then one ``eval`` per generated token; the logits of
  the last evaluated position are read with ``llama_get_logits_ith(ctx, -1)`` (``Llama.scores``
  is only filled with ``logits_all=True``, which would compute every prompt position's logits).
* Several prompts: llama.cpp's own batched decoding through the low-level API, on a second
  context with one sequence per prompt (as llama.cpp's ``batched`` example does): prompts are
  prefilled packed into batches of up to ``n_batch`` tokens, then every step decodes one token of
  each sequence in a single ``llama_decode``.
"""

from __future__ import annotations

from typing import Any

from common import run_worker

N_BATCH = 512  # llama-cpp-python's default: tokens per llama_decode call during prefill


class LlamaCppBackend:
    """Greedy generation on the GGUF file with llama.cpp's CPU backend."""

    def __init__(self, job: dict[str, Any]):
        # Imported here so the imports count in time to ready.
        import llama_cpp
        import numpy as np

        self.lib, self.np = llama_cpp, np
        self.threads = job["options"].get("n_threads", 2)
        longest = max(len(p) for p in [job["batch1_prompt"], *job["prefill_prompts"]])
        self.llm = llama_cpp.Llama(
            model_path=job["gguf"],
            n_ctx=_round_up(longest + job["new_tokens"] + 1, 256),
            n_batch=N_BATCH,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            logits_all=False,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        self.batch_ctx: Any = None  # made on first use, sized for the job's batches
        self.batch_ctx_tokens = _batch_context_tokens(job)
        self.version = f"llama-cpp-python {llama_cpp.__version__}"
        self.notes = [f"{self.threads} threads, GGUF {job['gguf'].rsplit('/', 1)[-1]}"]

    # ---- one sequence ----

    def _last_logits(self, ctx: Any, index: int = -1) -> Any:
        ptr = self.lib.llama_get_logits_ith(ctx, index)
        return self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _generate_one(self, prompt: list[int], max_new_tokens: int) -> int:
        self.llm.reset()
        self.llm.eval(prompt)
        ctx = self.llm._ctx.ctx
        for i in range(max_new_tokens):
            token = int(self.np.argmax(self._last_logits(ctx)))
            if i + 1 < max_new_tokens:  # the last token needs no forward pass
                self.llm.eval([token])
        return max_new_tokens

    # ---- many sequences ----

    def _make_batch_context(self, n_seqs: int) -> None:
        lib = self.lib
        params = lib.llama_context_default_params()
        params.n_ctx = self.batch_ctx_tokens
        params.n_batch = max(N_BATCH, n_seqs)
        params.n_ubatch = max(N_BATCH, n_seqs)
        params.n_seq_max = n_seqs
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        # Separate KV per sequence: llama.h advises it for sequences without a shared prefix.
        params.kv_unified = False
        self.batch_ctx = lib.llama_init_from_model(self.llm._model.model, params)
        if not self.batch_ctx:
            raise RuntimeError("llama_init_from_model failed for the batched context")
        self.batch_n_seqs = n_seqs
        self.batch = lib.llama_batch_init(params.n_batch, 0, 1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants_logits) entries."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)
        rc = self.lib.llama_decode(self.batch_ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _prefill_many(self, prompts: list[list[int]]) -> list[int]:
        """Prefill every prompt (packed, N_BATCH tokens per call); each one's first new token."""
        entries = [
            (tok, pos, seq, pos == len(p) - 1)
            for seq, p in enumerate(prompts)
            for pos, tok in enumerate(p)
        ]
        first: list[int] = [0] * len(prompts)
        for start in range(0, len(entries), N_BATCH):
            chunk = entries[start : start + N_BATCH]
            self._decode(chunk)
            for i, (_, _, seq, logits) in enumerate(chunk):
                if logits:
                    first[seq] = int(self.np.argmax(self._last_logits(self.batch_ctx, i)))
        return first

    def _generate_many(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        if self.batch_ctx is None or self.batch_n_seqs < len(prompts):
            self._close_batch_context()
            self._make_batch_context(len(prompts))
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.batch_ctx), True)
        tokens = self._prefill_many(prompts)
        generated = len(prompts)
        for step in range(1, max_new_tokens):
            self._decode(
                [
                    (tok, len(p) + step - 1, seq, True)
                    for seq, (tok, p) in enumerate(zip(tokens, prompts))
                ]
            )
            logits = self.np.ctypeslib.as_array(
                self.lib.llama_get_logits(self.batch_ctx), shape=(len(prompts), self.n_vocab)
            )
            tokens = [int(t) for t in logits.argmax(axis=1)]
            generated += len(prompts)
        return generated

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        if len(prompts) == 1:
            return self._generate_one(prompts[0], max_new_tokens)
        return self._generate_many(prompts, max_new_tokens)

    def _close_batch_context(self) -> None:
        if self.batch_ctx is not None:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.batch_ctx)
            self.batch_ctx = None

    def close(self) -> None:
        self._close_batch_context()
        self.llm.close()


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _batch_context_tokens(job: dict[str, Any]) -> int:
    """KV cells for the batched context: with per-sequence KV each sequence gets n_ctx / n_seq,
    so every sequence must fit the longest prompt plus its new tokens."""
    sets = [job["batch_warmup"], *job["batch_sets"]]
    per_seq = max(len(p) for s in sets for p in s) + job["new_tokens"] + 1
    n_seqs = max(len(s) for s in sets)
    return n_seqs * _round_up(per_seq, 256)


if __name__ == "__main__":
    run_worker(LlamaCppBackend)
