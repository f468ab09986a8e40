"""Tree of thought: fork the program into branches, think in each, join, then choose.

The program asks a question and opens the assistant's answer; then

1. ``s.fork(n)`` makes one branch per topic; each branch gets its own hint
   (``forks += [...]``, one expression per branch) and then the same ``gen``
   (``forks += expr``, appended to every branch), so the branches generate in parallel;
2. each branch forks again (a nested fork) into an advantage and a possible problem of its idea;
3. ``join()`` brings the branches back: a variable set in the branches becomes, in the parent,
   the list of the branches' values (``s["idea"]`` is a list of ideas, ``s["point"]`` a list of
   [advantage, problem] pairs);
4. the parent lists the ideas, picks the best one with ``select`` and explains the choice.

Usage (from the repository root):

    python examples/lang_tree_of_thought.py                  # the default model, in-process
    python examples/lang_tree_of_thought.py --url http://127.0.0.1:30000
    python examples/lang_tree_of_thought.py --question "How can I learn to cook?" \\
        --topic "books" --topic "friends"

Without ``--url`` the default model (SmolLM2-135M-Instruct) is loaded in this process; with it,
the program runs on that smallm or SGLang server.
"""

from __future__ import annotations

import argparse

import smallm as sl

QUESTION = "How can I sleep better at night?"
TOPICS = ["your daily routine", "your bedroom", "food and drink"]


@sl.function
def tree_of_thought(s, question, topics, thought_tokens=32):
    s += sl.system("You are a helpful assistant.")
    s += sl.user(question)
    s += sl.assistant_begin()

    # 1. One branch per topic: a different hint in each, then the same gen in all of them.
    branches = s.fork(len(topics))
    branches += [f"One idea about {topic}:" for topic in topics]
    branches += sl.gen("idea", max_tokens=thought_tokens, stop="\n") + "\n"

    # 2. A nested fork in every branch: one advantage and one problem of the branch's idea.
    #    All of them are submitted before any join, so they run concurrently.
    critiques = [branch.fork(2) for branch in branches]
    for critique in critiques:
        critique += [
            "This helps because" + sl.gen("point", max_tokens=thought_tokens, stop=["\n", "."]),
            "A possible problem is that"
            + sl.gen("point", max_tokens=thought_tokens, stop=["\n", "."]),
        ]
    for critique in critiques:
        critique.join()  # each branch's "point" becomes [advantage, problem]
    branches.join()  # the parent's "idea" and "point" become lists over the branches

    # 3. Back in the parent: list the ideas, choose one, and say why.
    for i, (idea, (good, bad)) in enumerate(zip(s["idea"], s["point"])):
        s += f"Idea {i + 1}:{idea.rstrip()} (good: {good.strip()}; but {bad.strip()})\n"
    numbers = [str(i + 1) for i in range(len(topics))]
    s += "The best idea is Idea " + sl.select("best", numbers) + ", because"
    s += sl.gen("why", max_tokens=thought_tokens, stop="\n")
    s += sl.assistant_end()


def make_backend(url: str | None) -> sl.Backend:
    """A server's native API if ``url`` is given, else the default model in this process."""
    return sl.RuntimeEndpoint(url) if url else sl.EngineBackend()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: the default model, in-process)")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--topic", action="append", help="a branch's topic (repeat; default: 3)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per thought (32)")
    args = p.parse_args(argv)
    topics = args.topic or TOPICS

    backend = make_backend(args.url)
    sl.set_default_backend(backend)
    try:
        state = tree_of_thought.run(
            question=args.question, topics=topics, thought_tokens=args.max_tokens, temperature=0
        )
    finally:
        backend.shutdown()
    if state.error() is not None:
        print(f"error: {state.error()}")
        return 1

    print(f"Question: {args.question}\n")
    for i, (topic, idea, (good, bad)) in enumerate(zip(topics, state["idea"], state["point"])):
        print(f"Branch {i + 1} ({topic}):{idea.rstrip()}")
        print(f"    + {good.strip()}")
        print(f"    - {bad.strip()}")
    print(f"\nBest: idea {state['best']}, because{state['why'].rstrip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
