"""Prefill/decode disaggregation on the default model (SmolLM2-135M-Instruct), behind the real
``sglang-router --pd-disaggregation``: a prefill server and a decode server on the same flags as
the conftest ``default_server`` (plus the disaggregation ones), against that one server.

The default path (bfloat16 activations, int4 codes for passes of a few rows, a dense copy for
larger ones) is not batch-invariant: how a prompt is split into passes by prefix-cache hits picks
the kernels. So each case starts with both radix caches flushed, and the single server and the
prefill server then see the same requests in the same order: they compute every prompt in the
same passes, and the outputs must match exactly (token ids; logprobs to 1e-6, see
``LOGPROB_TOL``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from pd_pair import PDPair, pd_router, scheduler_stats

pytestmark = pytest.mark.slow


def transfer_backend() -> str:
    """Mooncake's engine where it imports (the real path), else the fake TCP engine."""
    try:
        import mooncake.engine  # noqa: F401
    except (ImportError, OSError):  # not installed, or its shared libraries are missing
        return "fake"
    return "mooncake"


BACKEND = transfer_backend()
GREEDY = {"temperature": 0, "max_new_tokens": 12}
# The first token and its logprob are computed by the prefill server in the same passes and
# kernels as by the single server (same flags, same cache state), and the first-token record
# carries the logprob as a float64; the rest come from the decode server's one-row passes,
# again the same as the single server's. So the logprobs are expected bit-identical; 1e-6 only
# allows for their trip through JSON (and the router's re-serialisation).
LOGPROB_TOL = 1e-6
PROMPT_LENGTHS = (1, 100, 1500)

# Real text (so the model sees language), repeated to reach the longest prompt.
PARAGRAPH = (
    "The river town woke slowly on market days. Before sunrise the bakers lit their ovens, and "
    "the smell of bread drifted down the narrow streets to the harbour, where fishermen were "
    "already sorting the night's catch into wooden crates. By eight o'clock the square was "
    "full: farmers sold apples, cheese and honey from the backs of their carts, children ran "
    "between the stalls, and the old clockmaker opened his shutters to show a window of "
    "brass gears and polished faces. Visitors often asked why the clock on the church tower "
    "ran eleven minutes late. The townspeople only smiled and said that the river had its "
    "own idea of time, and that nobody in a hurry had ever been happy there. "
)


@pytest.fixture(scope="module", params=[BACKEND], ids=[f"transfer={BACKEND}"])
def pd(request, default_server):
    """A prefill and a decode server on exactly default_server's flags (its model too) plus
    the disaggregation ones, and sglang-router in PD mode in front (``pd.url``)."""
    pytest.importorskip("sglang_router")
    with PDPair(default_server.flags, request.param) as pair, pd_router(pair):
        yield pair


@pytest.fixture(scope="module")
def text_ids(default_tokenizer) -> list[int]:
    ids = default_tokenizer.encode(PARAGRAPH * 20)
    assert len(ids) > max(PROMPT_LENGTHS) + 100
    return ids


