"""An ivfpq index filled as the ledger reads the parts, so its vectors are read once, while the job runs.

The quantizers are trained on the job's first ``train_size`` vectors in batch order (the plan's order, the
same on every run): until then the parts' vectors are held, then they are added with every later part's.
Finalize only trains what a short job never reached (fewer vectors than ``train_size``) and writes the file.
After training, the ledger's reader threads encode each part (``Codec``) and the ledger appends the codes
(``IvfPqBuilder``): the index's work is spread over the readers instead of one FAISS call at a time.
The first vectors, not a sample of the whole corpus, because a sample drawn over all rows needs every part
before training starts, that is, a second pass over the vectors (what ``output.index.build_index`` did). A
corpus sorted by topic trains on its first topics; ``recall@10`` against exact search is in BENCHMARKS.md.

Memory: the held vectors (``train_size x dim x 4`` bytes at most: 77 MB for 50,000 vectors of 384), then the
inverted lists (``m`` bytes of PQ code and 16 of ids per vector: 0.64 GB for 10 M rows of 384). The SQ8 copies
(``dim`` bytes a vector, 3.84 GB there) go to a temp file beside the index file as they come (``SpilledCodes``)
and into the index file when it is written, which is byte for byte FAISS's own (``spill_layout_matches``; where
a FAISS version writes otherwise, they stay in memory). Disk: that file, until the index is committed (both exist
while it is written).
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from core.envs import cpu_count
from core.errors import PermanentError
from core.formats import narrow_rows
from core.layout import OutputDir
from output.flat_index import SYNC_BYTES, pread_blocks, pwrite_all, write_back

logger = logging.getLogger(__name__)

__all__ = [
    "IvfPqBuilder",
    "Codec",
    "PartCodes",
    "SpilledCodes",
    "spill_layout_matches",
    "index_params",
    "new_ivfpq",
    "tune",
    "MAX_LISTS",
]

MAX_LISTS = 1_000  # lists at most, whatever the rows (see index_params)
_ID_BLOCK = 1 << 19  # pending row ids read back from their file at a time (4 MB)


def index_params(kind: str, n: int, dim: int, nlist: int | None = None) -> dict[str, Any]:
    """An index's parameters for ``n`` vectors of ``dim``. ivfpq: ``nlist`` = sqrt(n) inverted lists, at most
    ``MAX_LISTS``; ``m`` = dim/8 sub-quantizers of ``nbits``, trained on at most ``pq_train_points`` points per
    centroid; the ``k_factor x k`` best candidates re-ranked by 8-bit scalar-quantized copies (``refine: sq8``:
    PQ alone caps recall@10 near 0.7 on sentence embeddings); ``nprobe`` lists searched: at least 64, and an
    eighth of them, so a query reads an eighth of the vectors whatever the lists.

    Why these, on vectors of MiniLM's structure (``bench_recall.py --pairs``, NOTES 4h and 4l): recall@10 at 10 M
    was 0.775 with a thirty-second of the lists and k_factor 8, 0.921 with an eighth and 32; at 1 M 128 of 1,000
    lists reached 0.902 where 64 stopped at 0.854. Finding each vector's list is most of an add's cost, and the
    ledger adds beside the workers: at 10 M, 1,000 lists (with the sub-quantizers' training below: 0.911, 42 ms
    p50 a query on one thread) built 2.3-2.8x faster than 3,162 (0.921, 39 ms) and trained in 3.6 s against
    29-60 s. The sub-quantizers on 64 points per centroid trained 45% faster on the GPU host and gave 0.903
    against 0.901 at 1 M. k_factor costs little (the re-ranking reads 320 8-bit copies), nprobe most of the time.
    ``nlist`` overrides the number of lists (benchmarks weigh it); what follows from it follows."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 200, "efSearch": 128}
    nlist = nlist or max(1, min(int(math.sqrt(max(n, 1))), max(1, n // 39), MAX_LISTS))
    m = next(c for c in (dim // 8, dim // 4, dim // 2, dim, 1) if c >= 1 and dim % c == 0)
    nbits = 8 if n >= 256 * 39 else max(4, min(8, int(math.log2(max(16, n // 39)))))
    return {
        "nlist": nlist,
        "m": m,
        "nbits": nbits,
        "nprobe": min(nlist, max(64, nlist // 8)),
        "refine": "sq8",
        "k_factor": 32,
        "train_size": min(n, max(256 * 39, 50 * nlist)),
        "pq_train_points": 64,
    }


def _threads(all_cores: bool) -> int:
    """FAISS's OpenMP threads for training and for the ledger's own encoding (a reader encodes on one). While the
    job runs, half the cores (at most 8): the index is built beside the workers. Once the workers are done
    (finalize), every core. On the H100 host (16 cores, NOTES 4l) training the 1 M defaults' index took 4.5 s on
    16 threads, 6.4 s on 8 and 10.3 s on 4 with the machine idle, and 16.0 s on 4 threads during a job."""
    n = cpu_count()
    return n if all_cores else max(1, min(8, n // 2))


def new_ivfpq(dim: int, p: dict[str, Any]) -> Any:
    """An untrained ``IndexIDMap(IndexRefine(IndexIVFPQ, SQ8))`` (ids are row ids) for ``index_params``. Not
    ``IndexIDMap2``: its reverse map (for reconstructing by id, which nothing here does) costs 44 bytes a
    vector, 0.44 GB at 10 M rows."""
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, p["nlist"], p["m"], p["nbits"], ip)
    ivf.nprobe = p["nprobe"]
    if "pq_train_points" in p:  # the sub-quantizers' k-means on at most this many points per centroid
        ivf.pq.cp.max_points_per_centroid = int(p["pq_train_points"])
    refine = faiss.IndexRefine(ivf, faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, ip))
    refine.k_factor = float(p["k_factor"])
    return faiss.IndexIDMap(refine)


def tune(index: Any, p: dict[str, Any]) -> None:
    """Set a read index's search parameters (``nprobe``; ``k_factor`` where it re-ranks) from ``p``."""
    import faiss

    faiss.extract_index_ivf(index).nprobe = int(p.get("nprobe", 16))
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else None
    if isinstance(inner, faiss.IndexRefine):
        inner.k_factor = float(p.get("k_factor", 8))


class Codec:
    """A copy of the trained quantizers that turns vectors into the index's codes: the IVF-PQ code (the list
    number, then the PQ code of the residual) and the SQ8 copy, FAISS's standalone codes (``sa_encode``).
    Read-only, so any thread may encode while the ledger appends to the index: the ledger's readers encode
    each part as they read it, side by side, and the ledger's own thread only appends (``add_sa_codes``)."""

    def __init__(self, refine: Any) -> None:
        import faiss

        own: Any = faiss.clone_index(refine)  # trained and empty: nothing here changes as the index fills
        self._keep = own
        self.ivf = faiss.downcast_index(own.base_index)
        self.sq = faiss.downcast_index(own.refine_index)

    def encode(self, vecs: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(IVF-PQ codes, SQ8 codes) of ``vecs``, on ``threads`` OpenMP threads of the calling thread (the
        setting is per thread: a reader encodes on one, beside the others)."""
        import faiss

        faiss.omp_set_num_threads(threads)
        vecs = np.ascontiguousarray(vecs, np.float32)
        return self.ivf.sa_encode(vecs), self.sq.sa_encode(vecs)


class PartCodes(NamedTuple):
    """One part for ``IvfPqBuilder.add_part``: its row ids, its vectors and, once the quantizers are trained, its
    codes and the ``Codec`` that made them (codes of another training are made again from the vectors)."""

    rows: np.ndarray
    vecs: np.ndarray
    codes: tuple[np.ndarray, np.ndarray] | None
    codec: Codec | None


class IvfPqBuilder:
    """``add(rows, vecs)`` (or ``prepare`` on any thread, then ``add_part``) part by part in batch order, then
    ``write(path)`` (the index file) or, when no ``beside`` path spills its SQ8 copies, ``finish()`` -> (the
    trained, filled index in memory, params); ``discard()`` ends it and removes its spilled copies.

    Until ``train_size`` vectors came, they are held; then the quantizers train, and every vector is encoded
    (``Codec``) and its codes appended to the inverted lists and the SQ8 copy in batch order, at the positions
    ``IndexIDMap`` gives them; the row ids go into the ``IndexIDMap`` at the end (``finish`` or ``write``). The
    file is byte for byte the one ``add_with_ids`` builds (a test compares them), whoever encoded which part.

    Why codes: adding inside FAISS (``add_with_ids``) runs assignment and PQ encoding on OpenMP threads in one
    call at a time; on the H100 host of NOTES 4m that managed an estimated 34,000-40,000 vectors a second beside
    the workers while they committed 63,000, and the index set a 10 M job's pace. Encoding is per vector and
    needs only the trained quantizers, so the ledger's readers do it as they read each part, one OpenMP thread
    each; appending codes costs the ledger's thread about a microsecond a vector. ``all_cores`` (set once the
    workers are done) lets training and the ledger's own encoding use every core."""

    def __init__(self, dim: int, params: dict[str, Any], beside: Path | None = None) -> None:
        self.dim, self.params = dim, dict(params)
        self._beside = beside  # the index file's path: its SQ8 copies go to a temp file next to it (SpilledCodes)
        self._spill: SpilledCodes | None = None
        self._check_layout = True  # spill only where spill_layout_matches (which builds with this off)
        self._held: list[tuple[np.ndarray, np.ndarray]] = []  # until trained
        self._n_held = 0
        self.index: Any = None  # IndexIDMap(IndexRefine(IVF-PQ, SQ8)), once trained; its ids are set at the end
        self.codec: Codec | None = None
        self._refine: Any = None  # the IndexRefine inside, its IVF-PQ and its SQ8 copy, once trained
        self._ivf: Any = None
        self._sq: Any = None
        # row ids added since the IndexIDMap's ids were set: in a file without a name beside the index (8 bytes each,
        # read back into FAISS's vector, sized once, when the index is completed), or here without ``beside``
        self._ids: list[np.ndarray] = []
        self._id_file: Any = None
        self._n_ids = 0
        self._n_added = 0
        self._discarded = False
        self.all_cores = False
        self.train_s = 0.0
        self.add_s = 0.0  # the ledger's thread: encoding what the readers did not, and appending
        self.encode_s = 0.0  # the readers' encoding, summed over their threads
        self._lock = threading.Lock()  # for encode_s, added to by the readers

    @property
    def ntotal(self) -> int:
        return self._n_held + self._n_added

    @property
    def failed(self) -> bool:
        """Writing the spilled copies back failed: bytes of parts counted already may be lost, so the index must
        be built again from the first part (``PartLedger`` does)."""
        return self._spill is not None and self._spill.failed

    def prepare(self, rows: np.ndarray, vecs: np.ndarray) -> PartCodes:
        """On a reader's thread: the part's codes once the quantizers are trained, else its vectors."""
        codec = self.codec
        if codec is None or not len(rows):
            return PartCodes(rows, vecs, None, None)
        t0 = time.perf_counter()
        codes = codec.encode(vecs)
        with self._lock:
            self.encode_s += time.perf_counter() - t0
        return PartCodes(rows, vecs, codes, codec)

    def add(self, rows: np.ndarray, vecs: np.ndarray) -> None:
        self.add_part(PartCodes(rows, vecs, None, None))

    def add_part(self, part: PartCodes) -> None:
        """Add one part, all of it or (on an error) nothing of it."""
        self._alive()
        if self.index is None:
            self._held.append((part.rows, part.vecs))
            self._n_held += len(part.rows)
            if self._n_held >= self.params["train_size"]:
                try:
                    self._train()
                except BaseException:
                    self._held.pop()
                    self._n_held -= len(part.rows)
                    raise
            return
        t0 = time.perf_counter()
        codes = part.codes
        if codes is None or part.codec is not self.codec:  # read before training, or by an earlier training
            assert self.codec is not None
            codes = self.codec.encode(part.vecs, threads=_threads(self.all_cores))
        self._append(part.rows, *codes)
        self.add_s += time.perf_counter() - t0

    def finish(self) -> tuple[Any, dict[str, Any]]:
        """The filled index, in memory (not when its SQ8 copies went to disk: ``write`` then)."""
        if self._spill is not None:
            raise RuntimeError("this index's SQ8 copies are on disk: write() it")
        return self._complete(), self.params

    def write(self, path: Path) -> None:
        """Write the filled index to ``path`` as ``faiss.write_index`` would (``spill_layout_matches``): FAISS
        writes it with no SQ8 copies held, and the copies are put where FAISS keeps them, from their file
        (which stays until ``discard``: a write that fails can be done again)."""
        import faiss

        index = self._complete()
        faiss.write_index(index, str(path))
        if self._spill is not None:
            self._spill.insert_into(path, self._n_added)

    def discard(self) -> None:
        """Remove the SQ8 copies' file, if any, and end the builder: it cannot write a complete index after."""
        self._discarded = True
        if self._spill is not None:
            self._spill.discard()
        if self._id_file is not None:
            self._id_file.close()

    def _alive(self) -> None:
        if self._discarded:
            raise RuntimeError("the ivfpq builder was discarded (its spilled copies are gone)")

    def _complete(self) -> Any:
        self._alive()
        if self.index is None:
            self._train()
        self._set_ids()
        self.index.ntotal = self._n_added
        return self.index

    def _set_ids(self) -> None:
        """The row ids appended since the last call into the IndexIDMap's own vector, after those set before: sized
        once, then filled a block at a time (never a second copy of all of them)."""
        import faiss

        if not self._n_ids:
            return
        id_map = self.index.id_map
        at = id_map.size()
        id_map.resize(at + self._n_ids)
        view = faiss.rev_swig_ptr(id_map.data(), id_map.size())  # the vector's own memory
        for a in self._pending_ids():
            view[at : at + len(a)] = a
            at += len(a)
        self._ids, self._n_ids = [], 0

    def _pending_ids(self) -> Any:
        """The pending row ids, in order: from their file, ``_ID_BLOCK`` at a time, or as held."""
        if self._id_file is None:
            yield from self._ids
            return
        for block in pread_blocks(self._id_file.fileno(), 0, self._n_ids * 8, _ID_BLOCK * 8, "the index's id file"):
            yield np.frombuffer(block, dtype="<i8")

    def _append(self, rows: np.ndarray, ivf_codes: np.ndarray, sq_codes: np.ndarray) -> None:
        """Codes into the lists and the SQ8 copy at positions ``_n_added`` on: what ``IndexIDMap.add_with_ids``
        does after encoding (the inner index numbers vectors in the order they come). The spilled copies first:
        a write that fails leaves nothing of the part counted."""
        self._alive()
        n = len(rows)
        if self._beside is not None:  # the ids first, at their place in the file: a failed write counts nothing
            if self._id_file is None:
                self._id_file = tempfile.TemporaryFile(dir=self._beside.parent)
            pwrite_all(self._id_file.fileno(), np.asarray(rows).astype("<i8").tobytes(), self._n_ids * 8)
        else:
            kept = narrow_rows(rows)  # held in 4 bytes where they fit
        if self._spill is not None:
            self._spill.append(self._n_added, sq_codes)
        self._ivf.add_sa_codes(ivf_codes, np.arange(self._n_added, self._n_added + n, dtype=np.int64))
        if self._spill is not None:
            self._sq.ntotal = self._n_added + n  # FAISS writes this count; the copies are in the file
        else:
            self._sq.add_sa_codes(sq_codes)
        self._n_added += n
        self._refine.ntotal = self._n_added
        if self._beside is None:
            self._ids.append(kept)
        self._n_ids += n

    def _train(self) -> None:
        """Train on the held vectors, then encode and append them; on an error nothing changes (the held
        vectors stay held, no index, no spilled file)."""
        import faiss

        faiss.omp_set_num_threads(_threads(self.all_cores))  # per thread: this one's
        p = self.params
        xt = np.concatenate([v for _, v in self._held]) if self._held else np.zeros((0, self.dim), np.float32)
        xt = np.ascontiguousarray(xt[: p["train_size"]], np.float32)
        if len(xt) < p["nlist"]:
            raise PermanentError(f"ivfpq needs at least {p['nlist']} vectors to train: use --index flat")
        t0 = time.perf_counter()
        index = new_ivfpq(self.dim, p)
        index.train(xt)
        n_train, train_s = len(xt), time.perf_counter() - t0
        del xt
        refine: Any = faiss.downcast_index(index.index)
        self._refine, self._ivf, self._sq = (
            refine,
            faiss.downcast_index(refine.base_index),
            faiss.downcast_index(refine.refine_index),
        )
        self.codec, self.index = Codec(refine), index
        try:
            if self._beside is not None and (not self._check_layout or _spill_ok(self.dim)):
                OutputDir.remove_stale_temps(self._beside)  # a killed ingest's spilled copies, before new ones
                self._spill = SpilledCodes(OutputDir.temp_path(self._beside), self._sq.code_size)
            if self._held:  # one encode of every held vector, on the threads training had
                rows = np.concatenate([r for r, _ in self._held])
                t0 = time.perf_counter()
                codes = self.codec.encode(np.concatenate([v for _, v in self._held]), threads=_threads(self.all_cores))
                self._append(rows, *codes)
                self.add_s += time.perf_counter() - t0
        except BaseException:
            if self._spill is not None:
                self._spill.discard()
            self._spill = self.codec = self.index = self._refine = self._ivf = self._sq = None
            self._ids, self._n_ids, self._n_added = [], 0, 0
            raise
        self._held, self._n_held = [], 0
        self.train_s = train_s
        p["trained_on"] = n_train
        logger.info("ivfpq trained on the job's first %d vectors in %.1f s", n_train, train_s)


def _spill_ok(dim: int) -> bool:
    try:
        return spill_layout_matches(dim)
    except Exception as e:  # noqa: BLE001 - the copies then stay in memory, as where FAISS writes otherwise
        logger.warning("the ivfpq index keeps its SQ8 copies in memory: checking the spilled layout failed: %s", e)
        return False


class SpilledCodes:
    """An ivfpq index's SQ8 copies (``dim`` bytes a vector: 384 of its 448 at 384 dims), appended in order to a
    temp file beside the index file (``OutputDir.temp_path``: a killed ingest's is cleaned up as stale) and
    written back as they come, instead of held by the process that builds the index. At the end they are put
    into the file FAISS wrote without them (``insert_into``)."""

    def __init__(self, path: Path, code_size: int) -> None:
        self.path, self.code_size = path, code_size
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._written = self._flushing = 0
        self.failed = False  # a write-back failed: codes of parts counted already may not be on disk

    def append(self, at: int, codes: np.ndarray) -> None:
        """Codes ``[k, code_size]`` for vectors ``at`` to ``at + k`` (written in place: a retry overwrites)."""
        assert self._fd is not None and codes.shape[1:] == (self.code_size,)
        start = at * self.code_size
        pwrite_all(self._fd, np.ascontiguousarray(codes, np.uint8).reshape(-1).data.cast("B"), start)
        end = start + codes.size
        if end - self._flushing >= SYNC_BYTES:
            try:
                self._written, self._flushing = write_back(self._fd, self._written, self._flushing, end)
            except OSError:
                self.failed = True
                raise

    def insert_into(self, path: Path, n: int) -> None:
        """Put the first ``n`` vectors' codes into ``path``, an ``IndexIDMap(IndexRefine(.., SQ8))`` file written
        with none: FAISS ends it with the SQ8 codes (a uint64 byte count, then the bytes), ``k_factor``
        (float32) and the ids (a uint64 count, then int64s), so the count is found from the end."""
        assert self._fd is not None
        tail_bytes = 4 + 8 + 8 * n
        with open(path, "r+b") as f:
            at = f.seek(0, os.SEEK_END) - tail_bytes - 8
            if at < 0 or (f.seek(at) and struct.unpack("<Q", f.read(8))[0] != 0):
                raise RuntimeError(f"{path}: not the file layout SpilledCodes knows (FAISS changed?)")
            tail = f.read()
            f.seek(at)
            f.truncate()
            f.write(struct.pack("<Q", n * self.code_size))
            f.flush()
            self._copy_to(f.fileno(), n * self.code_size)
            f.seek(0, os.SEEK_END)
            f.write(tail)

    def _copy_to(self, out: int, length: int) -> None:
        """The file's first ``length`` bytes to ``out`` at its position: in the kernel (``copy_file_range``), or
        read and written where the file system refuses that."""
        assert self._fd is not None
        pos, copy = 0, getattr(os, "copy_file_range", None)  # Linux
        while pos < length and copy is not None:
            try:
                done = copy(self._fd, out, length - pos, pos)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) or pos:
                    raise
                break
            if done == 0:
                if pos == 0:  # some file systems copy nothing rather than refuse
                    break
                raise OSError(f"{self.path} is shorter than the {length:,} bytes of codes written to it")
            pos += done
        for block in pread_blocks(self._fd, pos, length, 8 << 20, self.path):  # the fallback
            pwrite_all(out, block, os.lseek(out, 0, os.SEEK_CUR))
            os.lseek(out, len(block), os.SEEK_CUR)

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)


@functools.cache
def spill_layout_matches(dim: int) -> bool:
    """Whether an index of ``dim`` written with its SQ8 copies spilled is byte for byte FAISS's own file (a small
    index built both ways, once per dimension); if not, the copies stay in memory."""
    import tempfile

    import faiss

    rng = np.random.default_rng(dim)
    x = rng.standard_normal((1000, dim)).astype(np.float32)
    ids = rng.permutation(10_000)[:1000].astype(np.int64)
    p = {**index_params("ivfpq", 1000, dim, nlist=4), "nbits": 4, "train_size": 700}
    with tempfile.TemporaryDirectory() as d:
        built: list[bytes] = []
        for beside in (None, Path(d) / "spilled.faiss"):
            b = IvfPqBuilder(dim, p, beside=beside)
            b._check_layout = False
            b.add(ids[:800], x[:800])
            b.add(ids[800:], x[800:])
            out = Path(d) / f"{len(built)}.faiss"
            b.write(out)
            b.discard()  # closes the spilled copies' file
            built.append(out.read_bytes())
        faiss_own = new_ivfpq(dim, p)  # and FAISS's own adds, for the same bytes
        faiss_own.train(x[:700])
        faiss_own.add_with_ids(x, ids)
        return built[0] == built[1] == faiss.serialize_index(faiss_own).tobytes()
