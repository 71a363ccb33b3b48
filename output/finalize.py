"""Finalize a job: verify every input row is present exactly once, merge the index, write the manifest.

Reads only the output folder (``OUT/.fbas/job.json``, ``scan.npz``, ``plan.npz``, the parts),
so it can run again on its own; a finalize killed midway and rerun writes the same files.

    check    every planned batch has its committed part, and no file in ``vectors/`` is a stranger
             (``output.check``); each part is read once by the ledger (``output.ledger``)
    merge    the parts' facts and the quarantine files, then the oracle: every input row exactly
             once in C + Q, with its own id (``docs/reliability.md``); in a chunked job a row is a
             chunk, and every document must have its chunks (or the row that quarantines it)
    index    the flat index the ledger wrote part by part, or one built now (``output.index``)
    manifest written last (``output.manifest``)

    OUT/index.faiss         flat (IndexIDMap2 + IndexFlatIP, exact), hnsw (M=32) or ivfpq
                            (trained on a sample of the vectors); ids are row_ids
    OUT/quarantine.parquet  row_id, id, reason (only when rows were quarantined)
    OUT/manifest.json       model, corpus, counts, index, parts with sha256, timings (written last)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import InputError, PermanentError
from core.formats import Plan, Scan
from core.ids import id_hashes
from core.layout import (
    PLAN_FILE,
    QUARANTINE,
    QUARANTINE_FILE,
    SCAN_FILE,
    SCAN_QUARANTINE,
    VECTORS,
    OutputDir,
    part_name,
    read_part_meta,
)
from core.rowfile import RowFile, blocks, equal, release
from output.check import IncompleteJobError, OracleError, check_folder, tally
from output.index import write_index
from output.ledger import PartLedger
from output.manifest import load_job, sha256_file, write_manifest

logger = logging.getLogger(__name__)

__all__ = ["finalize"]


@dataclass
class _Merged:
    """What the committed parts and the quarantine files add up to."""

    counts: np.ndarray  # times each input row was seen (parts, then quarantine)
    unexpected: list[str]
    parts: list[dict[str, Any]] = field(default_factory=list)
    truncated: int = 0
    repaired: int = 0
    tokens: int = 0
    quarantine: pa.Table | None = None

    @property
    def embedded(self) -> int:
        return sum(p["rows"] for p in self.parts)


def finalize(
    out: OutputDir,
    index_type: str = "flat",
    *,
    timings: dict[str, float] | None = None,
    redelivered: int = 0,
    ledger: PartLedger | None = None,
    state: tuple[Scan, Plan] | None = None,
) -> dict[str, Any]:
    """Verify, merge and write the final files; return the manifest (see the module docstring).

    ``ledger``: the parts already checked while the job ran (``LedgerFeeder``); any part whose file changed
    since, and every part after it, is read again. A ledger that does not fit this job is not used.
    ``state``: the scan and plan that ``ingest`` saved in ``.fbas/`` and still holds, used instead of a second
    copy read from there (their per-row arrays are most of what finalize holds)."""
    t0 = time.perf_counter()
    job = load_job(out)
    job_id, n_batches, dim = job["job"], int(job["n_batches"]), int(job["model"]["dim"])
    scan, plan = state if state is not None else (Scan.load(out.state(SCAN_FILE)), Plan.load(out.state(PLAN_FILE)))
    if plan.n_batches != n_batches:
        raise InputError(f"{out}/.fbas/{PLAN_FILE} does not match job.json: rerun the ingest")
    own = None
    if not _fits(ledger, job_id, dim, index_type, n_batches, scan):
        ledger = own = PartLedger(out, job_id, dim, index_type, scan.id_hash, job.get("planned_rows"), plan)
    assert ledger is not None
    try:
        ahead = _check_parts(out, ledger, job_id, n_batches)
        merged = _merge(out, ledger, plan, scan, job["corpus"]["id_type"])
        _check_documents(out, ledger, scan)
        q_entry, reasons = _write_quarantine(out, merged.quarantine)
        t_index = time.perf_counter()
        index = write_index(out, ledger, index_type, n_batches, dim, merged.embedded)
        counts = {
            "input_rows": scan.n_documents,
            "embedded": merged.embedded,
            "quarantined": int(merged.quarantine.num_rows if merged.quarantine is not None else 0),
            "quarantine_reasons": reasons,
            "truncated": merged.truncated,
            "repaired": merged.repaired,
            "tokens": merged.tokens,
            "batches": n_batches,
            "redelivered": redelivered,
        }
        if scan.doc_row is not None:  # rows are chunks: embedded, quarantined and truncated count chunks
            counts["documents"], counts["chunks"] = scan.n_docs, scan.n_rows
        timings = {
            **(timings or {}),
            "finalize_s": round(time.perf_counter() - t0, 3),
            "parts_checked_ahead": ahead,
            "index_s": round(time.perf_counter() - t_index, 3),
        }
        if ledger.ivf is not None:  # the ivfpq index's own work over the whole job (the ledger's and finalize's)
            ivf = ledger.ivf
            timings["index_train_s"], timings["index_add_s"] = round(ivf.train_s, 3), round(ivf.add_s, 3)
            timings["index_encode_s"] = round(ivf.encode_s, 3)  # the readers' encoding, summed over their threads
        manifest = write_manifest(
            out, job, counts=counts, index=index, parts=merged.parts, quarantine=q_entry, timings=timings
        )
    finally:
        if own is not None:
            own.discard()  # its index file, unless committed (the caller discards a ledger it passed)
    logger.info(
        "finalized %s: %d embedded, %d quarantined, index %s (%d vectors)",
        out,
        merged.embedded,
        counts["quarantined"],
        index_type,
        index["ntotal"],
    )
    return manifest


def _fits(ledger: PartLedger | None, job_id: str, dim: int, index_type: str, n_batches: int, scan: Scan) -> bool:
    """Whether a ledger passed in was kept for this very job and may still be used."""
    return (
        ledger is not None
        and not ledger.spent
        and (ledger.job, ledger.dim, ledger.index_type) == (job_id, dim, index_type)
        and ledger.next_batch <= n_batches
        and equal(ledger.id_hash, scan.id_hash)
    )


def _check_parts(out: OutputDir, ledger: PartLedger, job_id: str, n_batches: int) -> int:
    """Refuse stray files and missing batches, then bring the ledger to the last batch; returns how many
    parts it had read ahead of finalize."""
    ledger.revalidate()
    missing, stray = check_folder(out, job_id, n_batches, {b: f.stat for b, f in enumerate(ledger.facts)})
    if stray:
        raise InputError(
            f"{out}/{VECTORS} holds files that are not parts of this job: {', '.join(stray[:5])}"
            f"{' ...' if len(stray) > 5 else ''}. They are never merged: remove them, or write to a "
            "fresh --out"
        )
    if missing:
        raise IncompleteJobError(
            f"{len(missing)} of {n_batches} batches have no committed part yet (first: "
            f"{missing[:5]}): rerun the same ingest command to finish them",
            missing,
        )
    ahead = ledger.next_batch
    ledger.use_all_cores()
    if ledger.advance(n_batches) != n_batches or ledger.changed() is not None:
        raise PermanentError(
            f"parts in {out}/{VECTORS} changed while finalize read them: is another ingest "
            "writing to this folder? Rerun when it has stopped"
        )
    return ahead


def _merge(out: OutputDir, ledger: PartLedger, plan: Plan, scan: Scan, id_type: str) -> _Merged:
    """Add up the ledger's parts and every quarantine file, then apply the oracle (raises ``OracleError``)."""
    m = _Merged(counts=_copy(ledger.counts, out), unexpected=list(ledger.unexpected))
    q_tables: list[pa.Table] = []
    for b, f in enumerate(ledger.facts):
        name = part_name(b)
        if f.n_read != f.meta.get("rows"):
            m.unexpected.append(f"{name}: {f.n_read} rows, footer says {f.meta.get('rows')}")
        if f.rows is not None:  # not checked by the ledger, which had no plan for it yet
            planned = plan.rows(b)
            if not np.isin(f.rows, planned).all():
                m.unexpected.append(f"{name}: rows outside its planned batch")
            release(planned)
        m.truncated, m.repaired = m.truncated + f.truncated, m.repaired + f.repaired
        m.tokens += int(f.meta.get("tokens", 0))
        m.parts.append({"file": f"{VECTORS}/{name}", "batch": b, "rows": f.n_read, "sha256": f.sha256})
        if f.meta.get("quarantined"):
            q_tables.append(_batch_quarantine(out, b, f.meta))
    scan_q = out.state(SCAN_QUARANTINE)
    if scan_q.exists():
        q_tables.insert(0, pq.read_table(scan_q).replace_schema_metadata(None))
    if q_tables:
        arrow_id = pa.int64() if id_type == "int64" else pa.string()
        schema = pa.schema([("row_id", pa.int64()), ("id", arrow_id), ("reason", pa.string())])
        q = pa.concat_tables([qt.cast(schema) for qt in q_tables])
        m.quarantine = q.take(pa.array(np.argsort(q.column("row_id").to_numpy(), kind="stable")))
        tally(
            m.counts,
            m.quarantine.column("row_id").to_numpy(),
            id_hashes(m.quarantine.column("id")),
            scan.id_hash,
            "quarantine",
            m.unexpected,
        )
    (n_lost, lost), (n_dup, dup) = _rows_where(m.counts, lambda c: c == 0), _rows_where(m.counts, lambda c: c > 1)
    if n_lost or n_dup or m.unexpected:
        raise OracleError(
            f"the output does not hold every input row exactly once: lost {n_lost} (rows "
            f"{lost}), duplicated {n_dup} (rows {dup}), unexpected "
            f"{len(m.unexpected)} ({'; '.join(m.unexpected[:3])}). Nothing final was written; this "
            "is a bug: please report it with the folder's .fbas/ contents"
        )
    return m


