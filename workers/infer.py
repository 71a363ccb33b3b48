"""Inference for one batch: the Triton client per worker process, bad-row isolation, output checks.

    enc = encoder_for(cfg)                                   # one TritonEncoder per process (after fork)
    res = embed_checked(enc, token_ids, lengths)             # vectors + which rows failed and why

``embed_checked`` never retries a request the server rejected as invalid as it is: rows the
server names (``BadRowsError``) are set aside and the rest is sent again; a whole request
rejected as invalid marks every row. Output rows that are NaN / Inf or of zero norm are
embedded again once on their own; if they are still bad they are reported, never written.
Transient errors (``TransientError``) pass through for the task to retry.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import InvalidRequestError

logger = logging.getLogger(__name__)

__all__ = ["encoder_for", "embed_checked", "Embedded", "subset"]

_ENCODERS: dict[tuple, Any] = {}


def encoder_for(cfg: Any) -> Any:
    """This process's ``TritonEncoder`` for ``cfg.serve`` (url, model, shared memory; retries bounded by the task
    time limit), created lazily after fork; it waits for server and model readiness once."""
    from workers.triton_client import ClientOptions, TritonEncoder

    opts = ClientOptions.from_config(cfg)
    key = (os.getpid(), opts.url, opts.model_name, opts.shared_memory)
    enc = _ENCODERS.get(key)
    if enc is None:
        enc = TritonEncoder(opts)
        enc.wait_ready()
        _ENCODERS.clear()  # entries from a parent process (before fork) must not be reused
        _ENCODERS[key] = enc
    return enc


@dataclass
class Embedded:
    """Vectors for the rows that succeeded, and a reason for each row that did not."""

    vectors: np.ndarray  # float32 [n, dim]; rows listed in ``failed`` hold zeros
    failed: dict[int, str] = field(default_factory=dict)  # row position -> reason

    @property
    def ok(self) -> np.ndarray:
        mask = np.ones(len(self.vectors), dtype=bool)
        if self.failed:
            mask[list(self.failed)] = False
        return mask


def _bad_outputs(v: np.ndarray) -> np.ndarray:
    finite = np.isfinite(v).all(axis=1)
    norm = np.zeros(len(v), dtype=np.float64)
    norm[finite] = np.linalg.norm(v[finite].astype(np.float64), axis=1)
    return ~finite | (norm <= 1e-12)


def subset(token_ids: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed ids and lengths of documents ``rows`` (ascending) only; the inputs themselves when all are kept."""
    if len(rows) == len(lengths):
        return token_ids, lengths
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    ids = np.concatenate([token_ids[offsets[r] : offsets[r + 1]] for r in rows]) if len(rows) else token_ids[:0]
    return ids, lengths[rows]


def embed_checked(engine: Any, token_ids: np.ndarray, lengths: np.ndarray, dim: int) -> Embedded:
    """Embed packed documents (see the module docstring); ``TransientError`` propagates."""
    from workers.triton_client import BadRowsError

    n = len(lengths)
    out = Embedded(np.zeros((n, dim), dtype=np.float32))
    todo = np.arange(n)
    for _ in range(3):  # each round removes at least one rejected row, or ends
        if not len(todo):
            break
        ids, lens = subset(token_ids, lengths, todo)
        try:
            vecs = engine.embed(ids, lens)
        except BadRowsError as e:
            bad = [int(todo[r]) for r in e.rows if 0 <= r < len(todo)]
            if not bad:
                raise
            for r in bad:
                out.failed[r] = f"rejected by the model server: {str(e)[:200]}"
            todo = np.array([r for r in todo if r not in out.failed], dtype=np.int64)
            continue
        except InvalidRequestError as e:
            if len(todo) == 1:
                out.failed[int(todo[0])] = f"rejected by the model server: {str(e)[:200]}"
                todo = todo[:0]
                break
            # split in halves: a bad row is isolated in log2(n) rounds without retrying the same request
            half = len(todo) // 2
            for part in (todo[:half], todo[half:]):
                sub = embed_checked(engine, *subset(token_ids, lengths, part), dim)
                out.vectors[part] = sub.vectors
                for r, reason in sub.failed.items():
                    out.failed[int(part[r])] = reason
            todo = todo[:0]
            break
        vecs = np.asarray(vecs, dtype=np.float32)
        if vecs.shape != (len(todo), dim):
            raise InvalidRequestError(f"the engine returned shape {vecs.shape} for {len(todo)} documents (dim {dim})")
        out.vectors[todo] = vecs
        todo = todo[:0]
        break
    else:
        for r in todo.tolist():
            out.failed[int(r)] = "rejected by the model server too many times"
    bad = [int(r) for r in np.flatnonzero(_bad_outputs(out.vectors)) if int(r) not in out.failed]
    if len(bad):
        logger.warning("%d rows gave NaN/Inf or zero-norm vectors: embedding them again on their own", len(bad))
        for r in bad:  # one by one, so a batch neighbour cannot be the cause
            ids, lens = subset(token_ids, lengths, np.array([r]))
            again = np.asarray(engine.embed(ids, lens), dtype=np.float32)
            if again.shape == (1, dim) and not _bad_outputs(again)[0]:
                out.vectors[r] = again[0]
            else:
                out.vectors[r] = 0.0
                out.failed[int(r)] = "non_finite_output: NaN/Inf or zero-norm embedding, twice"
    return out
