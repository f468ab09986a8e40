"""Choosing with ``select``, and the three ways to score the choices.

``sl.select("answer", choices)`` does not sample: it scores each ``prefix + choice`` with the
model (prompt logprobs, one batched request) and appends the best choice. How "best" is decided
is the ``choices_method``:

- ``sl.token_length_normalized`` (the default): the highest mean logprob per token;
- ``sl.greedy_token_selection``: token by token, keep the choices with the best logprob at
  each position (a shorter choice is padded with its own mean);
- ``sl.unconditional_likelihood_normalized``: the choice whose tokens gain the most from the
  prompt, i.e. mean(logprob given the prompt - logprob with no prompt); it corrects for choices
  that are likely anywhere (needs a third request, and token ids: not on the OpenAI backend).

Each question is run once per method (``run_batch``); the table shows each method's decision
and the per-choice scores of the default method. ``sl.gen(name, choices=[...])`` is the same as
``sl.select``.

Usage (from the repository root):

    python examples/lang_select.py                           # the default model, in-process
    python examples/lang_select.py --url http://127.0.0.1:30000 --limit 3

Without ``--url`` the default model (SmolLM2-135M-Instruct) is loaded in this process; with it,
the programs run on that smallm or SGLang server.
"""

from __future__ import annotations

import argparse

import smallm as sl

# (question, the start of the answer, the choices that may complete it)
QUESTIONS = [
    (
        "What is the capital of France?",
        "The capital of France is",
        [" Paris", " London", " Berlin"],
    ),
    # The tiny model finds " a cat" likelier after "It is" than " a dog", as it would after
    # almost anything: only unconditional_likelihood_normalized corrects for that.
    ("Which animal barks?", "It is", [" a dog", " a cat", " a cow"]),
    (
        "Is the review 'I loved this movie, it was wonderful!' positive or negative?",
        "The review is",
        [" positive", " negative"],
    ),
    # greedy_token_selection drops " an apple" at its first token (" an" is less likely than
    # " a"), then prefers " strawberry" to " car"; the mean over all tokens prefers the apple.
    ("Name a fruit.", "A fruit is", [" an apple", " a car", " a strawberry"]),
]

METHODS = {
    "token_length_normalized": sl.token_length_normalized,
    "greedy_token_selection": sl.greedy_token_selection,
    "unconditional_likelihood_normalized": sl.unconditional_likelihood_normalized,
}


@sl.function
def answer_with_choice(s, question, lead, choices, method):
    s += sl.system("You are a helpful assistant.")
    s += sl.user(question)
    s += sl.assistant(lead + sl.select("answer", choices, choices_method=method))


@sl.function
def yes_or_no(s, question):
    s += sl.system("You are a helpful assistant.")
    s += sl.user(question + " Answer yes or no.")
    s += sl.assistant(sl.gen("answer", choices=["yes", "no"]))  # gen(choices=...) is a select


def make_backend(url: str | None) -> sl.Backend:
    """A server's native API if ``url`` is given, else the default model in this process."""
    return sl.RuntimeEndpoint(url) if url else sl.EngineBackend()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: the default model, in-process)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    args = p.parse_args(argv)
    questions = QUESTIONS[: args.limit]

    backend = make_backend(args.url)
    sl.set_default_backend(backend)
    try:
        runs = [
            {"question": q, "lead": lead, "choices": choices, "method": method}
            for q, lead, choices in questions
            for method in METHODS.values()
        ]
        states = answer_with_choice.run_batch(runs)
        yes_no = yes_or_no.run(question="Is Paris in France?")
    finally:
        backend.shutdown()

    failed = [st.error() for st in [*states, yes_no] if st.error() is not None]
    if failed:
        print(f"error: {failed[0]}")
        return 1
    for i, (q, lead, choices) in enumerate(questions):
        by_method = states[i * len(METHODS) : (i + 1) * len(METHODS)]
        print(f"{q}\n  {lead} ...")
        scores = by_method[0].get_meta_info("answer")["normalized_prompt_logprobs"]
        shown = ", ".join(f"{c.strip()!r} {score:.2f}" for c, score in zip(choices, scores))
        print(f"    choices (mean logprob): {shown}")
        for name, st in zip(METHODS, by_method):
            print(f"    {name:<36} -> {st['answer'].strip()}")
    print(f"Is Paris in France? -> {yes_no['answer']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
