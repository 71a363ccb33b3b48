"""Recall@10 of the ivfpq index fbas builds, against exact search, on queries held apart from the index.

    python benchmarks/bench_recall.py --vectors vecs.npy [--queries 1000] [--json results.json]
    python benchmarks/bench_recall.py --out OUT            # the vectors of a finished job's parts
    python benchmarks/bench_recall.py --pairs 10000000 --data DATA   # 10 M vectors made from real ones

The index is built as the ledger builds it (``output.ivf_index``: parameters from ``index_params`` for the
indexed count, trained on the first ``train_size`` vectors, then filled), over every vector but ``--queries``
ones drawn at random (seeded) and held apart. Exact search is ``IndexFlatIP`` over the same vectors.

recall@10 = |ivfpq's 10 ids that are among the exact 10| / 10, averaged over the queries; ties in the exact
scores (a corpus that repeats texts) would make some correct answers look wrong, so ``recall@10 (ties)``
also counts an id whose exact score reaches the 10th exact score (within 1e-5). Latency: one query at a
time, on one thread, with the index's default ``nprobe`` (and re-ranking, if the parameters have it).

``--pairs N``: N vectors with real structure at a scale a CPU cannot embed. Every distinct English sentence of
``bench_scale.py``'s corpus (STS-B and SciFact, about 50,000) is embedded with the real all-MiniLM-L6-v2 (the
installed package, fp32); vector ``i`` is the normalized sum of the vectors of the two sentences that make row
``i`` of that corpus (``bench_scale.pair_texts``), made on the fly, chunk by chunk, never all held. Queries:
``--queries`` pairs of sentences held apart from the corpus, made the same way. The sum stands in for the
embedding of the two sentences' concatenation; ``proxy_cosine`` reports how close it is, on ``--check``
pairs embedded for real, and ``--real N`` measures recall at N rows both ways (the texts embedded for real,
their proxy), so that the proxy's recall can be compared with the real one where both can be computed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import output  # noqa: E402, F401 - chooses FAISS's OpenBLAS kernel before FAISS loads (core.envs.faiss_blas_kernel)


def job_vectors(out: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    from output.ledger import part_vectors

    parts = sorted((out / "vectors").glob("part-*.parquet"))
    return np.concatenate([part_vectors(pq.read_table(p, columns=["embedding"])) for p in parts])


def single_query_ms(index, queries: np.ndarray, k: int) -> list[float]:
    """Milliseconds of each query searched alone, on one FAISS thread."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    lat = []
    try:
        for qv in queries:
            t = time.perf_counter()
            index.search(qv[None], k)
            lat.append(1e3 * (time.perf_counter() - t))
    finally:
        faiss.omp_set_num_threads(threads)
    return lat


def measure(
    index,
    q: np.ndarray,
    k: int,
    nprobe: int,
    exact_ids: np.ndarray,
    kth: np.ndarray,
    exact_scores,
    k_factor: float | None = None,
) -> dict:
    """Recall@k of ``index`` at ``nprobe`` (and re-ranking ``k_factor``, where given) against the exact ids, and
    its latency. ``kth``: each query's k-th exact score; ``exact_scores(got)``: the exact score of every id
    returned (None: no tie-aware recall)."""
    from output.ivf_index import tune

    tune(index, {"nprobe": nprobe} | ({"k_factor": k_factor} if k_factor else {}))
    t0 = time.perf_counter()
    _, got = index.search(q, k)
    batch_s = time.perf_counter() - t0
    hit = np.mean([len(set(a) & set(b)) / k for a, b in zip(got.tolist(), exact_ids.tolist())])
    ties = None if exact_scores is None else float(np.mean((exact_scores(got) >= kth[:, None] - 1e-5).sum(1) / k))
    lat = single_query_ms(index, q[:200], k)
    return {
        "nprobe": nprobe,
        **({"k_factor": k_factor} if k_factor else {}),
        "recall@10": round(float(hit), 4),
        "recall@10 (ties)": None if ties is None else round(ties, 4),
        "latency_ms_p50": round(float(np.median(lat)), 3),
        "latency_ms_p99": round(float(np.quantile(lat, 0.99)), 3),
        "batch_of_queries_s": round(batch_s, 3),
    }


