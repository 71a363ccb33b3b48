"""The writers of one batch's results (Parquet vectors part, quarantine part).

    OUT/vectors/part-000123.parquet        row_id int64, id, embedding fixed_size_list<float32>[dim],
                                           n_tokens int32, truncated bool, repaired bool
    OUT/.fbas/quarantine/part-000123.parquet  row_id, id, reason (only when the batch quarantined rows)

The index is built from the vectors parts by the producer's ledger (``output.ledger``), so a worker writes
each vector once. The vectors part is written without dictionary encoding and without column statistics
(neither serves a column of float vectors, and both cost more than the write itself).

Names are a pure function of the batch index, so a batch delivered twice writes the same
files. Every file is written to ``<name>.tmp-<host>-<pid>-<random>`` in the same folder,
flushed to disk and renamed over the final name (``os.replace``): a reader sees the old file,
the new one, or nothing, never half a file. The vectors part is written last: it is the
batch's commit point, and its Parquet footer metadata (``fbas`` key) says which job and batch
it belongs to, so files from another run are recognised and never merged. Every path is
built from integers inside the output folder and checked to stay inside it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.formats import ChunkCols
from core.layout import FORMAT, META_KEY, OutputDir, read_part_meta, vectors_schema

logger = logging.getLogger(__name__)

__all__ = ["OutputDir", "BatchOutput", "write_batch", "FORMAT", "META_KEY", "vectors_schema"]


@dataclass
class BatchOutput:
    """One batch's results, ready to write."""

    job: str
    batch: int
    model: str  # model fingerprint
    dim: int
    id_type: str  # int64 | string
    row_ids: np.ndarray  # int64 [n] embedded rows
    ids: list  # original ids of those rows
    vectors: np.ndarray  # float32 [n, dim]
    n_tokens: np.ndarray  # int32 [n]
    truncated: np.ndarray  # bool [n]
    repaired: np.ndarray  # bool [n]
    q_row_ids: np.ndarray  # int64 [q] quarantined rows of the batch
    q_ids: list
    q_reasons: list[str]
    chunks: ChunkCols | None = None  # a chunked job's columns of the embedded rows

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "job": self.job,
            "batch": self.batch,
            "model": self.model,
            "rows": len(self.row_ids),
            "quarantined": len(self.q_row_ids),
            "tokens": int(self.n_tokens.sum(dtype=np.int64)),
        }


PART_WRITE_OPTIONS: dict[str, Any] = {"compression": "none", "use_dictionary": False, "write_statistics": False}


def _id_array(ids: list, id_type: str) -> pa.Array:
    return pa.array(ids, type=pa.int64() if id_type == "int64" else pa.string())


def write_batch(out: OutputDir, b: BatchOutput) -> bool:
    """Write the quarantine part (if any), then the vectors part (the commit point).

    Returns False, writing nothing, when this job's part for the batch is already committed (a
    duplicate delivery): the first commit wins, so a committed batch never changes afterwards."""

    def ours(path: Path) -> bool:
        meta = read_part_meta(path) or {}
        return bool(meta) and meta.get("job") == b.job and meta.get("batch") == b.batch

    if ours(out.vectors_part(b.batch)):
        return False
    n = len(b.row_ids)
    if b.vectors.shape != (n, b.dim) or b.vectors.dtype != np.float32:
        raise ValueError(f"vectors have shape {b.vectors.shape} {b.vectors.dtype}, expected ({n}, {b.dim}) float32")
    meta = b.meta()
    if len(b.q_row_ids):
        qt = pa.table(
            {
                "row_id": pa.array(b.q_row_ids, pa.int64()),
                "id": _id_array(b.q_ids, b.id_type),
                "reason": pa.array(b.q_reasons, pa.string()),
            }
        )
        qt = qt.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
        out.write_atomic(out.quarantine_part(b.batch), lambda p: pq.write_table(qt, p))
    else:
        out.quarantine_part(b.batch).unlink(missing_ok=True)  # a stale one from an earlier, different attempt

    schema = vectors_schema(b.dim, b.id_type, meta, chunked=b.chunks is not None)
    flat = pa.array(np.ascontiguousarray(b.vectors).reshape(-1), type=pa.float32())
    columns = [
        pa.array(b.row_ids, pa.int64()),
        _id_array(b.ids, b.id_type),
        pa.FixedSizeListArray.from_arrays(flat, b.dim),
        pa.array(b.n_tokens, pa.int32()),
        pa.array(b.truncated, pa.bool_()),
        pa.array(b.repaired, pa.bool_()),
    ]
    if b.chunks is not None:
        columns += [pa.array(a) for a in b.chunks.arrays()]
    table = pa.Table.from_arrays(columns, schema=schema)
    committed = out.write_atomic(
        out.vectors_part(b.batch), lambda p: pq.write_table(table, p, **PART_WRITE_OPTIONS), keep_existing=ours
    )
    logger.debug("batch %d: wrote %d vectors, %d quarantined (committed: %s)", b.batch, n, len(b.q_row_ids), committed)
    return committed
