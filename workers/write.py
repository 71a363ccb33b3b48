"""The output folder and the writers of one batch's results (Parquet part, FAISS shard, quarantine part).

    OUT/vectors/part-000123.parquet        row_id int64, id, embedding fixed_size_list<float32>[dim],
                                           n_tokens int32, truncated bool, repaired bool
    OUT/.fbas/shards/part-000123.faiss     IndexIDMap2(IndexFlatIP) over the same rows, ids = row_id
    OUT/.fbas/quarantine/part-000123.parquet  row_id, id, reason (only when the batch quarantined rows)

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
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

__all__ = ["OutputDir", "BatchOutput", "write_batch", "part_name", "FORMAT", "META_KEY", "vectors_schema"]

FORMAT = 1
META_KEY = b"fbas"
VECTORS, STATE, SHARDS, QUARANTINE = "vectors", ".fbas", ".fbas/shards", ".fbas/quarantine"


def part_name(batch: int, suffix: str = ".parquet") -> str:
    """``part-000123.parquet``: six digits or more, so names sort in batch order up to a million batches."""
    if batch < 0:
        raise ValueError(f"batch index {batch} < 0")
    return f"part-{batch:06d}{suffix}"


def vectors_schema(dim: int, id_type: str, meta: dict | None = None) -> pa.Schema:
    fields = [pa.field("row_id", pa.int64(), nullable=False),
              pa.field("id", pa.int64() if id_type == "int64" else pa.string(), nullable=False),
              pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
              pa.field("n_tokens", pa.int32(), nullable=False),
              pa.field("truncated", pa.bool_(), nullable=False),
              pa.field("repaired", pa.bool_(), nullable=False)]
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()} if meta else None)


class OutputDir:
    """A local (or shared-filesystem) output folder with confined paths and atomic writes."""

    def __init__(self, root: str | Path) -> None:
        s = str(root)
        if s.startswith("file://"):
            s = s[len("file://"):]
        elif "://" in s:
            raise ConfigError(f"output {s!r}: object-store outputs are not supported yet; write to a local or shared "
                              "folder (every worker must see the same path)")
        self.root = Path(s).expanduser().resolve()

    def __str__(self) -> str:
        return str(self.root)

    def path(self, rel: str) -> Path:
        """``root/rel``, refusing anything that would leave the output folder."""
        p = (self.root / rel).resolve()
        if p != self.root and self.root not in p.parents:
            raise InputError(f"path {rel!r} would leave the output folder {self.root}: refused")
        return p

    def vectors_part(self, batch: int) -> Path:
        return self.path(f"{VECTORS}/{part_name(batch)}")

    def shard(self, batch: int) -> Path:
        return self.path(f"{SHARDS}/{part_name(batch, '.faiss')}")

    def quarantine_part(self, batch: int) -> Path:
        return self.path(f"{QUARANTINE}/{part_name(batch)}")

    def state(self, name: str) -> Path:
        return self.path(f"{STATE}/{name}")

    def make_dirs(self) -> None:
        for d in (VECTORS, SHARDS, QUARANTINE):
            self.path(d).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def temp_path(final: Path) -> Path:
        """A new temp name beside ``final``: ``<name>.tmp-<host>-<pid>-<random>`` (what cleanup looks for)."""
        return final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    @staticmethod
    def write_atomic(final: Path, write: Callable[[Path], None],
                     keep_existing: Callable[[Path], bool] | None = None) -> bool:
        """``write(tmp_path)``, fsync, then rename over ``final``; the temp file is removed on any failure.

        With ``keep_existing``, the commit never replaces a file for which ``keep_existing(final)`` is true
        (hard link, which fails if the name exists, instead of rename): the first commit of a batch wins
        and later duplicate deliveries change nothing. Returns False when the existing file was kept."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = OutputDir.temp_path(final)
        try:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if keep_existing is None:
                os.replace(tmp, final)
                return True
            try:
                os.link(tmp, final)
            except FileExistsError:
                if keep_existing(final):
                    return False
                os.replace(tmp, final)  # a stray file from another job under our name: ours replaces it
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def read_part_meta(self, batch: int) -> dict | None:
        """The ``fbas`` footer metadata of a committed vectors part, or None if absent or unreadable."""
        return read_part_meta(self.vectors_part(batch))


