"""Few-shot question answering over a batch of questions with ``run_batch``.

Every run of the program starts with the same few-shot examples, so the server's prefix cache
computes that prefix once and each question only pays for its own tokens. ``run_batch`` runs
the program once per question, concurrently, with a progress bar; ``stop="\\n"`` ends each answer
at the end of its line.

Usage (from the repository root):

    python examples/lang_few_shot_qa.py                      # the default model, in-process
    python examples/lang_few_shot_qa.py --url http://127.0.0.1:30000 --limit 4
    python examples/lang_few_shot_qa.py --questions my_questions.txt   # one question per line

Without ``--url`` the default model (SmolLM2-135M-Instruct) is loaded in this process; with it,
the programs run on that smallm or SGLang server.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import smallm as sl

EXAMPLES = [
    ("What is 2 + 2?", "4"),
    ("What colour is the sky?", "Blue"),
    ("Who wrote Hamlet?", "William Shakespeare"),
]

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is the largest planet in the solar system?",
    "What is the boiling point of water in Celsius?",
    "What is 3 + 5?",
    "What colour is grass?",
    "What is the capital of Germany?",
    "Which ocean is the largest?",
]


@sl.function
def few_shot_qa(s, question, max_answer_tokens=16):
    for q, a in EXAMPLES:  # the shared prefix
        s += f"Q: {q}\nA: {a}\n"
    s += "Q: " + question + "\nA:" + sl.gen("answer", max_tokens=max_answer_tokens, stop="\n")


def make_backend(url: str | None) -> sl.Backend:
    """A server's native API if ``url`` is given, else the default model in this process."""
    return sl.RuntimeEndpoint(url) if url else sl.EngineBackend()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: the default model, in-process)")
    p.add_argument("--questions", help="a text file with one question per line")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (16)")
    p.add_argument("--num-threads", type=int, default=16, help="programs run at once (16)")
    p.add_argument(
        "--compiled",
        action="store_true",
        help="step-aligned: one batched request per round across the questions",
    )
    args = p.parse_args(argv)

    questions = QUESTIONS
    if args.questions:
        lines = Path(args.questions).read_text(encoding="utf-8").splitlines()
        questions = [q.strip() for q in lines if q.strip()]
    questions = questions[: args.limit]

    backend = make_backend(args.url)
    sl.set_default_backend(backend)
    try:
        states = few_shot_qa.run_batch(
            [{"question": q, "max_answer_tokens": args.max_tokens} for q in questions],
            num_threads=args.num_threads,
            progress_bar=True,
            compiled=args.compiled,
            temperature=0,
        )
    finally:
        backend.shutdown()

    failed = 0
    for q, state in zip(questions, states):
        if state.error() is not None:
            failed += 1
            print(f"Q: {q}\n   error: {state.error()}")
        else:
            print(f"Q: {q}\nA:{state['answer']}")  # the answer starts with its own space
    print(f"{len(questions) - failed}/{len(questions)} answered")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
