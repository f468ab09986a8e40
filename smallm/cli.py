"""The ``smallm`` command line: ``smallm serve [flags]``, ``smallm generate PROMPT`` and
``smallm router --workers N [server flags]`` (N servers behind SGLang's router)."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer one prompt, streaming the text to the terminal")
    p.add_argument("prompt", help="the user message (or raw text with --raw)")
    p.add_argument("--model-path", default=None, help="HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--matmul-backend",
        default="torch",
        choices=["torch", "openblas"],
        help="openblas: ~1.4x faster float32 decode on an otherwise idle machine",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="a system message for the chat template")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    p.add_argument("--chat-template", default=None, help="Jinja template (string or file)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed after")
    p.add_argument("--log-level", default="warning")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    from smallm.runtime.config import ServerArgs

    p = sub.add_parser("serve", help="serve a model over HTTP (SGLang-native and OpenAI APIs)")
    ServerArgs.add_cli_args(p)


def _router_parser(sub: argparse._SubParsersAction) -> None:
    from smallm.runtime.server.router import add_cli_args

    p = sub.add_parser(
        "router",
        help="start N servers behind SGLang's router (pip install 'smallm[router]')",
        description="Start --workers smallm servers on loopback ports and sglang-router in "
        "front of them. Flags not listed here go to every server (as for smallm serve).",
    )
    add_cli_args(p)


def run_router_command(ns: argparse.Namespace, server_flags: list[str]) -> int:
    from smallm.runtime.config import ServerArgs
    from smallm.runtime.server.router import plan_from_cli, run_router

    # Check the servers' flags here, so a typo fails before N servers start loading.
    check = argparse.ArgumentParser(prog="smallm router (server flags)", add_help=False)
    ServerArgs.add_cli_args(check)
    try:
        ServerArgs.from_cli_args(check.parse_args(server_flags))
    except ValueError as e:
        print(f"smallm router: {e}", file=sys.stderr)
        return 2
    return run_router(plan_from_cli(ns, server_flags))


def run_serve(ns: argparse.Namespace) -> int:
    from smallm.runtime.config import ServerArgs
    from smallm.runtime.server.launch import launch_server

    try:
        args = ServerArgs.from_cli_args(ns)
    except ValueError as e:
        print(f"smallm serve: {e}", file=sys.stderr)
        return 2
    return launch_server(args)


def run_generate(args: argparse.Namespace) -> int:
    from smallm.runtime.detokenize import IncrementalDecoder
    from smallm.runtime.model.loader import resolve_model_path
    from smallm.runtime.model.model_runner import ModelRunner, RunnerConfig
    from smallm.runtime.sampling import SamplingParams, SamplingParamsError
    from smallm.runtime.static_batch import StaticBatchGenerator
    from smallm.runtime.tokenizer import eos_token_ids, load_tokenizer, render_chat

    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
        params.validate()
    except SamplingParamsError as e:
        print(f"smallm generate: {e}", file=sys.stderr)
        return 2
    model_dir = resolve_model_path(args.model_path)
    tokenizer = load_tokenizer(model_dir, args.chat_template)
    if args.raw:
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        text = render_chat(tokenizer, messages)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    need = len(prompt_ids) + params.max_new_tokens
    runner = ModelRunner(
        RunnerConfig(
            model_path=model_dir, dtype=args.dtype, max_total_tokens=need, max_running_requests=1
        )
    )
    gen = StaticBatchGenerator(runner, eos_token_ids(tokenizer, runner.model_config.eos_token_ids))
    decoder = IncrementalDecoder(tokenizer)
    t0 = time.perf_counter()

    def on_token(_: int, tok: int) -> None:
        sys.stdout.write(decoder.push([tok]))
        sys.stdout.flush()

    (result,) = gen.generate([prompt_ids], params, on_token=on_token)
    sys.stdout.write(decoder.flush() + "\n")
    if args.stats:
        dt = time.perf_counter() - t0
        n = len(result.output_ids)
        print(
            f"[{len(prompt_ids)} prompt tokens, {n} generated in {dt:.2f}s "
            f"({n / dt:.1f} tok/s), finish: {result.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    from smallm.runtime.cpu_threads import prefer_passive_openmp

    # Before torch loads (parsing the flags imports it): only OpenBLAS matmuls want it.
    if "openblas" in (sys.argv[1:] if argv is None else argv):
        prefer_passive_openmp()
    parser = argparse.ArgumentParser(prog="smallm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _generate_parser(sub)
    _router_parser(sub)
    args, rest = parser.parse_known_args(argv)
    if args.command == "router":
        return run_router_command(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "serve":
        return run_serve(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "generate":
        return run_generate(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
