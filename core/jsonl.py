"""JSON-lines reading with errors that name the file and line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from core.errors import InputError

__all__ = ["iter_jsonl"]


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a JSON-lines file; a bad line is an
    ``InputError`` naming the file and line."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
