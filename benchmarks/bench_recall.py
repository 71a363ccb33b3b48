"""Recall@10 of the ivfpq index fbas builds, against exact search, on queries held apart from the index.

    python benchmarks/bench_recall.py --vectors vecs.npy [--queries 1000] [--json results.json]
    python benchmarks/bench_recall.py --out OUT            # the vectors of a finished job's parts

The index is built as the ledger builds it (``output.ivf_index``: parameters from ``index_params`` for the
indexed count, trained on the first ``train_size`` vectors, then filled), over every vector but ``--queries``
ones drawn at random (seeded) and held apart. Exact search is ``IndexFlatIP`` over the same vectors.

recall@10 = |ivfpq's 10 ids that are among the exact 10| / 10, averaged over the queries; ties in the exact
scores (a corpus that repeats texts) would make some correct answers look wrong, so ``recall@10 (ties)``
also counts an id whose exact score reaches the 10th exact score (within 1e-5). Latency: one query at a
time, on one thread, with the index's default ``nprobe`` (and re-ranking, if the parameters have it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def job_vectors(out: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    from output.ledger import part_vectors

    parts = sorted((out / "vectors").glob("part-*.parquet"))
    return np.concatenate([part_vectors(pq.read_table(p, columns=["embedding"])) for p in parts])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--vectors", type=Path, help="float32 .npy [n, dim], L2-normalized")
    src.add_argument("--out", type=Path, help="a finished job's output folder")
    ap.add_argument("--queries", type=int, default=1000, help="vectors held apart as queries")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", default=None, help="comma list of nprobe values to try besides the default")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import faiss

    from output.ivf_index import IvfPqBuilder, index_params

    x = np.load(args.vectors) if args.vectors else job_vectors(args.out)
    x = np.ascontiguousarray(x, np.float32)
    rng = np.random.default_rng(0)
    held = rng.choice(len(x), size=args.queries, replace=False)
    keep = np.ones(len(x), bool)
    keep[held] = False
    q, base = x[held], x[keep]
    ids = np.flatnonzero(keep).astype(np.int64)
    n, dim = base.shape
    params = index_params("ivfpq", n, dim)
    t0 = time.perf_counter()
    builder = IvfPqBuilder(dim, params)
    for s in range(0, n, 65_536):
        builder.add(ids[s : s + 65_536], base[s : s + 65_536])
    index, params = builder.finish()
    build_s = time.perf_counter() - t0

    exact = faiss.IndexFlatIP(dim)
    exact.add(base)
    ex_d, ex_i = exact.search(q, args.k)
    ex_i = ids[ex_i]

    def measure(nprobe: int) -> dict:
        faiss.extract_index_ivf(index).nprobe = nprobe
        _, got = index.search(q, args.k)
        hit = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(got.tolist(), ex_i.tolist())])
        pos = {int(i): r for r, i in enumerate(ids.tolist())} if len(ids) <= 2_000_000 else None
        if pos is not None:  # the exact score of every returned id
            scores = np.array([[base[pos[i]] @ qv if i >= 0 else -9.0 for i in row] for qv, row in zip(q, got)])
            ties = float(np.mean((scores >= ex_d[:, -1:] - 1e-5).sum(1) / args.k))
        else:
            ties = None
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        lat = []
        for qv in q[:200]:
            t = time.perf_counter()
            index.search(qv[None], args.k)
            lat.append(time.perf_counter() - t)
        faiss.omp_set_num_threads(threads)
        return {
            "nprobe": nprobe,
            "recall@10": round(float(hit), 4),
            "recall@10 (ties)": None if ties is None else round(ties, 4),
            "latency_ms_p50": round(1e3 * float(np.median(lat)), 3),
            "latency_ms_p99": round(1e3 * float(np.quantile(lat, 0.99)), 3),
        }

    res = {
        "vectors": n,
        "dim": dim,
        "queries": len(q),
        "params": params,
        "build_s": round(build_s, 2),
        "train_s": round(builder.train_s, 2),
        "default": measure(int(params["nprobe"])),
        "others": [measure(int(p)) for p in (args.nprobe.split(",") if args.nprobe else [])],
    }
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
