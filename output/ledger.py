"""The ledger of committed parts: each part read once, in batch order, its rows counted against the corpus's
ids and its vectors put in the index while later batches still embed: appended to the index file for a flat
index, encoded by the reading threads and appended to the index for ivfpq (``output.ivf_index``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.envs import cpu_count
from core.formats import Plan, PlanFile, narrow_rows
from core.ids import id_hashes
from core.layout import INDEX_FILE, JOB_FILE, OutputDir, drop_cached, part_name, read_part_meta
from core.rowfile import RowFile, release
from output.check import stat_key, tally
from output.flat_index import FlatIndexFile, layout_matches
from output.ivf_index import IvfPqBuilder, PartCodes, index_params

logger = logging.getLogger(__name__)

__all__ = ["PartLedger", "LedgerFeeder", "PartFacts", "read_part_facts", "in_order", "part_vectors"]


def in_order(fn: Callable[[int], Any], n: int, start: int = 0, workers: int = 0) -> Iterator[Any]:
    """``fn(start), fn(start + 1), ... fn(start + n - 1)`` in order, computed ahead on ``workers`` threads (0: the
    cores, at most 8; the per-part reads, decompression, hashing and index encoding release the GIL; a GPU ingest
    has hundreds of parts). At most ``2 * workers + 1`` results are held at once; on an error or an early stop
    the calls not yet started are cancelled."""
    workers = workers or max(1, min(8, cpu_count()))
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


def part_vectors(t: pa.Table) -> np.ndarray:
    """A part table's ``embedding`` column as contiguous float32 ``[rows, dim]``."""
    emb = t.column("embedding").combine_chunks()
    v = emb.values.to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size).astype(np.float32, copy=False)
    return np.ascontiguousarray(v)


@dataclass
class PartFacts:
    """What finalize keeps of one committed vectors part (its rows are counted and its vectors merged as it is
    read)."""

    stat: tuple[int, ...]
    meta: dict[str, Any]
    n_read: int  # rows in the file (the footer's ``rows`` must agree)
    rows: np.ndarray | None  # row ids (int32 while they fit), for finalize's plan check; None once checked
    truncated: int
    repaired: int
    sha256: str


def read_part_facts(
    out: OutputDir, b: int, job: str, vectors: bool = False
) -> tuple[PartFacts, np.ndarray, tuple[np.ndarray, np.ndarray] | None] | None:
    """Part ``b``'s facts, its ids' keys (``read.id_hashes``) and, with ``vectors``, its row ids and vectors
    as ``part_vectors`` gives them; None when it is absent, not this job's batch ``b`` (by its footer, checked
    before the table is decoded) or was replaced while it was read. The file is read once: hashed, then
    decoded from memory."""
    path = out.vectors_part(b)
    before = stat_key(path)
    if before is None:
        return None
    with open(path, "rb") as f:
        data = f.read()
        drop_cached(f.fileno())  # read once: its cache pages go back for the workers' next parts
    if stat_key(path) != before:
        return None
    meta = read_part_meta(pa.BufferReader(data)) or {}
    if meta.get("job") != job or meta.get("batch") != b:
        return None
    t = pq.read_table(
        pa.BufferReader(data), columns=["row_id", "id", "truncated", "repaired"] + (["embedding"] if vectors else [])
    )
    rows = t.column("row_id").to_numpy()
    vecs = (rows, part_vectors(t)) if vectors else None
    rows = narrow_rows(rows)
    return (
        PartFacts(
            before,
            meta,
            t.num_rows,
            rows,
            int(np.count_nonzero(t.column("truncated").to_numpy(zero_copy_only=False))),
            int(np.count_nonzero(t.column("repaired").to_numpy(zero_copy_only=False))),
            hashlib.sha256(data).hexdigest(),
        ),
        id_hashes(t.column("id")),
        vecs,
    )


