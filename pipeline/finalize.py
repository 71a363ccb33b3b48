"""Finalize a job: verify every input row is present exactly once, merge the index, write the manifest.

Reads only the output folder (``OUT/.fbas/job.json``, ``scan.npz``, ``plan.npz``, the parts),
so it can run again on its own; a finalize killed midway and rerun writes the same files.

The oracle (reliability.md): E = input rows, C = rows in the committed vectors parts,
Q = quarantined rows (the scan's and the workers'). Every row must be counted exactly once
in C + Q (``lost`` = none, ``duplicated`` = more than one), every committed id must equal
the input's id at that row (``unexpected`` otherwise), and every part must belong to this
job. Files in ``vectors/`` that are not this job's planned parts are refused, never merged.

    OUT/index.faiss         flat (IndexIDMap2 + IndexFlatIP, exact), hnsw (M=32) or ivfpq
                            (trained on a sample of the vectors); ids are row_ids
    OUT/quarantine.parquet  row_id, id, reason (only when rows were quarantined)
    OUT/manifest.json       model, corpus, counts, index, parts with sha256, timings (written last)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.envs import cpu_count
from pipeline.errors import InputError, PermanentError
from pipeline.flat_index import FlatIndexFile, layout_matches, read_shard
from pipeline.plan import Plan, Scan
from pipeline.read import id_hashes
from workers.write import QUARANTINE, VECTORS, OutputDir, part_name, read_part_meta

logger = logging.getLogger(__name__)

__all__ = ["finalize", "committed_parts", "IncompleteJobError", "OracleError", "sha256_file", "load_job",
           "MANIFEST", "JOB_FILE", "SCAN_QUARANTINE"]

MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
JOB_FILE = "job.json"
PENDING_FILE = "job.pending"   # a new job's id while its scan runs (job.json is written after the last window)
SCAN_QUARANTINE = "quarantine-scan.parquet"
_PART_RE = re.compile(r"^part-(\d{6,})\.parquet$")


class IncompleteJobError(PermanentError):
    """Planned batches have no committed part yet (rerun the ingest to finish them)."""

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing


class OracleError(PermanentError):
    """Rows are lost, duplicated or unexpected: the output is not trustworthy (a bug; please report it)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _in_order(fn: Callable[[int], Any], n: int, start: int = 0) -> Iterator[Any]:
    """``fn(start), fn(start + 1), ... fn(start + n - 1)`` in order, computed ahead on threads (the per-part reads,
    decompression and hashing release the GIL; a GPU host's ingest has hundreds of parts). At most
    ``2 * workers + 1`` results are held at once; on an error or an early stop the calls not yet
    started are cancelled."""
    workers = max(1, min(8, cpu_count()))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="finalize")
    try:
        ahead: deque = deque()
        for b in range(start, start + n):
            ahead.append(pool.submit(fn, b))
            if len(ahead) > 2 * workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def load_job(out: OutputDir) -> dict[str, Any]:
    p = out.state(JOB_FILE)
    if not p.exists():
        raise InputError(f"{out} holds no fbas job (no .fbas/{JOB_FILE}): run `fbas-pipeline ingest ... --out {out}`")
    return json.loads(p.read_text(encoding="utf-8"))


def committed_parts(out: OutputDir, job: str, n_batches: int | None) -> dict[int, tuple[int, int, int]]:
    """``{batch: (docs, tokens, quarantined)}`` for this job's committed vectors parts (others are skipped);
    ``n_batches`` None: every batch index counts (the plan is not complete yet)."""
    found: dict[int, tuple[int, int, int]] = {}
    d = out.path(VECTORS)
    if not d.is_dir():
        return found
    for name in os.listdir(d):
        m = _PART_RE.match(name)
        if not m or (n_batches is not None and int(m.group(1)) >= n_batches):
            continue
        meta = read_part_meta(d / name)
        b = int(m.group(1))
        if meta and meta.get("job") == job and meta.get("batch") == b:
            found[b] = (int(meta["rows"]), int(meta["tokens"]), int(meta["quarantined"]))
    return found


