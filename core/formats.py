"""The scan and plan files of a job (``OUT/.fbas/scan.npz``, ``plan.npz``): what one pass over the corpus
learned per row, and the batches planned from it. ``pipeline.ingest.plan`` computes them; finalize reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Scan", "Plan", "ChunkCols", "CHUNK_FIELDS"]

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
        return int(np.count_nonzero(self.n_tokens))

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        chunked: dict[str, np.ndarray | int] = {}
        if self.doc_row is not None:
            chunked = {"doc_row": self.doc_row, "n_docs": self.n_docs}
        np.savez(
            tmp,
            n_rows=self.n_rows,
            n_tokens=self.n_tokens,
            id_hash=self.id_hash,
            q_rows=self.q_rows,
            n_truncated=self.n_truncated,
            n_repaired=self.n_repaired,
            **chunked,  # type: ignore[arg-type]
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Scan:
        with np.load(path) as z:
            return cls(
                int(z["n_rows"]),
                z["n_tokens"],
                z["id_hash"],
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

    def batch_of_row(self, n_rows: int) -> np.ndarray:
        """int32 [n_rows]: each row's batch, -1 for rows in no batch (quarantined)."""
        out = np.full(n_rows, -1, dtype=np.int32)
        out[self.order] = np.repeat(np.arange(self.n_batches, dtype=np.int32), self.sizes())
        return out

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, order=self.order, offsets=self.offsets, padded_len=self.padded_len, tokens=self.tokens)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Plan:
        with np.load(path) as z:
            return cls(z["order"], z["offsets"], z["padded_len"], z["tokens"])

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
