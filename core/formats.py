"""The scan and plan files of a job (``OUT/.fbas/scan.npz``, ``plan.npz``): what one pass over the corpus
learned per row, and the batches planned from it. ``pipeline.ingest.plan`` computes them; finalize reads them.

Their per-row arrays (the id keys, the lengths, the plan's row order) are kept raw in files of their own beside
them (``core.layout.rows_file``) and mapped when loaded (``core.rowfile``), so a job's memory does not grow
with its rows; ``PlanFile`` writes a new job's plan there window by window. Files saved before this change
(the arrays inside the ``.npz``) load as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import InputError
from core.layout import rows_file
from core.rowfile import RowFile, blocks, release, store

__all__ = ["Scan", "Plan", "PlanFile", "ChunkCols", "CHUNK_FIELDS"]

# a chunked job's per-chunk columns (vectors parts and task messages): the document's row position, the chunk's
# index in it, its word-piece span and its character span into the document's text (``core.chunking``)
CHUNK_FIELDS = ("doc_row", "chunk", "tok_start", "tok_end", "char_start", "char_end")
_CHUNK_TYPES = (np.int64, np.int32, np.int32, np.int32, np.int64, np.int64)


@dataclass
class ChunkCols:
    """Per-chunk columns (``CHUNK_FIELDS``), arrays of one length."""

    doc_row: np.ndarray
    chunk: np.ndarray
    tok_start: np.ndarray
    tok_end: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray

    @classmethod
    def empty(cls) -> ChunkCols:
        return cls(*(np.zeros(0, t) for t in _CHUNK_TYPES))

    @classmethod
    def from_lists(cls, cols: dict) -> ChunkCols:
        return cls(*(np.asarray(cols[f], t) for f, t in zip(CHUNK_FIELDS, _CHUNK_TYPES)))

    def arrays(self) -> list[np.ndarray]:
        return [getattr(self, f) for f in CHUNK_FIELDS]

    def take(self, idx: np.ndarray) -> ChunkCols:
        return ChunkCols(*(a[idx] for a in self.arrays()))

    def to_lists(self) -> dict[str, list[int]]:
        return {f: a.tolist() for f, a in zip(CHUNK_FIELDS, self.arrays())}

    @classmethod
    def concat(cls, parts: list[ChunkCols]) -> ChunkCols:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate(a).astype(t) for a, t in zip(zip(*(p.arrays() for p in parts)), _CHUNK_TYPES)))


def narrow_rows(rows: np.ndarray) -> np.ndarray:
    """Row ids in 4 bytes while they fit, else 8: what a job holds of each row until the end."""
    rows = np.asarray(rows)
    fits = len(rows) and 0 <= rows.min() and rows.max() < 2**31
    return rows.astype(np.int32 if fits else np.int64, copy=False)


@dataclass
class Scan:
    """What one pass over the corpus learned, per row (arrays of length ``n_rows``). In a chunked job a row is a
    chunk (a quarantined document is one row without tokens) and ``doc_row`` names each one's document."""

    n_rows: int
    n_tokens: np.ndarray  # int32 [N]: tokens after truncation, [CLS]/[SEP] included (estimated with
    # --lengths estimate); 0 = quarantined
    id_hash: np.ndarray  # uint64 [N]: see pipeline.ingest.read.id_hashes
    q_rows: np.ndarray  # int64 [Q]: quarantined row ids, ascending
    q_ids: list = field(default_factory=list)
    q_reasons: list[str] = field(default_factory=list)
    n_truncated: int = 0  # rows longer than max_seq_len (embedded truncated)
    n_repaired: int = 0  # rows whose invalid UTF-8 was replaced
    seconds: float = 0.0
    doc_row: np.ndarray | None = None  # int64 [N]: chunked jobs only, each row's document (corpus row position)
    n_docs: int = 0  # chunked jobs only: documents in the corpus

    @property
    def n_documents(self) -> int:
        """Corpus rows: ``n_rows``, or the documents a chunked job cut into ``n_rows`` chunks."""
        return self.n_docs if self.doc_row is not None else self.n_rows

    @property
    def n_embeddable(self) -> int:
        return sum(int(np.count_nonzero(b)) for _, b in blocks(self.n_tokens))

    def save(self, path: Path) -> None:
        """``path`` (small fields) and, first, its per-row arrays beside it (``rows_file``)."""
        store(rows_file(path, "n_tokens"), self.n_tokens.astype(np.int32, copy=False))
        store(rows_file(path, "id_hash"), self.id_hash.astype(np.uint64, copy=False))
        tmp = path.with_name(path.name + ".tmp.npz")
        chunked: dict[str, np.ndarray | int] = {}
        if self.doc_row is not None:
            chunked = {"doc_row": self.doc_row, "n_docs": self.n_docs}
        np.savez(
            tmp,
            n_rows=self.n_rows,
            q_rows=self.q_rows,
            n_truncated=self.n_truncated,
            n_repaired=self.n_repaired,
            **chunked,  # type: ignore[arg-type]
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Scan:
        """The scan saved at ``path``, its per-row arrays mapped read-only."""
        with np.load(path) as z:
            n = int(z["n_rows"])
            inside = "id_hash" in z.files  # saved before the arrays had files of their own
            return cls(
                n,
                z["n_tokens"] if inside else _open_rows(path, "n_tokens", np.int32, n),
                z["id_hash"] if inside else _open_rows(path, "id_hash", np.uint64, n),
                z["q_rows"],
                [],
                [],
                int(z["n_truncated"]),
                int(z["n_repaired"]),
                doc_row=z["doc_row"] if "doc_row" in z.files else None,
                n_docs=int(z["n_docs"]) if "n_docs" in z.files else 0,
            )


@dataclass
class Plan:
    """Batches as row-id lists: batch ``i`` is ``order[offsets[i]:offsets[i + 1]]`` (ascending row ids)."""

    order: np.ndarray  # int32 [R] while row ids fit (a job's plan), else int64: row ids, batch after batch
    offsets: np.ndarray  # int64 [B + 1]
    padded_len: np.ndarray  # int32 [B]: longest row of each batch (tokens)
    tokens: np.ndarray  # int64 [B]: real tokens of each batch

    @property
    def n_batches(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    def rows(self, i: int) -> np.ndarray:
        return self.order[self.offsets[i] : self.offsets[i + 1]]

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def padding_ratio(self) -> float:
        """Padded tokens / real tokens - 1 (0 = no padding at all)."""
        real = int(self.tokens.sum())
        padded = int((self.sizes() * self.padded_len).sum())
        return padded / real - 1 if real else 0.0

    def save(self, path: Path) -> None:
        """``path`` (the batches' sizes and lengths) and, first, the row order beside it (``rows_file``)."""
        store(rows_file(path, "order"), self.order)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp, order_dtype=self.order.dtype.str, offsets=self.offsets, padded_len=self.padded_len, tokens=self.tokens
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Plan:
        """The plan saved at ``path``, its row order mapped read-only."""
        with np.load(path) as z:
            offsets = z["offsets"]
            if "order" in z.files:  # saved before the order had a file of its own
                order = z["order"]
            else:  # a file written window by window (``PlanFile``) may be longer than its batches
                order = _open_rows(path, "order", np.dtype(str(z["order_dtype"])))
                if len(order) < int(offsets[-1]):
                    raise InputError(f"{rows_file(path, 'order')} is shorter than the plan: {_RESCAN}")
                order = order[: int(offsets[-1])]
            return cls(order, offsets, z["padded_len"], z["tokens"])

    @classmethod
    def concat(cls, plans: list[Plan]) -> Plan:
        """One plan whose batches are those of ``plans``, in order (row ids are global already)."""
        if not plans:
            return cls(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))
        sizes = np.concatenate([p.sizes() for p in plans])
        return cls(
            narrow_rows(np.concatenate([p.order for p in plans])),
            np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            np.concatenate([p.padded_len for p in plans]).astype(np.int32),
            np.concatenate([p.tokens for p in plans]).astype(np.int64),
        )


_RESCAN = "rerun the same ingest command: it scans the corpus again and keeps the parts committed already"


def _open_rows(path: Path, field: str, dtype, n: int | None = None) -> np.ndarray:
    """The per-row array ``field`` of the state file ``path``, mapped read-only."""
    try:
        return RowFile.open(rows_file(path, field), dtype, n).array
    except (OSError, ValueError) as e:
        raise InputError(f"{path.name}'s rows cannot be read ({e}): {_RESCAN}") from e


class PlanFile:
    """A new job's plan, written window by window to its row-order file (``rows_file(plan.npz, "order")``, sized
    for every row of the corpus, used up to the planned rows) while each window's batches are sent, and readable
    batch by batch meanwhile (``rows``, from another thread: the ledger checks each part against its batch)."""

    def __init__(self, path: Path, max_rows: int) -> None:
        dtype = np.int32 if max_rows < 2**31 else np.int64
        self._file = RowFile.create(rows_file(path, "order"), dtype, max_rows)
        self._ends: list[int] = []  # each batch's end in the order (published after its rows are written)
        self._padded: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []
        self.n_rows = 0

    @property
    def n_batches(self) -> int:
        return len(self._ends)

    def add(self, plan: Plan) -> None:
        """Append a window's plan (global row ids)."""
        order, at = self._file.array, self.n_rows
        if at + len(plan.order) > len(order):
            raise InputError(
                f"the plan holds {at + len(plan.order)} rows, more than the corpus's {len(order)}: the corpus changed "
                "while it was read; do not modify a corpus during an ingest, then rerun"
            )
        order[at : at + len(plan.order)] = plan.order
        release(order[at : at + len(plan.order)])
        self.n_rows += len(plan.order)
        self._padded.append(plan.padded_len)
        self._tokens.append(plan.tokens)
        self._ends.extend((at + plan.offsets[1:]).tolist())  # last: a reader sees a batch once its rows are there

    def rows(self, b: int) -> np.ndarray | None:
        """Batch ``b``'s row ids (a copy), or None while it is not planned yet."""
        ends = self._ends
        if b >= len(ends):
            return None
        lo, hi = ends[b - 1] if b else 0, ends[b]
        view = self._file.array[lo:hi]
        rows = view.copy()
        release(view)
        return rows

    def plan(self) -> Plan:
        """The whole plan, its order mapped from the file."""
        offsets = np.asarray([0, *self._ends], dtype=np.int64)
        cat = lambda xs, t: np.concatenate(xs).astype(t) if xs else np.zeros(0, t)  # noqa: E731
        return Plan(self._file.array[: self.n_rows], offsets, cat(self._padded, np.int32), cat(self._tokens, np.int64))