def real_model(work: Path):
    """The real all-MiniLM-L6-v2 (the installed package) built for the CPU, fp32: (engine, tokenizer)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_ingest import warm_model

    from engine.checkpoint import default_model_path
    from engine.model_dir import load_engine, load_tokenizer

    spec = {"model": str(default_model_path()), "target": "onnx", "max_seq_len": 256}
    built = warm_model(work, "fp32", **spec, pooling="mean", normalize=True)
    return load_engine(built), load_tokenizer(built)


def embed_texts(model, texts: list[str], what: str) -> np.ndarray:
    engine, tok = model
    out = []
    for a in range(0, len(texts), 2048):
        enc = tok.encode(texts[a : a + 2048])
        out.append(engine.embed(enc.token_ids, enc.lengths))
        print(f"embedded {a + len(out[-1]):,} of {len(texts):,} {what}", file=sys.stderr, flush=True)
    return np.ascontiguousarray(np.concatenate(out), np.float32)


def sentence_vectors(
    data: Path, work: Path, held: int, model: Callable[[], Any]
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """The real MiniLM vectors of the corpus's sentences and of the ``held`` held-apart ones (cached in
    ``work``; ``model()`` gives the model when they are not), with the sentences, in ``bench_scale``'s order."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_scale import real_sentences

    sentences = real_sentences(data)
    np.random.default_rng(0).shuffle(sentences)  # type: ignore[arg-type]
    apart, corpus = sentences[:held], sentences[held:]
    cache = work / f"sentence-vectors-{len(sentences)}-{held}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["corpus"], z["apart"], corpus, apart
    v_corpus, v_apart = embed_texts(model(), corpus, "sentences"), embed_texts(model(), apart, "sentences")
    np.savez(cache, corpus=v_corpus, apart=v_apart)
    return v_corpus, v_apart, corpus, apart


def pair_vectors(v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The pairs corpus's vectors at ``rows``: row ``i`` joins sentences ``i mod k`` and ``(i mod k + 1 + i div
    k) mod k`` of ``k`` (``bench_scale.pair_texts``), as the normalized sum of their vectors."""
    k = len(v)
    i = np.asarray(rows, dtype=np.int64)
    x = v[i % k] + v[(i % k + 1 + i // k) % k]
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), np.float32)


class ExactTopK:
    """Each query's best ``k`` by inner product over vectors that come in chunks: exact search in one pass."""

    def __init__(self, q: np.ndarray, k: int) -> None:
        self.q, self.k = q, k
        self.scores = np.full((len(q), k), -np.inf, np.float32)
        self.ids = np.full((len(q), k), -1, np.int64)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        scores = np.concatenate([self.scores, self.q @ x.T], axis=1)
        cand = np.concatenate([self.ids, np.broadcast_to(ids, (len(self.q), len(ids)))], axis=1)
        top = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
        self.scores, self.ids = np.take_along_axis(scores, top, 1), np.take_along_axis(cand, top, 1)

    @property
    def kth(self) -> np.ndarray:
        """Each query's k-th best exact score."""
        return self.scores.min(axis=1)


