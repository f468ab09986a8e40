"""Tool-call validity and the latency cost of constraining a call, through the HTTP server.

50 generated tool-use prompts (10 tools x 5 requests each) are sent, streamed, to
``/v1/chat/completions`` with all 10 tools, greedy, one at a time, four ways:

1. ``auto``: the model chooses; the ``--tool-call-parser`` (hermes) reads its output;
2. ``auto+tag``: the same tools marked ``"strict": true``, so that under the server's default
   ``--tool-call-structural-tag strict`` a structural tag constrains every call the model opens
   (free text until ``<tool_call>``, then the tool's parameters until ``</tool_call>``); the
   prompt is the same token for token (``strict`` does not reach the template);
3. ``required``: the constrained decoder enforces an array of ``{name, arguments}`` calls;
4. named (``tool_choice`` = the intended tool): the decoder enforces that tool's parameters.

A call is *valid* when it parsed, names a known tool and its arguments validate (jsonschema)
against that tool's parameters; "right tool" also checks the name is the intended one.
Per-token latency: each streamed reply's time from its first to its last chunk over its
completion tokens after the first (median over the prompts).

Constraint cost: for each prompt, a streamed native ``/generate`` of the named call's
constrained output (``json_schema`` = the tool's parameters) is compared with an unconstrained
generation of the same number of tokens (``ignore_eos``) from the same prompt.

    python benchmarks/bench_tools.py [--url http://127.0.0.1:30000] [--num 50] [--quick]

Without ``--url`` it starts a server on the default model with its default settings
(``--disable-jump-forward`` with ``--no-jump-forward``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time

import jsonschema
import requests


def _obj(required: list[str], **props: dict) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


S = {"type": "string", "maxLength": 40}
TOOLS = {
    "get_weather": ("Get the current weather for a city", _obj(["city"], city=S, unit={"enum": ["celsius", "fahrenheit"]})),
    "get_time": ("Get the local time in a city", _obj(["city"], city=S)),
    "convert_currency": ("Convert an amount of money", _obj(["amount", "source", "target"], amount={"type": "number"}, source=S, target=S)),
    "search_web": ("Search the web", _obj(["query"], query={"type": "string", "maxLength": 80})),
    "send_email": ("Send an email", _obj(["to", "subject"], to=S, subject=S)),
    "create_event": ("Put an event in the calendar", _obj(["title", "date"], title=S, date={"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"})),
    "calculate": ("Evaluate an arithmetic expression", _obj(["expression"], expression=S)),
    "translate": ("Translate text", _obj(["text", "language"], text=S, language=S)),
    "stock_price": ("Get a stock's price", _obj(["ticker"], ticker={"type": "string", "pattern": "^[A-Z]{1,5}$"})),
    "book_flight": ("Book a flight", _obj(["origin", "destination"], origin=S, destination=S, passengers={"type": "integer", "minimum": 1, "maximum": 9})),
}  # fmt: skip
REQUESTS = {
    "get_weather": ["What's the weather in {c}?", "Is it cold in {c} today?", "Weather in {c} in fahrenheit please.", "Do I need an umbrella in {c}?", "How warm is it in {c}?"],
    "get_time": ["What time is it in {c}?", "Tell me the local time in {c}.", "Is it night in {c} now?", "Current time in {c}?", "What hour is it in {c}?"],
    "convert_currency": ["Convert 100 USD to EUR.", "How many yen is 50 dollars?", "Change 20 pounds into euros.", "What is 75 EUR in USD?", "Convert 1000 INR to GBP."],
    "search_web": ["Search the web for {c} museums.", "Find news about {c}.", "Look up the population of {c}.", "Search for restaurants in {c}.", "Find the history of {c}."],
    "send_email": ["Email bob@example.com that the meeting moved.", "Send an email to ann@example.com about lunch.", "Write to joe@example.com: report is ready.", "Email team@example.com the agenda.", "Send mia@example.com a thank-you email."],
    "create_event": ["Add a dentist appointment on 2027-01-15.", "Create an event 'Team lunch' on 2027-02-03.", "Put my birthday party on 2027-05-20 in the calendar.", "Schedule a review on 2027-03-01.", "Add 'Trip to {c}' on 2027-07-04."],
    "calculate": ["What is 17 * 23?", "Calculate 2 ** 10.", "Compute (45 + 55) / 4.", "What's 1234 - 567?", "Evaluate 3.5 * 8."],
    "translate": ["Translate 'good morning' to French.", "How do you say 'thank you' in Spanish?", "Translate 'where is the station' into German.", "Say 'hello friend' in Italian.", "Translate 'I love {c}' to Japanese."],
    "stock_price": ["What's Apple's stock price?", "Price of MSFT?", "How is NVDA trading?", "Get the stock price of Tesla.", "Quote for AMZN please."],
    "book_flight": ["Book a flight from {c} to London.", "I need 2 seats from Paris to {c}.", "Fly me from Berlin to {c}.", "Book a flight to {c} from Madrid for 3 people.", "Get me a flight from {c} to Rome."],
}  # fmt: skip
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo"]


def prompts(num: int) -> list[tuple[str, str]]:
    """(intended tool, user message) pairs, tools interleaved so a short run covers all."""
    out = []
    for k in range(5):
        for name, asks in REQUESTS.items():
            out.append((name, asks[k].format(c=CITIES[k])))
    return out[:num]


def openai_tools(strict: bool = False) -> list[dict]:
    fn = {"strict": True} if strict else {}
    return [
        {"type": "function", "function": {"name": n, "description": d, "parameters": p, **fn}}
        for n, (d, p) in TOOLS.items()
    ]


def valid_calls(message: dict) -> tuple[bool, list[str]]:
    calls = message.get("tool_calls") or []
    if not calls:
        return False, []
    names = []
    for c in calls:
        name = c["function"]["name"]
        names.append(name)
        if name not in TOOLS:
            return False, names
        try:
            jsonschema.validate(json.loads(c["function"]["arguments"]), TOOLS[name][1])
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False, names
    return True, names


def chat(url: str, ask: str, mode: str, intended: str, max_tokens: int) -> tuple[dict, float]:
    """One streamed chat completion: (the reassembled message, seconds per token after the
    first, or nan with fewer than 2 tokens)."""
    choice: object = mode
    if mode == "named":
        choice = {"type": "function", "function": {"name": intended}}
    elif mode == "auto+tag":
        choice = "auto"
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": ask}],
        "tools": openai_tools(strict=mode == "auto+tag"),
        "tool_choice": choice,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    content, calls, tokens = "", {}, 0
    first = last = None
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not chunk["choices"]:
                continue
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            delta = chunk["choices"][0]["delta"]
            content += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:
                entry = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
                fn = tc.get("function") or {}
                entry["name"] += fn.get("name") or ""
                entry["arguments"] += fn.get("arguments") or ""
    message = {
        "content": content,
        "tool_calls": [{"function": calls[i]} for i in sorted(calls)],
    }
    per_token = (last - first) / (tokens - 1) if tokens > 1 and first is not None else math.nan
    return message, per_token


def stream_generate(url: str, ids: list[int], sp: dict) -> tuple[int, float]:
    """(completion tokens, seconds from the first to the last streamed chunk)."""
    body = {"input_ids": ids, "sampling_params": sp, "stream": True}
    first = last = None
    tokens = 0
    with requests.post(url + "/generate", json=body, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            tokens = json.loads(line[6:])["meta_info"]["completion_tokens"]
    return tokens, (last - first) if first is not None else 0.0


MODES = ("auto", "auto+tag", "required", "named")


def run(url: str, num: int, max_tokens: int) -> dict:
    results: dict = {}
    cases = prompts(num)
    for mode in MODES:
        ok = right = 0
        per_token = []
        for name, ask in cases:
            message, pt = chat(url, ask, mode, name, max_tokens)
            if not math.isnan(pt):
                per_token.append(pt)
            good, names = valid_calls(message)
            ok += good
            right += good and names[:1] == [name]
        ms = statistics.median(per_token) * 1e3 if per_token else math.nan
        results[mode] = {
            "valid": ok / len(cases),
            "right_tool": right / len(cases),
            "ms_per_token": ms,
        }
        print(f"{mode:9s} valid {ok}/{len(cases)}  right tool {right}/{len(cases)}  "
              f"per token {ms:.1f} ms (median)", flush=True)  # fmt: skip
    # Per-token cost of the constraint: same prompt, same token count, constrained or not.
    con, free = [], []
    for name, ask in cases:
        tok = requests.post(url + "/tokenize", json={"messages": [{"role": "user", "content": ask}], "tools": openai_tools(), "tool_choice": {"type": "function", "function": {"name": name}}}, timeout=60).json()["tokens"]  # fmt: skip
        schema = json.dumps(TOOLS[name][1])
        k1, t1 = stream_generate(
            url, tok, {"temperature": 0, "max_new_tokens": max_tokens, "json_schema": schema}
        )
        k2, t2 = stream_generate(
            url, tok, {"temperature": 0, "max_new_tokens": k1, "ignore_eos": True}
        )
        if k1 > 1 and k2 > 1:
            con.append(t1 / (k1 - 1))
            free.append(t2 / (k2 - 1))
    if con:
        c, f = statistics.median(con), statistics.median(free)
        results["per_token"] = {
            "constrained_ms": c * 1e3,
            "free_ms": f * 1e3,
            "overhead": c / f - 1,
        }
        print(f"per token (median over {len(con)} prompts): constrained {c * 1e3:.1f} ms, "
              f"free {f * 1e3:.1f} ms, overhead {100 * (c / f - 1):+.1f}%", flush=True)  # fmt: skip
    return results


def cpu_line() -> str:
    """The CPU's model name and its AVX-512 / AMX flags (from /proc/cpuinfo, as lscpu shows)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if flags and model:
                    break
    except OSError:
        pass
    wanted = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    present = [f for f in wanted if f in flags] or ["no avx512/amx"]
    return f"{model} [{' '.join(present)}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--num", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--no-jump-forward", action="store_true")
    ap.add_argument("--quick", action="store_true", help="10 prompts")
    args = ap.parse_args()
    num = 10 if args.quick else args.num
    import torch

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"cpu: {cpu_line()}, torch {torch.__version__}, "
          f"isa {torch.backends.cpu.get_cpu_capability()}, cores {os.cpu_count()}")  # fmt: skip
    if args.url:
        print(json.dumps(run(args.url, num, args.max_tokens), indent=1))
        return
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from server_process import ServerProcess

    flags = ["--max-total-tokens", "16384"] + (
        ["--disable-jump-forward"] if args.no_jump_forward else []
    )
    with ServerProcess(None, *flags) as server:
        print(json.dumps(run(server.url, num, args.max_tokens), indent=1))


if __name__ == "__main__":
    main()
