"""smallm's in-process ``Engine`` under the shared protocol (run with smallm's own venv).

The job's ``options.engine_kwargs`` are the variant's Engine keyword arguments. An Engine that
does not know one of them raises TypeError; that is reported as "unsupported", not as a failure.
"""

from __future__ import annotations

from typing import Any

from common import Unsupported, run_worker


class SmallmBackend:
    """Greedy, EOS-ignoring generation through ``smallm.Engine.generate`` on token ids."""

    def __init__(self, job: dict[str, Any]):
        # Imported here, not at the top, so the import counts in time to ready. `import smallm`
        # sets its OpenMP wait policy before torch loads (smallm/runtime/cpu_threads.py), as
        # any smallm process does.
        from smallm import Engine

        kwargs = job["options"].get("engine_kwargs", {})
        try:
            # No model_path: smallm's default model, as a user gets it (the peers are given the
            # same model's GGUF file or converted directory).
            self.engine = Engine(**kwargs)
        except TypeError as e:
            raise Unsupported(str(e)) from e
        self.notes = [f"engine kwargs: {kwargs}"]
        self.version = f"smallm {_git_revision()}"

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        params = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
        results = self.engine.generate(input_ids=prompts, sampling_params=params)
        errors = [r["meta_info"]["error"] for r in results if r["meta_info"].get("error")]
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
        return sum(r["meta_info"]["completion_tokens"] for r in results)

    def close(self) -> None:
        self.engine.shutdown()


def _git_revision() -> str:
    """The working tree's commit (with "+dirty" when it has changes): the engine is in flux."""
    import subprocess

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return out.stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("+dirty" if git("status", "--porcelain", "--", "smallm") else "")


if __name__ == "__main__":
    run_worker(SmallmBackend)