def chunked_recall(
    vectors, n: int, q: np.ndarray, k: int, nprobes: list[int], k_factors: list[float], override: dict | None = None
) -> dict:
    """Build the ivfpq index over ``vectors(rows)`` for rows 0..n-1 (65,536 at a time, in order, as parts reach
    the ledger) while an exact search keeps each query's best k; then ``measure`` at the defaults and at each
    other nprobe and k_factor (0: the default's), each setting once."""
    import faiss

    from output.ivf_index import IvfPqBuilder, index_params

    faiss.omp_set_num_threads(max(1, os.cpu_count() or 1))
    dim, chunk = q.shape[1], 65_536
    override = dict(override or {})
    builder = IvfPqBuilder(dim, {**index_params("ivfpq", n, dim, nlist=override.pop("nlist", None)), **override})
    builder.all_cores = True  # no workers here: the build has the machine, as a job's finalize does
    exact = ExactTopK(q, k)
    t_build = t_exact = 0.0
    for a in range(0, n, chunk):
        ids = np.arange(a, min(a + chunk, n), dtype=np.int64)
        x = vectors(ids)
        t0 = time.perf_counter()
        builder.add(ids, x)
        t1 = time.perf_counter()
        exact.add(ids, x)
        t_build, t_exact = t_build + t1 - t0, t_exact + time.perf_counter() - t1
        if (a // chunk) % 16 == 0:
            print(f"{a + len(x):,} of {n:,} vectors indexed ({t_build:.0f} s)", file=sys.stderr, flush=True)
    index, params = builder.finish()

    def exact_scores(got: np.ndarray) -> np.ndarray:
        return np.stack([vectors(row) @ qv for qv, row in zip(q, got)])

    # the defaults first, then every other setting once (an explicit value equal to a default is not run twice)
    default = (int(params["nprobe"]), float(params["k_factor"]))
    combos = dict.fromkeys([default] + [(p or default[0], f or default[1]) for p in nprobes for f in k_factors])
    got = [measure(index, q, k, p, exact.ids, exact.kth, exact_scores, f) for p, f in combos]
    return {
        "vectors": n,
        "params": params,
        "build_s": round(t_build, 1),
        "train_s": round(builder.train_s, 1),
        "exact_s": round(t_exact, 1),
        "default": got[0],
        "others": got[1:],
    }


def pairs_recall(args: argparse.Namespace) -> dict:
    """``--pairs``: see the module docstring."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_scale import pair_texts

    args.work.mkdir(parents=True, exist_ok=True)
    model = functools.cache(lambda: real_model(args.work))  # built and loaded once, and only if needed
    v, v_apart, corpus, apart = sentence_vectors(args.data, args.work, 2 * args.queries, model)
    q = v_apart[0::2] + v_apart[1::2]
    q = np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), np.float32)
    nprobes = [0] + [int(p) for p in (args.nprobe.split(",") if args.nprobe else [])]
    k_factors = [0.0] + [float(f) for f in (args.k_factor.split(",") if args.k_factor else [])]
    res: dict = {"sentences": len(v), "dim": v.shape[1], "queries": len(q)}
    if args.check:  # how close the sum is to the embedding of the concatenated text
        rows = np.random.default_rng(1).choice(args.pairs, args.check, replace=False)
        real = embed_texts(model(), [pair_texts(corpus, int(r), 1)[0] for r in rows], "pairs")
        cos = np.sum(real * pair_vectors(v, rows), axis=1)
        res["proxy_cosine"] = {
            "pairs": len(rows),
            "mean": round(float(cos.mean()), 4),
            "p5": round(float(np.quantile(cos, 0.05)), 4),
        }
        print(json.dumps(res["proxy_cosine"]), file=sys.stderr, flush=True)
    if args.real:  # the same measure on the first --real rows embedded for real, and on their proxy
        x = embed_texts(model(), pair_texts(corpus, 0, args.real), "pairs")
        qr = embed_texts(model(), [f"{a} {b}" for a, b in zip(apart[0::2], apart[1::2])], "queries")
        res["at_real"] = {
            "real": chunked_recall(lambda rows: x[rows], args.real, qr, args.k, nprobes, k_factors),
            "proxy": chunked_recall(lambda rows: pair_vectors(v, rows), args.real, q, args.k, nprobes, k_factors),
        }
        print(json.dumps(res["at_real"]), file=sys.stderr, flush=True)
    res["proxy"] = chunked_recall(lambda rows: pair_vectors(v, rows), args.pairs, q, args.k, nprobes, k_factors)
    print(json.dumps({"defaults": res["proxy"]}), file=sys.stderr, flush=True)
    for variant in args.variants.split(";") if args.variants else []:
        over = {k: int(v) for k, v in (kv.split("=") for kv in variant.split(","))}
        res[f"proxy, {variant}"] = chunked_recall(
            lambda rows: pair_vectors(v, rows), args.pairs, q, args.k, nprobes, k_factors, over
        )
        print(json.dumps({variant: res[f"proxy, {variant}"]}), file=sys.stderr, flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--vectors", type=Path, help="float32 .npy [n, dim], L2-normalized")
    src.add_argument("--out", type=Path, help="a finished job's output folder")
    src.add_argument("--pairs", type=int, help="this many vectors made from real sentence vectors (see above)")
    ap.add_argument("--data", type=Path, default=ROOT / "tests" / "data", help="--pairs: stsb_multi_mt/, beir_scifact/")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "bench-recall", help="--pairs: model and vector cache")
    ap.add_argument("--check", type=int, default=2000, help="--pairs: pairs embedded for real to check the proxy")
    ap.add_argument(
        "--real", type=int, default=0, help="--pairs: also measure this many rows embedded for real, and their proxy"
    )
    ap.add_argument("--queries", type=int, default=1000, help="vectors held apart as queries")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", default=None, help="comma list of nprobe values to try besides the default")
    ap.add_argument("--k-factor", default=None, help="--pairs: comma list of re-ranking k_factors to try with each")
    ap.add_argument(
        "--variants",
        default=None,
        help="--pairs: also build with these index settings, each against the defaults: ';'-separated, each "
        "'key=value,...' over nlist (nprobe and train_size follow it) and pq_train_points (the sub-quantizers' "
        "k-means on at most this many points per centroid; FAISS's default 256), e.g. 'nlist=1000;pq_train_points=64'",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    if args.pairs:
        res = pairs_recall(args)
        print(json.dumps(res, indent=2))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return 0

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

    pos = {int(i): r for r, i in enumerate(ids.tolist())} if len(ids) <= 2_000_000 else None

    def exact_scores(got: np.ndarray) -> np.ndarray:
        assert pos is not None
        return np.array([[base[pos[i]] @ qv if i >= 0 else -9.0 for i in row] for qv, row in zip(q, got)])

    def run(nprobe: int) -> dict:
        return measure(index, q, args.k, nprobe, ex_i, ex_d[:, -1], exact_scores if pos is not None else None)

    res = {
        "vectors": n,
        "dim": dim,
        "queries": len(q),
        "params": params,
        "build_s": round(build_s, 2),
        "train_s": round(builder.train_s, 2),
        "default": run(int(params["nprobe"])),
        "others": [run(int(p)) for p in (args.nprobe.split(",") if args.nprobe else [])],
    }
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
