"""Task messages are signed by a producer and checked by workers: an HMAC-SHA256, with a key the fleet
shares (``FBAS_TASK_KEY``), over the message's canonical msgpack bytes (its fields in key order; msgpack
keeps ints, strings and lists apart, and packs each value one way). Anyone who can write to the queue can
forge a JSON or msgpack message without pickle; without the key they cannot forge a signature, so a worker
embeds and writes only what a producer of its fleet sent. msgpack, not JSON: packing a batch of 4,096
texts costs about a tenth of ``json.dumps`` on each side, and the producer signs every batch it sends."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import msgpack

__all__ = ["sign", "verify", "SIG_FIELD", "MESSAGE_VERSION", "CHUNKED_VERSION"]

SIG_FIELD = "sig"
MESSAGE_VERSION = 2  # of the task message (workers.task); 2: signed over msgpack bytes, 1 over JSON
CHUNKED_VERSION = 3  # a chunked job's message: version 2 with its rows' chunk columns (``chunks``)


def _digest(msg: dict[str, Any], key: str) -> str:
    body = {k: msg[k] for k in sorted(msg) if k != SIG_FIELD}
    blob = msgpack.packb(body, use_bin_type=True)
    return hmac.new(key.encode(), blob, hashlib.sha256).hexdigest()


def sign(msg: dict[str, Any], key: str) -> dict[str, Any]:
    """``msg`` with its signature (in place; returned for convenience)."""
    msg[SIG_FIELD] = _digest(msg, key)
    return msg


def verify(msg: Any, key: str) -> bool:
    """Whether ``msg`` carries a valid signature for ``key`` (constant-time comparison)."""
    if not isinstance(msg, dict) or not isinstance(msg.get(SIG_FIELD), str):
        return False
    try:
        expected = _digest(msg, key)
    except (TypeError, ValueError, OverflowError):  # keys that do not sort, values msgpack does not pack: forged
        return False
    return hmac.compare_digest(msg[SIG_FIELD], expected)
