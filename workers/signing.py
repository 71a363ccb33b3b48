"""Task messages are signed by a producer and checked by workers: an HMAC-SHA256, with a key the fleet
shares (``FBAS_TASK_KEY``), over the message's canonical JSON. Anyone who can write to the queue can forge a
JSON or msgpack message without pickle; without the key they cannot forge a signature, so a worker embeds
and writes only what a producer of its fleet sent."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

__all__ = ["sign", "verify", "SIG_FIELD"]

SIG_FIELD = "sig"


def _digest(msg: dict[str, Any], key: str) -> str:
    body = {k: v for k, v in msg.items() if k != SIG_FIELD}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    return hmac.new(key.encode(), blob, hashlib.sha256).hexdigest()


def sign(msg: dict[str, Any], key: str) -> dict[str, Any]:
    """``msg`` with its signature (in place; returned for convenience)."""
    msg[SIG_FIELD] = _digest(msg, key)
    return msg


def verify(msg: Any, key: str) -> bool:
    """Whether ``msg`` carries a valid signature for ``key`` (constant-time comparison)."""
    if not isinstance(msg, dict) or not isinstance(msg.get(SIG_FIELD), str):
        return False
    return hmac.compare_digest(msg[SIG_FIELD], _digest(msg, key))