def _copy(counts: np.ndarray, out: OutputDir) -> np.ndarray:
    """The ledger's counts, copied a block at a time to a file without a name (``core.rowfile``), so that the
    quarantine is added to a copy (the ledger may be used again) without holding one more array a row."""
    copy = RowFile.scratch(out.state(""), counts.dtype, len(counts)).array
    for start, block in blocks(counts):
        copy[start : start + len(block)] = block
        release(copy[start : start + len(block)])
    return copy


def _rows_where(counts: np.ndarray, test: Callable[[np.ndarray], np.ndarray]) -> tuple[int, list[int]]:
    """How many rows' counts pass ``test``, and the first five of them, a block of counts at a time."""
    n = 0
    first: list[int] = []
    for start, block in blocks(counts):
        hit = np.flatnonzero(test(block))
        n += len(hit)
        first.extend((start + hit[: 5 - len(first)]).tolist())
    return n, first


def _check_documents(out: OutputDir, ledger: PartLedger, scan: Scan) -> None:
    """A chunked job's document oracle: every document has at least one row (its chunks, or the one row that
    quarantines it), and its rows are consecutive, so with the rows' own oracle (each exactly once in C + Q,
    with its document's id) no document is lost and no chunk duplicated. The parts' own columns must agree:
    each row's ``doc_row`` is the scan's, and a document's ``chunk`` numbers rise with its rows, below its
    row count."""
    if scan.doc_row is None:
        return
    per_doc = np.bincount(scan.doc_row, minlength=scan.n_docs) if len(scan.doc_row) else np.zeros(scan.n_docs)
    lost = np.flatnonzero(per_doc == 0)
    if len(lost) or len(per_doc) != scan.n_docs or (len(scan.doc_row) > 1 and (np.diff(scan.doc_row) < 0).any()):
        raise OracleError(
            f"the chunks do not cover every document exactly once: {len(lost)} documents without a chunk (rows "
            f"{lost[:5].tolist()}), {len(per_doc)} documents seen of {scan.n_docs}. Nothing final was written; "
            "this is a bug: please report it with the folder's .fbas/ contents"
        )
    cols = [
        pq.read_table(out.vectors_part(b), columns=["row_id", "doc_row", "chunk"]) for b in range(len(ledger.facts))
    ]
    if not cols:
        return
    t = pa.concat_tables([c.replace_schema_metadata(None) for c in cols])
    rows = t.column("row_id").to_numpy()
    order = np.argsort(rows, kind="stable")
    rows, doc, chunk = rows[order], t.column("doc_row").to_numpy()[order], t.column("chunk").to_numpy()[order]
    bad = doc != scan.doc_row[rows]
    bad |= (chunk < 0) | (chunk >= per_doc[np.clip(doc, 0, len(per_doc) - 1)])
    same_doc = doc[1:] == doc[:-1]
    bad[1:] |= same_doc & (chunk[1:] <= chunk[:-1])
    if bad.any():
        at = rows[np.flatnonzero(bad)[:5]].tolist()
        raise OracleError(
            f"{int(bad.sum())} rows of the parts name another document or chunk than the job's scan (rows {at}): "
            "a part's doc_row/chunk columns disagree with its rows. Nothing final was written; this is a bug: "
            "please report it with the folder's .fbas/ contents"
        )


