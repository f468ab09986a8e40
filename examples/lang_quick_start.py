"""The smallest smallm.lang program: the question-answering program from the README.

A program is a Python function decorated with ``@sl.function``; its first parameter ``s`` is the
program state. ``s += ...`` appends text, chat turns (``sl.system``, ``sl.user``,
``sl.assistant``) and generations (``sl.gen``) to the prompt; ``state["answer"]`` reads what a
``gen`` wrote.

Usage (from the repository root):

    python examples/lang_quick_start.py                      # the default model, in-process
    python examples/lang_quick_start.py --url http://127.0.0.1:30000   # a running server
    python examples/lang_quick_start.py --question "What is the capital of Italy?"

Without ``--url`` the default model (SmolLM2-135M-Instruct) is loaded in this process
(``sl.EngineBackend()``); with it, the program talks to a smallm or SGLang server
(``sl.RuntimeEndpoint(url)``; start one with ``make serve``).
"""

from __future__ import annotations

import argparse

import smallm as sl


@sl.function
def qa(s, question):
    s += sl.system("You are a helpful assistant.")
    s += sl.user(question)
    s += sl.assistant(sl.gen("answer", max_tokens=64, stop="\n"))


def make_backend(url: str | None) -> sl.Backend:
    """A server's native API if ``url`` is given, else the default model in this process."""
    return sl.RuntimeEndpoint(url) if url else sl.EngineBackend()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: the default model, in-process)")
    p.add_argument("--question", default="What is the capital of France?")
    args = p.parse_args(argv)

    backend = make_backend(args.url)
    sl.set_default_backend(backend)
    try:
        state = qa.run(question=args.question, temperature=0)
        if state.error() is not None:
            print(f"error: {state.error()}")
            return 1
        print(f"Q: {args.question}")
        print(f"A: {state['answer']}")
        info = state.get_meta_info("answer")
        print(
            f"({info['completion_tokens']} tokens, finish reason {info['finish_reason']['type']})"
        )
        print("\nThe whole prompt and answer, as the model saw them:")
        print(state.text())
    finally:
        backend.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
