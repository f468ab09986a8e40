"""A multi-turn chat: roles, one ``gen`` per assistant turn, and streaming.

Each user turn and each assistant reply is appended with the model's own chat template (taken
from its tokenizer), so the prompt is exactly what ``tokenizer.apply_chat_template`` would build
for the same messages. Later turns see the earlier answers: the second question ("And which
country is Berlin the capital of?") only makes sense after the first. The three ways to write a
turn are shown: ``s += sl.user(text)``, ``with s.user(): ...`` and
``sl.assistant_begin()`` / ``sl.assistant_end()``. With ``--stream`` the program runs in the
background and each answer is printed as it is generated.

Usage (from the repository root):

    python examples/lang_multi_turn_chat.py                  # the default model, in-process
    python examples/lang_multi_turn_chat.py --url http://127.0.0.1:30000 --stream
    python examples/lang_multi_turn_chat.py --turn "Hi!" --turn "What can you do?"

Without ``--url`` the default model (SmolLM2-135M-Instruct) is loaded in this process; with it,
the program runs on that smallm or SGLang server.
"""

from __future__ import annotations

import argparse

import smallm as sl

TURNS = [
    "What is the capital of France?",
    "And which country is Berlin the capital of?",
    "Name one famous landmark in Paris.",
]


@sl.function
def chat(s, turns, answer_tokens=48):
    s += sl.system("You are a helpful assistant.")
    for i, turn in enumerate(turns):
        if i % 2 == 0:
            s += sl.user(turn)  # a whole turn in one expression
        else:
            with s.user():  # a turn built from several appends
                s += turn
        s += sl.assistant_begin()
        s += sl.gen(f"answer_{i}", max_tokens=answer_tokens)
        s += sl.assistant_end()


def make_backend(url: str | None) -> sl.Backend:
    """A server's native API if ``url`` is given, else the default model in this process."""
    return sl.RuntimeEndpoint(url) if url else sl.EngineBackend()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: the default model, in-process)")
    p.add_argument("--turn", action="append", help="a user turn (repeat; default: 3 questions)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per answer (48)")
    p.add_argument("--stream", action="store_true", help="print the answers as they come")
    args = p.parse_args(argv)
    turns = args.turn or TURNS

    backend = make_backend(args.url)
    sl.set_default_backend(backend)
    try:
        state = chat.run(
            turns=turns, answer_tokens=args.max_tokens, temperature=0, stream=args.stream
        )
        if not args.stream and state.error() is not None:
            print(f"error: {state.error()}")
            return 1
        for i, turn in enumerate(turns):
            print(f"USER: {turn}")
            print("ASSISTANT: ", end="", flush=True)
            if args.stream:
                for piece in state.text_iter(f"answer_{i}"):
                    print(piece, end="", flush=True)
                print()
            else:
                print(state[f"answer_{i}"])
        if state.error() is not None:
            print(f"error: {state.error()}")
            return 1
        roles = [m["role"] for m in state.messages()]
        print(f"\n{len(roles)} messages: {', '.join(roles)}")
    finally:
        backend.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
