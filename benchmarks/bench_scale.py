"""Cost per document from one million to ten million: the same running service ingests a 1 M-row and a
10 M-row corpus, and the docs/s, peak memory of each process, finalize/index times and the ivfpq index's
recall are compared.

    python benchmarks/bench_scale.py --tokenizer MINILM_DIR --data DATA --rows 1000000,10000000 \
        --index ivfpq,flat --json results.json

* **Corpus**: real English sentences (STS-B and the BEIR SciFact abstracts split into sentences, from
  ``DATA``; about 50,000 distinct), two to a row (row ``i``: sentence ``i mod n`` then sentence
  ``(i mod n + 1 + i div n) mod n``), so that every row's text is distinct (up to ``n * (n - 1)`` rows) and
  recall@10 counts ten different neighbours rather than ten copies of one; distinct integer ids, row groups
  of 65,536. ``--texts sentences``: one sentence a row, cycled (shorter rows, repeated texts; no recall then).
* **Recall** (pair rows with real weights, see Model; a flat index checks the measure itself, 1.0): ``--queries`` rows
  made the same way from sentences held apart from the corpus, embedded by the job's own model
  (``output.search.Searcher``) and searched in the job's own index (as ``fbas-pipeline search`` opens it, with
  its recorded parameters); exact search is one pass over the job's parts. recall@10 = |the index's 10 ids
  among the exact 10| / 10, averaged; latency: one query at a time on one thread (p50/p99 over 200), and the
  whole query set in one call on every core.
* **Service**: redis-server, tritonserver (the model on the GPU, ``--instance-count`` instances) and a Celery
  worker, started once (``services.local.LocalCluster``, as ``fbas-pipeline serve`` + ``worker`` on a fleet
  host); each corpus is submitted with ``ingest --broker``, as a user of a running service does.
* **GPU**: its utilization over each run (``nvidia-smi`` every 100 ms; the mean and 5 s bins).
* **Memory**: the producer's peak RSS (``VmHWM`` at its exit; the producer also finalizes), its RSS
  sampled every 0.5 s (peak while embedding and while finalizing), and the worker's pool processes' and
  tritonserver's peak RSS (``VmHWM``), sampled every 0.5 s.
* **Model**: all-MiniLM-L6-v2's shape with random weights (speed does not depend on their values); ``--shape
  tiny`` (one layer of 64, vectors of 64) on a CPU host, where MiniLM itself would take hours for 10 M rows:
  there the run measures what the pipeline around the model costs per document. ``--weights DIR``: a real
  checkpoint instead. Recall is measured only then (``--recall auto``): random weights put every vector within
  a small cone, where IVF-PQ's quantization error swamps the neighbours' differences (recall@10 0.074 at 1 M
  on the GPU host), so the figure would describe the weights, not the index.

Each output folder is deleted after its run (a 10 M-row job writes 15 GB of parts, and a flat index as much).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gpu_ingest import (  # noqa: E402
    all_worker_stages,
    bench_env,
    gpu_trace,
    random_model,
    result_header,
    running_service,
    worker_stages,
)
from bench_ingest import commit_timeline, warm_model  # noqa: E402

# the producer, with its peak RSS written at exit (VmHWM: ru_maxrss would keep the forking parent's peak across
# exec); it also finalizes, in the same process
PRODUCER = (
    "import atexit, os, re, runpy, sys\n"
    "def peak():\n"
    "    status = open('/proc/self/status').read()\n"
    "    open(os.environ['BENCH_PEAK_FILE'], 'w').write(re.search(r'VmHWM:\\s+(\\d+)', status).group(1))\n"
    "atexit.register(peak)\n"
    "sys.argv[0] = 'fbas-pipeline'\n"
    "runpy.run_module('pipeline.cli', run_name='__main__')\n"
)


def real_sentences(data: Path) -> list[str]:
    """Distinct English sentences: STS-B (both copies in DATA) and SciFact's abstracts split at sentence ends."""
    seen: dict[str, None] = {}
    for p in sorted((data / "stsb_multi_mt").glob("stsb-en-*.csv")):
        with open(p, encoding="utf-8", newline="") as f:
            for row in csv.reader(f):
                seen.update(dict.fromkeys(row[:2]))
    with gzip.open(data / "beir_scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            for s in re.split(r"(?<=[.!?])\s+", doc["text"]):
                if len(s) > 20:
                    seen[s] = None
    return [s for s in seen if s.strip()]


def pair_texts(sentences: list[str], start: int, n: int) -> list[str]:
    """Rows ``start .. start + n - 1`` of the corpus: two sentences each, every row's pair distinct."""
    k = len(sentences)
    if start + n > k * (k - 1):
        raise ValueError(f"{start + n:,} rows need more than {k:,} distinct sentences")
    return [f"{sentences[i % k]} {sentences[(i % k + 1 + i // k) % k]}" for i in range(start, start + n)]


def write_corpus(sentences: list[str], rows: int, path: Path, pairs: bool = True, group: int = 65_536) -> None:
    """``rows`` rows of ``pair_texts`` (or, ``pairs`` False, of the sentences themselves, cycled)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            if pairs:
                texts = pair_texts(sentences, start, n)
            else:
                texts = [sentences[(start + i) % len(sentences)] for i in range(n)]
            w.write_table(pa.table({"id": pa.array(range(start, start + n), pa.int64()), "text": texts}, schema))


def recall(out: Path, queries: list[str], k: int = 10) -> dict:
    """The job's own index against exact search over its parts, on ``queries`` (see the module docstring)."""
    import pyarrow.parquet as pq
    from bench_recall import ExactTopK, single_query_ms

    from output.ledger import part_vectors
    from output.search import Searcher

    s = Searcher(out)
    t0 = time.perf_counter()
    q = s.embed(queries)
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, got = s.index.search(q, k)
    batch_s = time.perf_counter() - t0
    lat = single_query_ms(s.index, q[:200], k)
    # exact search: one pass over the parts, keeping each query's best k (and the vectors of the ids returned)
    exact = ExactTopK(q, k)
    need = np.unique(got[got >= 0])
    found: dict[int, np.ndarray] = {}
    t0 = time.perf_counter()
    held: list[tuple[np.ndarray, np.ndarray]] = []  # parts gathered to 65,536 rows a product (a 10 M job has 10,839)

    def flush() -> None:
        if held:
            exact.add(np.concatenate([r for r, _ in held]), np.concatenate([v for _, v in held]))
            held.clear()

    for p in s.manifest["parts"]:
        t = pq.read_table(s.out.path(p["file"]), columns=["row_id", "embedding"])
        rows, vecs = t.column("row_id").to_numpy(), part_vectors(t)
        held.append((rows, vecs))
        if sum(len(r) for r, _ in held) >= 65_536:
            flush()
        hit = np.isin(rows, need)
        found.update(zip(rows[hit].tolist(), vecs[hit]))
    flush()
    exact_s = time.perf_counter() - t0
    kth = exact.kth
    same = [len(set(a) & set(b)) / k for a, b in zip(got.tolist(), exact.ids.tolist())]
    scored = np.array([[found[i] @ qv if i >= 0 else -9.0 for i in row] for qv, row in zip(q, got.tolist())])
    return {
        "queries": len(q),
        "params": s.manifest["index"]["params"],
        "recall@10": round(float(np.mean(same)), 4),
        "recall@10 (ties within 1e-5)": round(float(np.mean((scored >= kth[:, None] - 1e-5).sum(1) / k)), 4),
        "latency_ms_p50_1_thread": round(float(np.median(lat)), 3),
        "latency_ms_p99_1_thread": round(float(np.quantile(lat, 0.99)), 3),
        "batch_of_queries_s": round(batch_s, 3),
        "query_embed_s": round(embed_s, 3),
        "exact_pass_s": round(exact_s, 1),
    }


def _hwm_kb(pid: int, field: str = "VmHWM") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


class MemorySampler:
    """Every ``period`` s: the producer's RSS (a timeline), and the peak ``VmHWM`` of the worker's processes
    and of tritonserver."""

    def __init__(self, producer: int, worker: int | None, triton: int | None, period: float = 0.5) -> None:
        self.producer, self.worker, self.triton, self.period = producer, worker, triton, period
        self.timeline: list[tuple[float, int]] = []
        self.worker_peak_kb = self.worker_total_peak_kb = self.triton_peak_kb = 0
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.timeline.append((time.monotonic() - self._t0, _hwm_kb(self.producer, "VmRSS")))
            if self.worker:
                pids = _tree(self.worker)
                self.worker_peak_kb = max([self.worker_peak_kb, *(_hwm_kb(p) for p in pids)])
                now = sum(_hwm_kb(p, "VmRSS") for p in pids)
                self.worker_total_peak_kb = max(self.worker_total_peak_kb, now)
            if self.triton:
                self.triton_peak_kb = max(self.triton_peak_kb, _hwm_kb(self.triton))
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _peak_mb(samples_kb: list[int]) -> float | None:
    return round(max(samples_kb) / 1024, 1) if samples_kb else None


def ingest(corpus: Path, out: Path, env: dict, flags: list[str], cluster) -> dict:
    peak_file = out.parent / f"{out.name}.peak.json"
    # the producer's progress lines (one every 10 s) and errors go to a log beside the output folder, which
    # survives a run cut short by a time limit (scale_10m.sh copies it into the results)
    log_path = out.parent / f"{out.name}.producer.log"
    cmd = [sys.executable, "-c", PRODUCER, "-v", "ingest", str(corpus), "--out", str(out), *flags]  # -v: timed steps
    t0, start = time.perf_counter(), time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(
            cmd, env={**env, "BENCH_PEAK_FILE": str(peak_file)}, stdout=log, stderr=subprocess.STDOUT, text=True
        )
    worker = cluster.worker.proc.pid if cluster.worker is not None else None
    triton = cluster.triton.pid if cluster.triton is not None else None
    mem = MemorySampler(p.pid, worker, triton)
    before, stages0 = cluster.engine_stats(), all_worker_stages(cluster)
    util: dict = {}
    with gpu_trace(util, bin_s=5.0):
        p.wait()
    wall = time.perf_counter() - t0
    mem.stop()
    after = cluster.engine_stats()  # Triton's account of this run
    if p.returncode != 0:
        raise RuntimeError(f"ingest failed ({p.returncode}):\n{log_path.read_text(errors='replace')[-3000:]}")
    m = json.loads((out / "manifest.json").read_text())
    t = m["timings"]
    embed_end = wall - (t.get("finalize_s") or 0.0)
    rss = mem.timeline
    return {
        "wall_s": round(wall, 2),
        "docs": m["counts"]["embedded"],
        "docs_per_s": round(m["counts"]["embedded"] / wall, 1),
        "embed_s": t.get("embed_s"),
        "finalize_s": t.get("finalize_s"),
        "index_s": t.get("index_s"),
        "ledger_stop_s": t.get("ledger_stop_s"),
        "index_train_s": t.get("index_train_s"),  # ivfpq: training (job + finalize)
        "index_add_s": t.get("index_add_s"),  # the ledger's thread: appending codes (adds, before 52a0c4c)
        "index_encode_s": t.get("index_encode_s"),  # the readers' encoding, summed over their threads
        "parts_checked_ahead": t.get("parts_checked_ahead"),
        "manifest_timings": t,  # all of them: model_s, scan_s, ready_s (the first batch sent) ...
        "batches": m["counts"]["batches"],
        "index": {k: m["index"][k] for k in ("type", "ntotal", "params")},
        "producer_peak_mb": round(int(peak_file.read_text()) / 1024, 1),
        "producer_rss_embedding_peak_mb": _peak_mb([kb for s, kb in rss if s < embed_end]),
        "producer_rss_finalize_peak_mb": _peak_mb([kb for s, kb in rss if s >= embed_end]),  # None: too short
        "worker_process_peak_mb": round(mem.worker_peak_kb / 1024, 1),
        "worker_pool_total_peak_mb": round(mem.worker_total_peak_kb / 1024, 1),
        "tritonserver_peak_mb": round(mem.triton_peak_kb / 1024, 1),
        "timeline": commit_timeline(out, start),
        "triton": {k: round(after[k] - before[k], 3) for k in after if k in before},
        "worker_stages": worker_stages(cluster, out, since=stages0),
        "disk_gb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e9, 2),
        # the GPU's busy % over the whole run (nvidia-smi, mean of 5 s bins), and the bins
        "gpu_util_mean": round(sum(util["gpu_util"]) / len(util["gpu_util"]), 1) if util.get("gpu_util") else None,
        "gpu_util": util.get("gpu_util"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, type=Path, help="all-MiniLM-L6-v2 folder (tokenizer + config)")
    ap.add_argument("--data", required=True, type=Path, help="folder with stsb_multi_mt/ and beir_scifact/")
    ap.add_argument("--rows", default="1000000,10000000", help="comma list of corpus sizes, run in this order")
    ap.add_argument("--index", default="ivfpq", help="comma list of index types, each run at every size")
    ap.add_argument(
        "--shape",
        default="minilm",
        help="minilm: all-MiniLM-L6-v2's shape; tiny: 1 layer of 64 (a CPU host then measures the pipeline's "
        "own cost per document, not the model's)",
    )
    ap.add_argument(
        "--texts",
        default="pairs",
        choices=("pairs", "sentences"),
        help="pairs: two sentences a row, every row distinct; sentences: one a row, cycled (shorter, repeated)",
    )
    ap.add_argument("--target", default="gpu", help="engine target (onnx: a dry run on a CPU)")
    ap.add_argument("--precision", default=None, help="default: fp16 on gpu, fp32 otherwise")
    ap.add_argument("--instance-count", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=None, help="worker processes (default: sized to the host)")
    ap.add_argument("--batch-tokens", type=int, default=65536)
    ap.add_argument("--batch-rows", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=1000, help="held-apart queries for each ivfpq run's recall")
    ap.add_argument(
        "--recall",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: only with --weights (random weights give vectors that sit close together: recall on them "
        "measures nothing, 0.074 at 1 M on the GPU host); on: always; off: never",
    )
    ap.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="a real checkpoint folder (model.safetensors + config + tokenizer) instead of random weights of --shape",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()

    from services.worker import default_concurrency

    gpu = args.target == "gpu"
    args.precision = args.precision or ("fp16" if gpu else "fp32")
    args.concurrency = args.concurrency or default_concurrency(gpu=gpu)
    env = bench_env()
    res: dict = {**result_header(gpu), "runs": []}
    work = args.work or Path(tempfile.mkdtemp(prefix="fbas-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = args.weights or random_model(args.tokenizer, work / f"model-{args.shape}", args.shape)
        res["weights"] = str(args.weights) if args.weights else f"random, {args.shape} shape"
        want_recall = args.recall == "on" or (args.recall == "auto" and args.weights is not None)
        spec = {"model": str(model), "target": args.target, "max_seq_len": 256, "pooling": "mean", "normalize": True}
        built = warm_model(work, args.precision, **spec)
        sentences = real_sentences(args.data)
        rng = np.random.default_rng(0)
        rng.shuffle(sentences)  # type: ignore[arg-type]
        held, sentences = sentences[: 2 * args.queries], sentences[2 * args.queries :]
        queries = [f"{a} {b}" for a, b in zip(held[0::2], held[1::2])]
        res["distinct_sentences"], res["held_apart_sentences"] = len(sentences), len(held)
        flags = ["--model", str(model), "--target", args.target, "--precision", args.precision, "--max-seq-len", "256"]
        flags += ["--pooling", "mean", "--normalize", "--batch-tokens", str(args.batch_tokens)]
        flags += ["--batch-rows", str(args.batch_rows), "--max-docs-per-request", str(args.batch_rows)]
        with running_service(built, work / "svc", args, 256, args.instance_count, args.concurrency) as cluster:
            env["FBAS_TASK_KEY"] = cluster.task_key
            for rows in (int(r) for r in args.rows.split(",")):
                corpus = work / f"corpus-{rows}.parquet"
                t0 = time.perf_counter()
                write_corpus(sentences, rows, corpus, pairs=args.texts == "pairs")
                print(f"corpus of {rows:,} rows written in {time.perf_counter() - t0:.1f} s", flush=True)
                for kind in args.index.split(","):
                    out = work / f"out-{rows}-{kind}"
                    got = ingest(corpus, out, env, [*flags, "--index", kind, "--broker", cluster.broker_url], cluster)
                    got.update(rows=rows, index_type=kind)
                    if want_recall and args.queries and args.texts == "pairs":  # flat: the measure's own check (1.0)
                        try:
                            got["recall"] = recall(out, queries)
                        except Exception as e:  # noqa: BLE001 - keep the runs that follow
                            got["recall"] = {"error": repr(e)}
                    print(json.dumps(got), flush=True)
                    res["runs"].append(got)
                    shutil.rmtree(out, ignore_errors=True)
                    if args.json:
                        args.json.write_text(json.dumps(res, indent=2))
                corpus.unlink()
        for kind in args.index.split(","):  # the cost per document at the largest size against the smallest
            runs = sorted((r for r in res["runs"] if r["index_type"] == kind), key=lambda r: r["rows"])
            if len(runs) > 1:
                small, big = runs[0], runs[-1]
                res.setdefault("ratios", {})[kind] = ratio = round(big["docs_per_s"] / small["docs_per_s"], 3)
                print(f"{kind}: docs/s at {big['rows']:,} rows / at {small['rows']:,} rows = {ratio}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