def _batch_quarantine(out: OutputDir, b: int, meta: dict[str, Any]) -> pa.Table:
    """Batch ``b``'s quarantine part, which must come from the same attempt as its vectors part."""
    qp = out.quarantine_part(b)
    if (read_part_meta(qp) if qp.exists() else None) != meta:
        raise IncompleteJobError(
            f"batch {b} quarantined {meta['quarantined']} rows but {QUARANTINE}/{qp.name} "
            f"is missing or from another attempt: delete {out.vectors_part(b)} and rerun",
            [b],
        )
    return pq.read_table(qp).replace_schema_metadata(None)


def _write_quarantine(out: OutputDir, quarantine: pa.Table | None) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """Write ``quarantine.parquet`` (or remove a stale one); returns its manifest entry and the count per reason."""
    q_file = out.path(QUARANTINE_FILE)
    if quarantine is None or not quarantine.num_rows:
        q_file.unlink(missing_ok=True)
        return None, {}
    OutputDir.write_atomic(q_file, lambda p: pq.write_table(quarantine, p))
    reasons: dict[str, int] = {}
    for r in quarantine.column("reason").to_pylist():
        key = r.split(":", 1)[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {"file": QUARANTINE_FILE, "rows": quarantine.num_rows, "sha256": sha256_file(q_file)}, reasons