def _check_folder(out: OutputDir, job: str, n_batches: int,
                  known: dict[int, tuple[int, int, int]] | None = None) -> tuple[list[int], list[str]]:
    """(missing batches, stray files) in vectors/; our own stale temp files are removed. ``known``: parts whose
    footer was read already, by file key (``_stat_key``): unchanged, they are not opened again."""
    d = out.path(VECTORS)
    present: set[int] = set()
    stray: list[str] = []
    for name in sorted(os.listdir(d)) if d.is_dir() else []:
        if ".tmp-" in name:
            (d / name).unlink(missing_ok=True)
            continue
        m = _PART_RE.match(name)
        if not m or int(m.group(1)) >= n_batches:
            stray.append(f"{VECTORS}/{name}")
            continue
        b = int(m.group(1))
        if known and b in known and _stat_key(d / name) == known[b]:
            present.add(b)
            continue
        meta = read_part_meta(d / name)
        if not meta or meta.get("job") != job or meta.get("batch") != b:
            stray.append(f"{VECTORS}/{name} (from job {meta.get('job') if meta else 'unknown'})")
            continue
        present.add(b)
    return [b for b in range(n_batches) if b not in present], stray


def _tally(counts: np.ndarray, rows: np.ndarray, id_hash: np.ndarray, corpus_hash: np.ndarray, where: str,
           unexpected: list[str]) -> None:
    """Count each row once more in ``counts``; note rows out of range and ids (by key) that differ from the
    corpus's (``corpus_hash``: every input row's id key)."""
    n = len(counts)
    bad = (rows < 0) | (rows >= n)
    if bad.any():
        unexpected.append(f"{where}: row ids out of range {rows[bad][:3].tolist()}")
        rows, id_hash = rows[~bad], id_hash[~bad]
    mism = id_hash != corpus_hash[rows]
    if mism.any():
        unexpected.append(f"{where}: ids differ from the corpus at rows {rows[mism][:3].tolist()}")
    np.add.at(counts, rows, 1)