class PartLedger:
    """Finalize's per-part work, done in batch order: each committed part is read once, its rows counted
    against the corpus's ids (``id_hash``: the id key of every input row), its facts (footer, row ids,
    SHA-256) kept and, for a flat index, its vectors appended to the index file
    (``FlatIndexFile``; ``planned_rows``: the rows the plan holds, when known, else read from job.json
    once it is written).

    ``finalize`` makes one and runs it over every part; ``ingest`` makes one when the job starts and feeds it
    (``LedgerFeeder``) while later batches are still embedding, so that finalize only reads the last parts.
    A part is recorded only when its footer names this job and batch. ``revalidate`` starts over when a
    recorded part's file changed since it was read; ``changed`` tells whether one did. ``discard`` removes
    an index file that was not committed; ``close`` does too and ends the ledger (a feeder still running
    cannot start another file).
    """

    def __init__(
        self,
        out: OutputDir,
        job: str,
        dim: int,
        index_type: str,
        id_hash: np.ndarray,
        planned_rows: int | None = None,
        plan: Plan | PlanFile | None = None,
    ) -> None:
        self.out, self.job, self.dim, self.index_type, self.id_hash = out, job, dim, index_type, id_hash
        self.planned_rows = planned_rows
        # the job's plan (a new job's still being written): each part is checked against its batch as it is read,
        # and parts beyond the batches planned so far wait
        self.plan = plan
        self.file: FlatIndexFile | None = None
        self.spent = False  # the index file was committed: a later finalize needs a new ledger
        self._closed = False
        self._streams: bool | None = None
        self._born = time.time_ns()  # a job.json older than this is an earlier attempt's (at worst, one written
        #                               within a clock tick of this is not trusted: the file is then hashed at commit)
        self._start()

    def _start(self) -> None:
        self.discard()  # starting over: an earlier index file, or an earlier ivfpq index's spilled copies, go
        self.ivf: IvfPqBuilder | None = None
        if self.index_type == "ivfpq":
            # sized by the corpus's rows (known from the start), so the quantizers can train while the job runs;
            # its SQ8 copies go to a temp file beside the index file (``SpilledCodes``)
            p = index_params("ivfpq", len(self.id_hash), self.dim)
            self.ivf = IvfPqBuilder(self.dim, p, beside=self.out.path(INDEX_FILE))
        self.facts: list[PartFacts] = []
        # times each input row was seen, in a file without a name (``core.rowfile``): its pages are handed back
        # part by part, so what the ledger holds does not grow with the rows
        folder = self.out.state("")
        folder.mkdir(parents=True, exist_ok=True)
        self.counts = RowFile.scratch(folder, np.uint16, len(self.id_hash)).array
        self.unexpected: list[str] = []

    @property
    def streams(self) -> bool:
        """Whether this ledger writes the flat index file itself (FAISS imported here, on first use, so by the
        threads that read parts for the ledger rather than by ingest before its first batch, which it would
        delay)."""
        if self._streams is None:
            self._streams = self.index_type == "flat" and layout_matches(self.dim)
        return self._streams

    def _planned(self) -> int | None:
        if self.planned_rows is None:
            path = self.out.state(JOB_FILE)  # written once, last, when the plan is complete (atomically)
            if path.exists() and path.stat().st_mtime_ns >= self._born:
                job = json.loads(path.read_text(encoding="utf-8"))
                if job.get("job") == self.job:
                    self.planned_rows = int(job["planned_rows"])
        return self.planned_rows

    def _append(self, rows: np.ndarray, vecs: np.ndarray) -> None:
        if self._closed:
            raise RuntimeError("the ledger was closed")
        file = self._open_file()
        if file.expected is None and (planned := self._planned()) is not None:
            file.expect(planned)
        file.add(rows, vecs)

    @property
    def next_batch(self) -> int:
        return len(self.facts)

    def _one(self, b: int) -> tuple[PartFacts, np.ndarray, tuple[np.ndarray, np.ndarray] | PartCodes | None] | None:
        """Part ``b`` read on a reader's thread; for ivfpq its vectors are encoded there too, once the index is
        trained (``IvfPqBuilder.prepare``), so the readers share the encoding and the ledger only appends."""
        ivf = self.ivf
        got = read_part_facts(self.out, b, self.job, vectors=self.streams or ivf is not None)
        if got is None or ivf is None or got[2] is None:
            return got
        return got[0], got[1], ivf.prepare(*got[2])

    def advance(self, stop: int | None = None, *, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Record parts from ``next_batch`` on, in order, up to ``stop`` (None: while parts are committed) or the
        first part that is absent or not this job's; returns ``next_batch``."""
        first = self.next_batch
        if stop is None:  # the committed run from here (parts are committed roughly in order)
            stop = first
            while self.out.vectors_part(stop).exists():
                stop += 1
        if self.plan is not None:  # a part is read once its batch is planned (an earlier run's, on a rerun)
            stop = min(stop, self.plan.n_batches)
        # ivfpq once the workers are done: a reader on every core, since the readers encode the index's codes
        readers = min(32, cpu_count()) if self.ivf is not None and self.ivf.all_cores else 0
        for got in in_order(self._one, stop - first, first, readers):
            if got is None or should_stop():
                break
            facts, id_hash, vecs = got
            name = part_name(self.next_batch)
            outside = self._outside_plan(self.next_batch, facts)
            if vecs is not None and len(vecs[0]):  # first: if it fails, nothing of this part is recorded
                self._index_part(vecs)
            tally(self.counts, facts.rows, id_hash, self.id_hash, name, self.unexpected)
            if outside:
                self.unexpected.append(f"{name}: rows outside its planned batch")
            if self.plan is not None:  # checked: its rows need not be kept for finalize
                facts.rows = None
            self.facts.append(facts)
        return self.next_batch

    def _outside_plan(self, b: int, facts: PartFacts) -> bool:
        """Whether part ``b`` holds rows its planned batch does not (False without a plan: finalize checks it)."""
        if self.plan is None or facts.rows is None:
            return False
        planned = self.plan.rows(b)
        assert planned is not None, "advance() reads only parts whose batch is planned"
        outside = not np.isin(facts.rows, planned).all()
        release(planned)
        return outside

    def _index_part(self, vecs: tuple[np.ndarray, np.ndarray] | PartCodes) -> None:
        """A part's vectors into the flat index file, or its codes into the ivfpq index. A write-back that failed
        means bytes of parts counted already may not be on disk: the index starts over from the first part."""
        try:
            if isinstance(vecs, PartCodes):
                assert self.ivf is not None
                self.ivf.add_part(vecs)
            else:
                self._append(*vecs)
        except OSError:
            if (self.file is not None and self.file.failed) or (self.ivf is not None and self.ivf.failed):
                logger.warning("writing the index failed; it will be built again from the first part")
                self._start()
            raise

    def use_all_cores(self) -> None:
        """The workers are done: what is left of the index's work may use every core."""
        if self.ivf is not None:
            self.ivf.all_cores = True

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
        """Remove what was not committed: the flat index file, an ivfpq index's spilled copies."""
        if self.file is not None:
            self.file.discard()
            self.file = None
        ivf: IvfPqBuilder | None = getattr(self, "ivf", None)
        if ivf is not None:
            ivf.discard()

    def close(self) -> None:
        self._closed = True
        self.discard()

    def changed(self) -> int | None:
        """The first recorded part whose file changed since it was read, or None."""
        return next((b for b, f in enumerate(self.facts) if stat_key(self.out.vectors_part(b)) != f.stat), None)

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
