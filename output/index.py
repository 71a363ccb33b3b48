"""The job's FAISS index when it is not written part by part: flat, hnsw (M=32) or ivfpq (trained on a
fixed sample of the vectors); ids are row_ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from core.errors import InputError
from core.layout import INDEX_FILE, OutputDir
from output.check import OracleError
from output.ivf_index import index_params
from output.ledger import PartLedger, in_order, part_vectors
from output.manifest import sha256_file

__all__ = ["index_params", "build_index", "write_index", "check_index_kind", "IVFPQ_MIN_ROWS"]


IVFPQ_MIN_ROWS = 1000  # below this an exact flat index is as fast, and PQ codebooks would train on too few vectors


def check_index_kind(kind: str, n_rows: int) -> None:
    """Refuse, before anything is embedded, an index the corpus is too small to train."""
    if kind == "ivfpq" and n_rows < IVFPQ_MIN_ROWS:
        raise InputError(
            f"--index ivfpq needs at least {IVFPQ_MIN_ROWS:,} rows to train its quantizers; this corpus has "
            f"{n_rows:,}: use --index flat (exact search, as fast at this size) or --index hnsw"
        )


def read_vectors(out: OutputDir, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Part ``b``'s (row ids, float32 vectors ``[rows, dim]``)."""
    t = pq.read_table(out.vectors_part(b), columns=["row_id", "embedding"])
    return t.column("row_id").to_numpy(), part_vectors(t)


def iter_vectors(out: OutputDir, n_batches: int):
    for rows, v in in_order(lambda b: read_vectors(out, b), n_batches):
        if len(rows):
            yield rows, v


def build_index(out: OutputDir, kind: str, n_batches: int, dim: int, n: int) -> tuple[Any, dict[str, Any]]:
    """An hnsw or flat index over every committed part (``n`` vectors), in batch order (a flat index is written
    part by part by ``PartLedger`` unless FAISS's file layout is not the one ``output.flat_index`` knows; an
    ivfpq index is filled by the ledger, ``output.ivf_index``)."""
    import faiss

    params = index_params(kind, n, dim)
    ip = faiss.METRIC_INNER_PRODUCT
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, params["M"], ip)
        inner.hnsw.efConstruction = params["efConstruction"]
        index = faiss.IndexIDMap(inner)  # no reverse map (see ivf_index.new_ivfpq)
    else:
        raise InputError(f"index type {kind!r} is not flat or hnsw (ivfpq is built by the ledger)")
    for rows, v in iter_vectors(out, n_batches):
        index.add_with_ids(v, rows.astype(np.int64))
    return index, params


def write_index(
    out: OutputDir, ledger: PartLedger, kind: str, n_batches: int, dim: int, embedded: int
) -> dict[str, Any]:
    """Put ``OUT/index.faiss`` in place: the flat index file the ledger wrote part by part, the ivfpq index it
    filled, or an hnsw index built now from the parts; returns the manifest's ``index`` entry. Either way it
    must hold every embedded row."""
    if ledger.streams:
        written = ledger.file.n if ledger.file is not None else 0
        if written != embedded:
            raise OracleError(f"the index file holds {written} vectors, the parts {embedded}")
        params, ntotal, digest = index_params(kind, embedded, dim), embedded, ledger.commit_index()
    else:
        import faiss

        ivf = ledger.ivf
        index: Any = None
        if ivf is not None:
            params, ntotal = ivf.params, ivf.ntotal
        else:
            index, params = build_index(out, kind, n_batches, dim, embedded)
            ntotal = int(index.ntotal)
        if ntotal != embedded:
            raise OracleError(f"the index holds {ntotal} vectors, the parts {embedded}")
        digests: list[str] = []

        def write(tmp: Path) -> None:  # streamed to the file rather than through serialize_index's buffer
            if ivf is not None:
                ivf.write(tmp)  # its SQ8 copies from their file, where they were spilled
            else:
                faiss.write_index(index, str(tmp))
            digests.append(sha256_file(tmp))  # of the bytes being committed

        OutputDir.write_atomic(out.path(INDEX_FILE), write)
        digest = digests[-1]
        if ivf is not None:  # committed: its spilled copies go now (3.84 GB at 10 M rows of 384), and a later
            ledger.spent = True  # finalize needs a new ledger
            ivf.discard()
    OutputDir.remove_stale_temps(out.path(INDEX_FILE))  # left by an ingest that was killed
    return {
        "file": INDEX_FILE,
        "type": kind,
        "metric": "inner_product",
        "ntotal": ntotal,
        "params": params,
        "sha256": digest,
    }