def _index_params(kind: str, n: int, dim: int) -> dict[str, Any]:
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 200, "efSearch": 128}
    nlist = max(1, min(int(4 * math.sqrt(max(n, 1))), max(1, n // 39)))
    m = next(c for c in (dim // 8, dim // 4, dim // 2, dim, 1) if c >= 1 and dim % c == 0)
    nbits = 8 if n >= 256 * 39 else max(4, min(8, int(math.log2(max(16, n // 39)))))
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nlist, 16), "train_size": min(n, max(256 * 39,
                                                                                                 50 * nlist))}


def _vectors(t: pa.Table) -> np.ndarray:
    """A part table's ``embedding`` column as contiguous float32 ``[rows, dim]``."""
    emb = t.column("embedding").combine_chunks()
    v = emb.values.to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size).astype(np.float32, copy=False)
    return np.ascontiguousarray(v)


def _read_vectors(out: OutputDir, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Part ``b``'s (row ids, float32 vectors ``[rows, dim]``)."""
    t = pq.read_table(out.vectors_part(b), columns=["row_id", "embedding"])
    return t.column("row_id").to_numpy(), _vectors(t)


def _iter_vectors(out: OutputDir, n_batches: int):
    for rows, v in _in_order(lambda b: _read_vectors(out, b), n_batches):
        if len(rows):
            yield rows, v


def _shard_vectors(out: OutputDir, b: int, dim: int, rows: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """Batch ``b``'s vectors for the index, after checking its FAISS shard against its committed part: the
    shard must hold exactly the part's ``rows`` and ``vecs``. When it does not (missing, or rewritten by a later
    duplicate delivery) a warning says so and the part's vectors are used: the committed part is the truth."""
    if not len(rows):
        return vecs
    try:
        got = read_shard(out.shard(b).read_bytes(), dim)
    except FileNotFoundError:
        got = None
    if got is not None and np.array_equal(got[0], rows) and np.array_equal(got[1], vecs):
        return got[1]
    logger.warning("shard %s is missing or differs from its committed part: the part's vectors are used",
                   out.shard(b).name)
    return vecs


def _stat_key(path: Path) -> tuple[int, ...] | None:
    """(inode, size, mtime, ctime) of a committed file: a part is written once under a new inode (rename or
    link), so an unchanged key means unchanged bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class PartFacts:
    """What finalize keeps of one committed vectors part (its rows are counted and its vectors merged as it is
    read)."""
    stat: tuple[int, ...]
    meta: dict[str, Any]
    n_read: int                  # rows in the file (the footer's ``rows`` must agree)
    rows: np.ndarray             # row ids (int32 while they fit), for the plan check
    truncated: int
    repaired: int
    sha256: str


def read_part_facts(out: OutputDir, b: int, job: str,
                    vectors: bool = False) -> tuple[PartFacts, np.ndarray, np.ndarray | None] | None:
    """Part ``b``'s facts, its ids' keys (``read.id_hashes``) and, with ``vectors``, its row ids and vectors
    as ``_vectors`` gives them; None when it is absent, not this job's batch ``b`` (by its footer, checked
    before the table is decoded) or was replaced while it was read. The file is read once: hashed, then
    decoded from memory."""
    path = out.vectors_part(b)
    before = _stat_key(path)
    if before is None:
        return None
    data = path.read_bytes()
    if _stat_key(path) != before:
        return None
    meta = read_part_meta(pa.BufferReader(data)) or {}
    if meta.get("job") != job or meta.get("batch") != b:
        return None
    t = pq.read_table(pa.BufferReader(data), columns=["row_id", "id", "truncated", "repaired"]
                      + (["embedding"] if vectors else []))
    rows = t.column("row_id").to_numpy()
    vecs = (rows, _vectors(t)) if vectors else None
    if len(rows) and 0 <= rows.min() and rows.max() < 2**31:
        rows = rows.astype(np.int32)
    return PartFacts(before, meta, t.num_rows, rows,
                     int(np.count_nonzero(t.column("truncated").to_numpy(zero_copy_only=False))),
                     int(np.count_nonzero(t.column("repaired").to_numpy(zero_copy_only=False))),
                     hashlib.sha256(data).hexdigest()), id_hashes(t.column("id")), vecs


class PartLedger:
    """Finalize's per-part work, done in batch order: each committed part is read once, its rows counted
    against the corpus's ids (``id_hash``: the id key of every input row), its facts (footer, row ids,
    SHA-256) kept and, for a flat index, its shard's vectors appended to the index file
    (``FlatIndexFile``; ``planned_rows``: the rows the plan holds, when known, else read from job.json
    once it is written).

    ``finalize`` makes one and runs it over every part; ``ingest`` makes one when the job starts and feeds it
    (``LedgerFeeder``) while later batches are still embedding, so that finalize only reads the last parts.
    A part is recorded only when its footer names this job and batch. ``revalidate`` starts over when a
    recorded part's file changed since it was read; ``changed`` tells whether one did. ``discard`` removes
    an index file that was not committed; ``close`` does too and ends the ledger (a feeder still running
    cannot start another file).
    """

    def __init__(self, out: OutputDir, job: str, dim: int, index_type: str, id_hash: np.ndarray,
                 planned_rows: int | None = None) -> None:
        self.out, self.job, self.dim, self.index_type, self.id_hash = out, job, dim, index_type, id_hash
        self.planned_rows = planned_rows
        self.file: FlatIndexFile | None = None
        self.spent = False       # the index file was committed: a later finalize needs a new ledger
        self._closed = False
        self._streams: bool | None = None
        self._born = time.time_ns()   # a job.json older than this is an earlier attempt's (at worst, one written
        #                               within a clock tick of this is not trusted: the file is then hashed at commit)
        self._start()

    def _start(self) -> None:
        self.facts: list[PartFacts] = []
        self.counts = np.zeros(len(self.id_hash), dtype=np.uint16)   # times each input row was seen
        self.unexpected: list[str] = []
        self.discard()

    @property
    def streams(self) -> bool:
        """Whether this ledger writes the flat index file itself (FAISS imported here, on first use, so by the
        threads that read parts for the ledger rather than by ingest before its first batch: 0.65 s measured)."""
        if self._streams is None:
            self._streams = self.index_type == "flat" and layout_matches(self.dim)
        return self._streams

    def _planned(self) -> int | None:
        if self.planned_rows is None:
            path = self.out.state(JOB_FILE)   # written once, last, when the plan is complete (atomically)
            if path.exists() and path.stat().st_mtime_ns >= self._born:
                job = json.loads(path.read_text(encoding="utf-8"))
                if job.get("job") == self.job:
                    self.planned_rows = int(job["planned_rows"])
        return self.planned_rows

    def _append(self, rows: np.ndarray, vecs: np.ndarray) -> None:
        if self._closed:
            raise RuntimeError("the ledger was closed")
        self._open_file()
        if self.file.expected is None and self._planned() is not None:
            self.file.expect(self.planned_rows)
        self.file.add(rows, vecs)

    @property
    def next_batch(self) -> int:
        return len(self.facts)

    def _one(self, b: int) -> tuple[PartFacts, np.ndarray, tuple[np.ndarray, np.ndarray] | None] | None:
        got = read_part_facts(self.out, b, self.job, vectors=self.streams)
        if got is None:
            return None
        facts, id_hash, vecs = got
        if vecs is not None:
            vecs = (vecs[0], _shard_vectors(self.out, b, self.dim, *vecs))
        return facts, id_hash, vecs

    def advance(self, stop: int | None = None, *, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Record parts from ``next_batch`` on, in order, up to ``stop`` (None: while parts are committed) or the
        first part that is absent or not this job's; returns ``next_batch``."""
        first = self.next_batch
        if stop is None:  # the committed run from here (parts are committed roughly in order)
            stop = first
            while self.out.vectors_part(stop).exists():
                stop += 1
        for got in _in_order(self._one, stop - first, first):
            if got is None or should_stop():
                break
            facts, id_hash, vecs = got
            if vecs is not None and len(vecs[0]):
                self._append(*vecs)   # first: if it fails, nothing of this part is recorded
            _tally(self.counts, facts.rows, id_hash, self.id_hash, part_name(self.next_batch), self.unexpected)
            self.facts.append(facts)
        return self.next_batch

    def commit_index(self) -> str:
        """Put the flat index file in place (an empty one when no part had vectors); returns its SHA-256."""
        digest = self._open_file().commit()
        self.file, self.spent = None, True
        return digest

    def _open_file(self) -> FlatIndexFile:
        if self.file is None:
            self.file = FlatIndexFile(self.out.path(INDEX_FILE), self.dim)
        return self.file

    def discard(self) -> None:
        if self.file is not None:
            self.file.discard()
            self.file = None

    def close(self) -> None:
        self._closed = True
        self.discard()

    def changed(self) -> int | None:
        """The first recorded part whose file changed since it was read, or None."""
        return next((b for b, f in enumerate(self.facts) if _stat_key(self.out.vectors_part(b)) != f.stat), None)

    def revalidate(self) -> None:
        """Start over if a recorded part's file changed since it was read (a flat index cannot drop a tail)."""
        changed = self.changed()
        if changed is not None:
            logger.warning("part %s changed after it was checked: checking every part again", part_name(changed))
            self._start()


class LedgerFeeder:
    """Feeds a ``PartLedger`` on a background thread while a job runs (every ``interval`` seconds); ``stop()``
    waits for it and returns the ledger. Errors are logged and end the feeding: finalize redoes that work."""

    def __init__(self, ledger: PartLedger, interval: float = 0.25) -> None:
        self.ledger, self.interval = ledger, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="finalize-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.ledger.advance(should_stop=self._stop.is_set)
                self._stop.wait(self.interval)
        except Exception as e:  # noqa: BLE001 - finalize reads the parts again and reports what is wrong
            logger.warning("checking parts ahead of finalize stopped (finalize will read them): %s", e)

    def stop(self) -> PartLedger:
        self._stop.set()
        self._thread.join()
        return self.ledger


def build_index(out: OutputDir, kind: str, n_batches: int, dim: int, n: int, n_rows: int) -> tuple[Any, dict[str, Any]]:
    """An hnsw, ivfpq or flat index over every committed part (``n`` vectors, row ids < ``n_rows``), in batch
    order (a flat index is written part by part by ``PartLedger`` unless FAISS's file layout is not the one
    ``pipeline.flat_index`` knows)."""
    import faiss

    params = _index_params(kind, n, dim)
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, params["M"], ip)
        inner.hnsw.efConstruction = params["efConstruction"]
        index = faiss.IndexIDMap2(inner)
    elif kind == "ivfpq":
        quant = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFPQ(quant, dim, params["nlist"], params["m"], params["nbits"], ip)
        rng = np.random.default_rng(0)
        take = rng.random(n_rows) < min(1.0, params["train_size"] / max(n, 1))  # a fixed sample: deterministic
        sample = [v[take[r]] for r, v in _iter_vectors(out, n_batches)]
        xt = np.concatenate(sample) if sample else np.zeros((0, dim), np.float32)
        if len(xt) < params["nlist"]:
            raise PermanentError(f"ivfpq needs at least {params['nlist']} vectors to train: use --index flat")
        ivf.train(xt)
        params["trained_on"] = len(xt)
        index = ivf  # faiss's Python wrapper keeps the quantizer alive with the index
    else:
        raise InputError(f"index type {kind!r} is not flat, hnsw or ivfpq")
    for rows, v in _iter_vectors(out, n_batches):
        index.add_with_ids(v, rows.astype(np.int64))
    return index, params


def _write_atomic_bytes(path: Path, data: bytes) -> None:
    OutputDir.write_atomic(path, lambda p: p.write_bytes(data))


def finalize(out: OutputDir, index_type: str = "flat", *, timings: dict[str, float] | None = None,
             redelivered: int = 0, ledger: PartLedger | None = None) -> dict[str, Any]:
    """Verify, merge and write the final files; return the manifest (see the module docstring).

    ``ledger``: the parts already checked while the job ran (``LedgerFeeder``); any part whose file changed
    since, and every part after it, is read again."""
    t0 = time.perf_counter()
    job = load_job(out)
    job_id, n_batches, dim = job["job"], int(job["n_batches"]), int(job["model"]["dim"])
    scan = Scan.load(out.state("scan.npz"))
    plan = Plan.load(out.state("plan.npz"))
    if plan.n_batches != n_batches:
        raise InputError(f"{out}/.fbas/plan.npz does not match job.json: rerun the ingest")
    if ledger is None or ledger.spent or (ledger.job, ledger.dim, ledger.index_type) != (job_id, dim, index_type) \
            or ledger.next_batch > n_batches or not np.array_equal(ledger.id_hash, scan.id_hash):
        own = PartLedger(out, job_id, dim, index_type, scan.id_hash, job.get("planned_rows"))
        try:
            return finalize(out, index_type, timings=timings, redelivered=redelivered, ledger=own)
        finally:
            own.discard()   # its index file, unless committed (the caller discards a ledger it passed)
    ledger.revalidate()
    missing, stray = _check_folder(out, job_id, n_batches, {b: f.stat for b, f in enumerate(ledger.facts)})
    if stray:
        raise InputError(f"{out}/{VECTORS} holds files that are not parts of this job: {', '.join(stray[:5])}"
                         f"{' ...' if len(stray) > 5 else ''}. They are never merged: remove them, or write to a "
                         "fresh --out")
    if missing:
        raise IncompleteJobError(f"{len(missing)} of {n_batches} batches have no committed part yet (first: "
                                 f"{missing[:5]}): rerun the same ingest command to finish them", missing)
    ahead = ledger.next_batch
    if ledger.advance(n_batches) != n_batches or ledger.changed() is not None:
        raise PermanentError(f"parts in {out}/{VECTORS} changed while finalize read them: is another ingest "
                             "writing to this folder? Rerun when it has stopped")

    n = scan.n_rows
    counts = ledger.counts.copy()          # the parts' rows, counted as they were read
    unexpected: list[str] = list(ledger.unexpected)
    parts: list[dict[str, Any]] = []
    q_tables: list[pa.Table] = []
    n_trunc = n_rep = tokens = 0
    for b, f in enumerate(ledger.facts):
        name = part_name(b)
        if f.n_read != f.meta.get("rows"):
            unexpected.append(f"{name}: {f.n_read} rows, footer says {f.meta.get('rows')}")
        if not np.isin(f.rows, plan.rows(b)).all():
            unexpected.append(f"{name}: rows outside its planned batch")
        n_trunc, n_rep, tokens = n_trunc + f.truncated, n_rep + f.repaired, tokens + int(f.meta.get("tokens", 0))
        parts.append({"file": f"{VECTORS}/{name}", "batch": b, "rows": f.n_read, "sha256": f.sha256})
        if f.meta.get("quarantined"):
            qp = out.quarantine_part(b)
            qmeta = read_part_meta(qp) if qp.exists() else None
            if qmeta != f.meta:
                raise IncompleteJobError(f"batch {b} quarantined {f.meta['quarantined']} rows but "
                                         f"{QUARANTINE}/{qp.name} is missing or from another attempt: delete "
                                         f"{out.vectors_part(b)} and rerun", [b])
            q_tables.append(pq.read_table(qp).replace_schema_metadata(None))
    scan_q = out.state(SCAN_QUARANTINE)
    if scan_q.exists():
        q_tables.insert(0, pq.read_table(scan_q).replace_schema_metadata(None))
    id_type = pa.int64() if job["corpus"]["id_type"] == "int64" else pa.string()
    if q_tables:
        quarantine = pa.concat_tables([qt.cast(pa.schema([("row_id", pa.int64()), ("id", id_type),
                                                          ("reason", pa.string())])) for qt in q_tables])
        quarantine = quarantine.take(pa.array(np.argsort(quarantine.column("row_id").to_numpy(), kind="stable")))
        _tally(counts, quarantine.column("row_id").to_numpy(), id_hashes(quarantine.column("id")), scan.id_hash,
               "quarantine", unexpected)
    else:
        quarantine = None

    lost = np.flatnonzero(counts == 0)
    dup = np.flatnonzero(counts > 1)
    if len(lost) or len(dup) or unexpected:
        raise OracleError(f"the output does not hold every input row exactly once: lost {len(lost)} (rows "
                          f"{lost[:5].tolist()}), duplicated {len(dup)} (rows {dup[:5].tolist()}), unexpected "
                          f"{len(unexpected)} ({'; '.join(unexpected[:3])}). Nothing final was written; this is a "
                          "bug: please report it with the folder's .fbas/ contents")

    reasons: dict[str, int] = {}
    q_file = out.path("quarantine.parquet")
    q_entry = None
    if quarantine is not None and quarantine.num_rows:
        OutputDir.write_atomic(q_file, lambda p: pq.write_table(quarantine, p))
        q_entry = {"file": "quarantine.parquet", "rows": quarantine.num_rows, "sha256": sha256_file(q_file)}
        for r in quarantine.column("reason").to_pylist():
            key = r.split(":", 1)[0]
            reasons[key] = reasons.get(key, 0) + 1
    else:
        q_file.unlink(missing_ok=True)

    t_index = time.perf_counter()
    embedded = sum(p["rows"] for p in parts)
    if ledger.streams:
        written = ledger.file.n if ledger.file is not None else 0
        if written != embedded:
            raise OracleError(f"the index file holds {written} vectors, the parts {embedded}")
        params, ntotal, index_sha = _index_params(index_type, embedded, dim), embedded, ledger.commit_index()
    else:
        import faiss

        index, params = build_index(out, index_type, n_batches, dim, embedded, n)
        if index.ntotal != embedded:
            raise OracleError(f"the index holds {index.ntotal} vectors, the parts {embedded}")
        digest: list[str] = []

        def write_index(tmp: Path) -> None:  # streamed to the file: serialize_index's buffer took seconds more
            faiss.write_index(index, str(tmp))
            digest.append(sha256_file(tmp))   # of the bytes being committed

        OutputDir.write_atomic(out.path(INDEX_FILE), write_index)
        ntotal, index_sha = int(index.ntotal), digest[-1]
    for stale in out.root.glob(f"{INDEX_FILE}.tmp-*"):   # left by an ingest that was killed
        stale.unlink(missing_ok=True)
    index_s = time.perf_counter() - t_index

    manifest = {
        "format": 1,
        "job": job_id,
        "model": job["model"],
        "corpus": job["corpus"],
        "settings": job.get("settings", {}),
        "counts": {"input_rows": n, "embedded": embedded, "quarantined": int(quarantine.num_rows if quarantine
                                                                               else 0),
                   "quarantine_reasons": reasons, "truncated": n_trunc, "repaired": n_rep, "tokens": tokens,
                   "batches": n_batches, "redelivered": redelivered},
        "oracle": {"lost": 0, "duplicated": 0, "unexpected": 0},
        "index": {"file": INDEX_FILE, "type": index_type, "metric": "inner_product", "ntotal": ntotal,
                  "params": params, "sha256": index_sha},
        "parts": parts,
        "quarantine": q_entry,
        "timings": {**(timings or {}), "finalize_s": round(time.perf_counter() - t0, 3), "parts_checked_ahead": ahead,
                    "index_s": round(index_s, 3)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_atomic_bytes(out.path(MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    logger.info("finalized %s: %d embedded, %d quarantined, index %s (%d vectors)", out, embedded,
                manifest["counts"]["quarantined"], index_type, ntotal)
    return manifest
