"""An ivfpq index filled as the ledger reads the parts, so its vectors are read once, while the job runs.

The quantizers are trained on the job's first ``train_size`` vectors in batch order (the plan's order, the
same on every run): until then the parts' vectors are held, then they are added with every later part's.
Finalize only trains what a short job never reached (fewer vectors than ``train_size``) and writes the file.
The first vectors, not a sample of the whole corpus, because a sample drawn over all rows needs every part
before training starts, that is, a second pass over the vectors (what ``output.index.build_index`` did). A
corpus sorted by topic trains on its first topics; ``recall@10`` against exact search is in BENCHMARKS.md.

Memory: the held vectors (``train_size x dim x 4`` bytes at most: 77 MB for 50,000 vectors of 384), then the
index itself (``m`` bytes of PQ code, ``dim`` bytes of SQ8 copy and 16 of ids per vector: 4.5 GB for 10 M rows
of 384, against 15.4 GB flat).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from core.envs import cpu_count
from core.errors import PermanentError

logger = logging.getLogger(__name__)

__all__ = ["IvfPqBuilder", "index_params", "new_ivfpq", "tune", "MAX_LISTS"]

MAX_LISTS = 1_000  # lists at most, whatever the rows (see index_params)


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


def _set_threads(all_cores: bool) -> None:
    """FAISS's OpenMP threads for the calling thread (the setting is per thread). While the job runs, half the
    cores (at most 8): the index is built beside the workers. Once the workers are done (finalize), every core.
    On the H100 host (16 cores, NOTES 4l) training the 1 M defaults' index took 4.5 s on 16 threads, 6.4 s on 8
    and 10.3 s on 4 with the machine idle, and 16.0 s on 4 threads during a job."""
    import faiss

    n = cpu_count()
    faiss.omp_set_num_threads(n if all_cores else max(1, min(8, n // 2)))


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


class IvfPqBuilder:
    """``add(rows, vecs)`` part by part in batch order, then ``finish()`` -> (the trained, filled index, params).

    Parts are added ``ADD_BATCH`` vectors at a time (a GPU job's parts of ~900 rows are small work for FAISS's
    threads); the index is the same whatever the batching, since each list receives its vectors in batch order.
    ``all_cores`` (set once the workers are done) lets FAISS use every core for what is left."""

    ADD_BATCH = 16_384

    def __init__(self, dim: int, params: dict[str, Any]) -> None:
        self.dim, self.params = dim, dict(params)
        self._held: list[tuple[np.ndarray, np.ndarray]] = []  # until trained
        self._n_held = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # after: the next add's parts
        self._n_pending = 0
        self.index: Any = None
        self.all_cores = False
        self.train_s = 0.0
        self.add_s = 0.0

    @property
    def ntotal(self) -> int:
        return self._n_held + self._n_pending + (int(self.index.ntotal) if self.index is not None else 0)

    def add(self, rows: np.ndarray, vecs: np.ndarray) -> None:
        if self.index is not None:
            self._pending.append((rows, vecs))
            self._n_pending += len(rows)
            if self._n_pending >= self.ADD_BATCH:
                self._flush()
            return
        self._held.append((rows, vecs))
        self._n_held += len(rows)
        if self._n_held >= self.params["train_size"]:
            self._train()

    def finish(self) -> tuple[Any, dict[str, Any]]:
        if self.index is None:
            self._train()
        self._flush()
        return self.index, self.params

    def _flush(self) -> None:
        if not self._pending:
            return
        _set_threads(self.all_cores)
        t0 = time.perf_counter()
        rows = np.concatenate([r for r, _ in self._pending]).astype(np.int64)
        vecs = np.ascontiguousarray(np.concatenate([v for _, v in self._pending]), np.float32)
        self._pending, self._n_pending = [], 0
        self.index.add_with_ids(vecs, rows)
        self.add_s += time.perf_counter() - t0

    def _train(self) -> None:
        _set_threads(self.all_cores)
        p = self.params
        xt = np.concatenate([v for _, v in self._held]) if self._held else np.zeros((0, self.dim), np.float32)
        xt = np.ascontiguousarray(xt[: p["train_size"]], np.float32)
        if len(xt) < p["nlist"]:
            raise PermanentError(f"ivfpq needs at least {p['nlist']} vectors to train: use --index flat")
        t0 = time.perf_counter()
        index = new_ivfpq(self.dim, p)
        index.train(xt)
        self.train_s = time.perf_counter() - t0
        p["trained_on"] = len(xt)
        logger.info("ivfpq trained on the job's first %d vectors in %.1f s", len(xt), self.train_s)
        self.index = index
        held, self._held, self._n_held = self._held, [], 0
        for rows, vecs in held:
            self.add(rows, vecs)