def flush(*servers) -> None:
    """Empty the servers' radix caches (they are idle between cases; retry if a gauge lags)."""
    for server in servers:
        deadline = time.monotonic() + 10
        while (r := requests.post(server.url + "/flush_cache", timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)


def generate(url: str, body: dict, stream: bool) -> dict:
    """The response (the last stream event when streaming), with the HTTP status checked."""
    r = requests.post(url + "/generate", json={**body, "stream": stream}, timeout=300, stream=True)
    assert r.status_code == 200, f"{url}: {r.status_code} {r.text}"
    if not stream:
        return r.json()
    events = [
        json.loads(line[len("data: ") :])
        for line in r.iter_lines(decode_unicode=True)
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    assert events, "no stream events"
    return events[-1]


def assert_same_output(got: dict, want: dict, what: str) -> None:
    assert got["output_ids"] == want["output_ids"], what
    assert got["text"] == want["text"], what
    got_lp = got["meta_info"]["output_token_logprobs"]
    want_lp = want["meta_info"]["output_token_logprobs"]
    assert [t[1] for t in got_lp] == [t[1] for t in want_lp] == want["output_ids"], what
    assert got_lp[0][0] == pytest.approx(want_lp[0][0], abs=LOGPROB_TOL), what
    assert [t[0] for t in got_lp] == pytest.approx([t[0] for t in want_lp], abs=LOGPROB_TOL), what


def test_kv_bytes_per_token_is_the_model_layout(pd, default_model_dir):
    """/server_info's ``kv_bytes_per_token`` = layers x 2 x kv_heads x head_dim x KV item size,
    from the model's config.json and the KV dtype the server reports."""
    config = json.loads((Path(default_model_dir) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for server in (pd.prefill, pd.decode):
        info = requests.get(server.url + "/server_info", timeout=10).json()
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[info["dtype"]]
        want = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * itemsize
        assert info["kv_bytes_per_token"] == want, info
    assert want == 30 * 2 * 3 * 64 * itemsize  # SmolLM2-135M's layout (FACTS.md)


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_greedy_through_the_router_matches_one_server(pd, default_server, text_ids, length):
    """Streaming and not, with logprobs: token-identical to one default-model server; the
    decode server computes no prompt token and the prefill server moves exactly the prompt's
    KV bytes."""
    body = {"input_ids": text_ids[:length], "sampling_params": GREEDY, "return_logprob": True}
    flush(default_server, pd.prefill)
    info = requests.get(pd.prefill.url + "/server_info", timeout=10).json()
    p0, d0 = scheduler_stats(pd.prefill), scheduler_stats(pd.decode)
    for stream in (False, True):
        want = generate(default_server.url, body, stream)
        assert want["meta_info"]["completion_tokens"] == GREEDY["max_new_tokens"]
        try:
            got = generate(pd.url, body, stream)
        except AssertionError as e:
            raise AssertionError(f"{e}{pd.logs()}") from None
        assert_same_output(got, want, f"{length} tokens, stream={stream}")
    # Both requests' KV came from the prefill server: the decode server computed no prompt
    # token, and the bytes moved are exactly the prompts' tokens x kv_bytes_per_token.
    d = scheduler_stats(pd.decode, kv_transfers=d0["kv_transfers"] + 2, num_running_reqs=0)
    assert d["kv_transfers"] == d0["kv_transfers"] + 2
    assert d["prefill_tokens"] == 0
    p = scheduler_stats(pd.prefill, kv_transfers=p0["kv_transfers"] + 2)
    assert p["kv_transfers"] == p0["kv_transfers"] + 2
    moved = p["kv_transfer_bytes"] - p0["kv_transfer_bytes"]
    assert moved == 2 * length * info["kv_bytes_per_token"]
    assert d["kv_transfer_bytes"] - d0["kv_transfer_bytes"] == moved


def test_shared_prefix_hits_the_prefill_servers_radix_cache(
    pd, default_server, default_tokenizer, text_ids
):
    """Two requests on the 1,500-token prompt with different suffixes: the second reuses the
    prefix from the prefill server's radix cache (and the outputs still match one server)."""
    prefix = text_ids[:1500]
    suffixes = [
        default_tokenizer.encode("\n\nQuestion: What do the farmers sell?"),
        default_tokenizer.encode(" Summarise the story in one sentence."),
    ]
    # They differ from their first token, so the second request shares exactly the prefix.
    assert suffixes[0][0] != suffixes[1][0]
    flush(default_server, pd.prefill)
    for i, suffix in enumerate(suffixes):
        body = {"input_ids": prefix + suffix, "sampling_params": GREEDY, "return_logprob": True}
        p0 = scheduler_stats(pd.prefill)
        want = generate(default_server.url, body, stream=False)
        got = generate(pd.url, body, stream=False)
        assert_same_output(got, want, f"shared prefix, request {i}")
        p = scheduler_stats(pd.prefill, kv_transfers=p0["kv_transfers"] + 1)
        assert p["kv_transfers"] == p0["kv_transfers"] + 1
        computed = p["prefill_tokens"] - p0["prefill_tokens"]
        cached = 0 if i == 0 else len(prefix)  # nothing is cached right after the flush
        # The prefill server computed only what its radix cache lacked: for the second
        # request, the new suffix; the single server reports the same hit.
        assert computed == len(body["input_ids"]) - cached, (i, computed, len(suffix))
        assert want["meta_info"]["cached_tokens"] == cached


def test_both_servers_end_idle_with_no_kv_leaked(pd):
    d = scheduler_stats(pd.decode, num_running_reqs=0, num_used_tokens=0)
    assert d["num_running_reqs"] == 0 and d["num_used_tokens"] == 0, d
    p = scheduler_stats(pd.prefill, num_running_reqs=0, num_used_tokens=0)
    assert p["num_running_reqs"] == 0 and p["num_used_tokens"] == 0, p
