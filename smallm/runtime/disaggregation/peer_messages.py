"""What a decode server tells a prefill rank over ZMQ (one JSON object per message).

- A transfer request: ``{"room", "session_id", "kv_layout", "slots", "first_token_layout",
  "record_index", "prompt_digest"}``: write room ``room``'s KV into these slots of the decode
  side's pool and its first-token record into that record.
- A cancel: ``{"kind": "cancel", "room"}``: the decode side gave up on the room (timeout,
  abort); the prefill rank writes nothing more there except the FAILED record it waits for.

``prompt_digest`` lets the prefill side refuse to send the KV of a different prompt under the
same room (two clients reusing a room, or bodies that tokenize differently on the two sides).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np


def prompt_digest(token_ids: Sequence[int]) -> str:
    """A short hash of a prompt's token ids, equal on both sides for equal prompts."""
    data = np.asarray(token_ids, dtype=np.int64).tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def encode_cancel(room: int) -> bytes:
    return json.dumps({"kind": "cancel", "room": int(room)}).encode()


def encode_transfer_request(
    room: int,
    session_id: str,
    kv_layout: dict,
    slots: Sequence[int],
    first_token_layout: dict,
    record_index: int,
    digest: str,
) -> bytes:
    return json.dumps(
        {
            "room": int(room),
            "session_id": session_id,
            "kv_layout": kv_layout,
            "slots": [int(s) for s in slots],
            "first_token_layout": first_token_layout,
            "record_index": int(record_index),
            "prompt_digest": digest,
        }
    ).encode()
