"""What one host's cores give the ivfpq index: training and adds per second at the job's defaults, by thread count.

    python benchmarks/bench_index_add.py [--rows 1000000] [--threads 1,2,8,16] [--add 65536] [--json F]

The index is ``output.ivf_index``'s, with ``index_params("ivfpq", --rows, 384)`` (the 1 M defaults: 1,000
lists, PQ48 x 8 bits, SQ8 re-ranking), trained on ``train_size`` vectors; the vectors are random around
2,000 centres, L2-normalized (the structure of NOTES 4l). For each thread count: the training, then on
``--add`` vectors the coarse assignment alone (``quantizer.search``, k=1), the IVF-PQ codes alone
(``sa_encode``: assignment plus PQ), the SQ8 codes alone, whole adds in FAISS (``add_with_ids``, 16,384 at a
time, as the ledger added until it appended codes), and what the ledger does now: parts of ``--part`` rows
encoded side by side on that many threads of one OpenMP thread each (``Codec.encode``, as the ledger's readers
do), and the codes appended in order (``IvfPqBuilder``), in vectors a second (the best of 3 each; the appends once).

Why: on the H100 host of NOTES 4m the ledger added an estimated 34,000-40,000 vectors a second beside the
workers (8 threads) and 66,000-79,000 at finalize (16), read from the producer's memory (448 bytes a vector);
the 2-core CI VM adds 100,000 a second on 2 threads with this script. The header prints what numpy sees of
the CPU (its SIMD dispatch) and FAISS's compile options, so a host whose virtual CPU hides AVX2 or AVX-512
shows it. ``--hold N`` keeps N other processes spinning meanwhile, as a job's workers hold the cores the ledger
shares (NOTES 4l: on this VM, with both cores held, FAISS's 2-thread adds fell from 99,678 to 23,976 vectors
a second). Needs no GPU; the peer is the same host at other thread counts, and the other way of adding.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_triton_client import cpu_name  # noqa: E402

from core.envs import cpu_count  # noqa: E402
from output.ivf_index import Codec, IvfPqBuilder, PartCodes, index_params, new_ivfpq  # noqa: E402


def cpu_header() -> dict:
    """The CPU model, the SIMD features numpy's dispatch found, and FAISS's build."""
    import faiss

    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core._multiarray_umath import __cpu_features__ as feats
    want = ("AVX2", "FMA3", "AVX512F", "AVX512_SKX", "AVX512_SPR")
    return {
        "cpu": cpu_name(),  # the model and the cores this process may use
        "numpy_simd": {k: bool(feats.get(k)) for k in want},
        "faiss": f"{faiss.__version__} ({faiss.get_compile_options().strip()})",
    }


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, centres.shape[1]), np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def rate(n: int, fn, repeats: int = 3, before=None) -> float:
    """``n`` / the best of ``repeats`` timings of ``fn()`` (``before()`` runs untimed ahead of each)."""
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(n / best)


ADD_BATCH = 16_384  # the ledger's adds before it appended codes (NOTES 4l, 4m)


def add_batched(index, x: np.ndarray, ids: np.ndarray) -> None:
    for i in range(0, len(x), ADD_BATCH):
        index.add_with_ids(x[i : i + ADD_BATCH], ids[i : i + ADD_BATCH])


def encode_parts(codec: Codec, parts: list[np.ndarray], threads: int) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(codec.encode, parts))


def append_parts(b: IvfPqBuilder, ids: np.ndarray, parts: list[np.ndarray], codes: list) -> float:
    """Seconds to append the parts' codes (made by ``b``'s codec) to the trained builder ``b``."""
    t0, at = time.perf_counter(), 0
    for v, c in zip(parts, codes):
        b.add_part(PartCodes(ids[at : at + len(v)], v, c, b.codec))
        at += len(v)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="the job size whose defaults are used")
    ap.add_argument("--threads", default=None, help="comma list (default: 1, 2, half the cores, every core)")
    ap.add_argument("--add", type=int, default=65_536, help="vectors timed in each add measure")
    ap.add_argument("--part", type=int, default=920, help="rows a part (a GPU job's parts are about 920)")
    ap.add_argument(
        "--hold",
        type=int,
        default=0,
        help="processes that spin on a core each while everything is timed, as a job's workers hold a host's cores "
        "(0: the host idle)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    n_cores = cpu_count()  # the cores the ledger's thread rule counts (this process's affinity)
    threads = sorted(
        {int(t) for t in args.threads.split(",")} if args.threads else {1, 2, max(1, n_cores // 2), n_cores}
    )
    p = index_params("ivfpq", args.rows, 384)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, 384)).astype(np.float32)
    xt, x = clustered(rng, centres, p["train_size"]), clustered(rng, centres, args.add)
    ids = np.arange(args.add, dtype=np.int64)
    parts = [x[i : i + args.part] for i in range(0, len(x), args.part)]
    res: dict = {**cpu_header(), "params": p, "held_cores": args.hold, "runs": []}
    print(json.dumps({k: res[k] for k in ("cpu", "numpy_simd", "faiss", "held_cores")}), flush=True)
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.hold)]
    for sp in spinners:
        sp.start()
    try:
        measure(args, threads, p, xt, x, ids, parts, res)
    finally:
        for sp in spinners:
            sp.terminate()
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


def spin() -> None:
    while True:
        pass


def measure(args, threads, p, xt, x, ids, parts, res) -> None:
    import faiss

    builder = IvfPqBuilder(384, p)  # trained once (untimed): its codec encodes the parts, and it takes the appends
    builder.add(np.arange(len(xt), dtype=np.int64), xt)
    codec = builder.codec
    assert codec is not None
    for t in threads:
        faiss.omp_set_num_threads(t)
        index = new_ivfpq(384, p)
        t0 = time.perf_counter()
        index.train(xt)
        train_s = round(time.perf_counter() - t0, 2)
        ivf = faiss.extract_index_ivf(index)
        sq = faiss.downcast_index(faiss.downcast_index(index.index).refine_index)
        got = {
            "threads": t,
            "train_s": train_s,
            "assign_per_s": rate(args.add, lambda: ivf.quantizer.search(x, 1)),
            "ivfpq_codes_per_s": rate(args.add, lambda: ivf.sa_encode(x)),
            "sq8_codes_per_s": rate(args.add, lambda: sq.sa_encode(x)),
            # as the ledger added until it appended codes: into the index emptied before each repeat
            "add_per_s": rate(args.add, lambda: add_batched(index, x, ids), before=index.reset),
            # as the ledger's readers encode now: a part each, one OpenMP thread each
            "encode_parts_per_s": rate(args.add, lambda: encode_parts(codec, parts, t)),
        }
        codes = encode_parts(codec, parts, t)
        got["append_per_s"] = round(args.add / append_parts(builder, ids, parts, codes))  # once
        print(json.dumps(got), flush=True)
        res["runs"].append(got)


if __name__ == "__main__":
    sys.exit(main())
