"""How a request's bootstrap fields become one room per sample (both PD servers must agree),
and the prompt digest that guards a room against another prompt's KV."""

from __future__ import annotations

import pytest

from smallm.runtime.disaggregation.peer_messages import prompt_digest
from smallm.runtime.request_builder import (
    GenerateCall,
    RequestError,
    build_requests,
    sample_room,
)

VOCAB = 1000


def rooms(body: dict) -> list[tuple[list[int], int | None, int | None]]:
    call = GenerateCall.from_json(body)
    return [
        (r.input_ids, r.bootstrap_room, r.bootstrap_port) for r in build_requests(call, None, VOCAB)
    ]


BOOT = {"bootstrap_host": "127.0.0.1", "bootstrap_port": 8998}


def test_one_room_for_n_samples_expands_the_same_way_on_every_server():
    body = {"input_ids": [1, 2, 3], "sampling_params": {"n": 3}, **BOOT, "bootstrap_room": 7}
    got = [room for _, room, _ in rooms(body)]
    assert got == [7, sample_room(7, 1), sample_room(7, 2)]
    assert len(set(got)) == 3 and got == [room for _, room, _ in rooms(body)]
    assert all(0 <= r < 1 << 64 for r in got)


def test_rooms_per_prompt_and_per_sample():
    prompts = [[1, 2], [3, 4]]
    per_prompt = {**BOOT, "input_ids": prompts, "bootstrap_room": [10, 20]}
    assert [(ids, room) for ids, room, _ in rooms(per_prompt)] == [([1, 2], 10), ([3, 4], 20)]
    # What sglang-router sends for an OpenAI request with n > 1: one room per sample,
    # sample-major ([a0, b0, a1, b1]).
    per_sample = {
        **per_prompt,
        "sampling_params": {"n": 2},
        "bootstrap_room": [10, 20, 11, 21],
        "bootstrap_port": [1, 2, 3, 4],
    }
    got = [(ids, room, port) for ids, room, port in rooms(per_sample)]
    assert got == [([1, 2], 10, 1), ([1, 2], 11, 3), ([3, 4], 20, 2), ([3, 4], 21, 4)]


@pytest.mark.parametrize("room", [[1, 2, 3], []])
def test_a_room_list_of_the_wrong_length_is_refused(room):
    body = {"input_ids": [[1], [2]], **BOOT, "bootstrap_room": room}
    with pytest.raises(RequestError, match="bootstrap_room"):
        rooms(body)


def test_prompt_digest_tells_prompts_apart():
    assert prompt_digest([1, 2, 3]) == prompt_digest((1, 2, 3))
    assert prompt_digest([1, 2, 3]) != prompt_digest([1, 2, 4])
    assert prompt_digest([1, 2]) != prompt_digest([1, 2, 0])