def read_part_meta(path: Path | pa.NativeFile) -> dict | None:
    try:
        md = pq.read_schema(path).metadata or {}
        return json.loads(md[META_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowInvalid):
        return None


@dataclass
class BatchOutput:
    """One batch's results, ready to write."""

    job: str
    batch: int
    model: str                 # model fingerprint
    dim: int
    id_type: str               # int64 | string
    row_ids: np.ndarray        # int64 [n] embedded rows
    ids: list                  # original ids of those rows
    vectors: np.ndarray        # float32 [n, dim]
    n_tokens: np.ndarray       # int32 [n]
    truncated: np.ndarray      # bool [n]
    repaired: np.ndarray       # bool [n]
    q_row_ids: np.ndarray      # int64 [q] quarantined rows of the batch
    q_ids: list
    q_reasons: list[str]

    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "job": self.job, "batch": self.batch, "model": self.model, "rows": len(self.row_ids),
                "quarantined": len(self.q_row_ids), "tokens": int(self.n_tokens.sum(dtype=np.int64))}


def _id_array(ids: list, id_type: str) -> pa.Array:
    return pa.array(ids, type=pa.int64() if id_type == "int64" else pa.string())


def write_batch(out: OutputDir, b: BatchOutput) -> bool:
    """Write quarantine part (if any), FAISS shard, then the vectors part (the commit point).

    Returns False, writing nothing, when this job's part for the batch is already committed (a
    duplicate delivery): the first commit wins, so a committed batch never changes afterwards."""
    import faiss

    def ours(path: Path) -> bool:
        meta = read_part_meta(path)
        return bool(meta) and meta.get("job") == b.job and meta.get("batch") == b.batch

    if ours(out.vectors_part(b.batch)):
        return False
    n = len(b.row_ids)
    if b.vectors.shape != (n, b.dim) or b.vectors.dtype != np.float32:
        raise ValueError(f"vectors have shape {b.vectors.shape} {b.vectors.dtype}, expected ({n}, {b.dim}) float32")
    meta = b.meta()
    if len(b.q_row_ids):
        qt = pa.table({"row_id": pa.array(b.q_row_ids, pa.int64()), "id": _id_array(b.q_ids, b.id_type),
                       "reason": pa.array(b.q_reasons, pa.string())})
        qt = qt.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
        out.write_atomic(out.quarantine_part(b.batch), lambda p: pq.write_table(qt, p))
    else:
        out.quarantine_part(b.batch).unlink(missing_ok=True)  # a stale one from an earlier, different attempt

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(b.dim))
    if n:
        index.add_with_ids(np.ascontiguousarray(b.vectors), np.ascontiguousarray(b.row_ids, dtype=np.int64))
    blob = faiss.serialize_index(index)
    out.write_atomic(out.shard(b.batch), lambda p: p.write_bytes(blob.tobytes()))

    schema = vectors_schema(b.dim, b.id_type, meta)
    flat = pa.array(np.ascontiguousarray(b.vectors).reshape(-1), type=pa.float32())
    table = pa.Table.from_arrays([
        pa.array(b.row_ids, pa.int64()), _id_array(b.ids, b.id_type),
        pa.FixedSizeListArray.from_arrays(flat, b.dim), pa.array(b.n_tokens, pa.int32()),
        pa.array(b.truncated, pa.bool_()), pa.array(b.repaired, pa.bool_())], schema=schema)
    committed = out.write_atomic(out.vectors_part(b.batch), lambda p: pq.write_table(table, p, compression="none"),
                                 keep_existing=ours)
    logger.debug("batch %d: wrote %d vectors, %d quarantined (committed: %s)", b.batch, n, len(b.q_row_ids),
                 committed)
    return committed
