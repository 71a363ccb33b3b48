"""Whole-ingest benchmark: Parquet corpus -> queryable FAISS index, fbas local mode vs a plain script.

Same machine, same corpus, same run, alternating the two:

* **fbas**: ``fbas-pipeline ingest CORPUS --out OUT`` in local mode, as a user runs it, in a fresh
  output folder: builds the model, starts redis-server, tritonserver and a Celery worker,
  scans, plans, embeds, writes the parts, merges the index, stops everything. Wall time of the
  whole command. Run in fp32 (the default) and with the calibrated int8 engine (``--precision int8``).
* **plain**: the script a user would otherwise write: read the Parquet file with pyarrow,
  ``SentenceTransformer(all-MiniLM-L6-v2).encode(texts, normalize_embeddings=True)`` (its
  default batch size 32, fp32, all cores), ``faiss.IndexIDMap2(IndexFlatIP)``, ``write_index``.
  Wall time of the whole process (imports included, as for fbas).
* **engine**: the fbas engine alone, in-process (ONNX Runtime, the same built model, all cores),
  on the corpus's pre-tokenized texts: ``engine.embed(token_ids, lengths)`` = model time only.

Pipeline efficiency = fbas end-to-end docs/s / engine docs/s (the share of the engine's own
speed the whole pipeline keeps, start-up and shut-down included); the steady-state efficiency
uses the embedding phase only (manifest ``timings.embed_s``).

Corpus: every distinct English STS-B sentence (test + dev, 5,7xx), repeated ``--repeat`` times
with distinct ids so that start-up cost is amortized as in a real ingest.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ingest.py --repeat 4 --runs 2 --json out/bench_ingest.json

fbas runs use the per-user model build cache (``~/.cache/fbas/models``), warmed before timing, as
every ingest after the first does (the plain script's model is likewise already on disk); the
first-ever build costs about 1.5 s in fp32 and about 90 s in int8 (calibration) on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLAIN_SCRIPT = r"""
import sys, time
t0 = time.perf_counter()
import numpy as np, pyarrow.parquet as pq, faiss
from sentence_transformers import SentenceTransformer
corpus, model_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
t = pq.read_table(corpus, columns=["id", "text"])
texts = t.column("text").to_pylist()
model = SentenceTransformer(model_path, device="cpu")
t_enc = time.perf_counter()
emb = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
enc_s = time.perf_counter() - t_enc
index = faiss.IndexIDMap2(faiss.IndexFlatIP(emb.shape[1]))
index.add_with_ids(np.ascontiguousarray(emb, dtype=np.float32), np.arange(len(texts), dtype=np.int64))
faiss.write_index(index, out)
print(f"PLAIN {len(texts)} {enc_s:.3f} {time.perf_counter() - t0:.3f}")
"""


def make_corpus(data: Path, repeat: int, path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    seen: set[str] = set()
    texts: list[str] = []
    for split in ("test", "dev"):
        with open(data / "stsb_multi_mt" / f"stsb-en-{split}.csv", encoding="utf-8", newline="") as f:
            for r in csv.reader(f):
                for s in r[:2]:
                    if s not in seen:
                        seen.add(s)
                        texts.append(s)
    ids = [f"r{k}-{i}" for k in range(repeat) for i in range(len(texts))]
    pq.write_table(pa.table({"id": ids, "text": texts * repeat}), path)
    return len(ids)


def run_fbas(
    corpus: Path,
    out: Path,
    env: dict,
    precision: str,
    extra: tuple[str, ...] = (),
    root: Path = ROOT,
    log_lines: int = 0,
) -> dict:
    """``fbas-pipeline ingest`` as a user runs it (``extra``: more flags; ``root``: the checkout whose code
    runs); wall time + manifest timings (+ the first ``log_lines`` lines of its ``-v`` log, timestamped)."""
    t0, start = time.perf_counter(), time.time()
    verbose = ("-v",) if log_lines else ()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            *verbose,
            "ingest",
            str(corpus),
            "--out",
            str(out),
            "--precision",
            precision,
            "--no-progress",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(root),
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"fbas ingest failed:\n{p.stderr[-3000:]}")
    m = json.loads((out / "manifest.json").read_text())
    t = m["timings"]
    services = local_logs(out) if log_lines else []
    return {
        "wall_s": round(wall, 3),
        "embed_s": t.get("embed_s"),
        "ready_s": t.get("ready_s"),
        "scan_s": t.get("scan_s"),
        "finalize_s": t.get("finalize_s"),
        "index_s": t.get("index_s"),
        "ledger_stop_s": t.get("ledger_stop_s"),
        "parts_checked_ahead": t.get("parts_checked_ahead"),
        "engine_compute_s": t.get("engine_compute_s"),
        "docs": m["counts"]["embedded"],
        "padding_ratio": m["settings"].get("padding_ratio"),
        "batches": m["counts"]["batches"],
        "timeline": commit_timeline(out, start),
        **({"log": p.stderr.splitlines()[:log_lines]} if log_lines else {}),
        **({"service_logs": services} if services else {}),
    }


def local_logs(out: Path) -> list[str]:
    """Local mode's start, from its services' logs: tritonserver's own lines (timestamped; the table of
    options left out) and the Celery worker's ready line."""
    from core.layout import OutputDir

    logs = OutputDir(out).state("local") / "logs"
    keep = []
    for name, wanted in (("tritonserver.log", ("I", "W", "E")), ("worker.log", ("[",))):
        f = logs / name
        if f.exists():
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            keep += [
                f"{name}: {x[:240]}" for x in lines if x.startswith(wanted) and (name != "worker.log" or "ready" in x)
            ][:60]
    return keep


def commit_timeline(out: Path, start: float) -> dict:
    """When the run's parts were committed (their files' mtimes), in seconds from the command's start: the
    first, the 10/50/90% marks, the last, the longest pause between two commits and the manifest."""
    import numpy as np

    t = np.sort([f.stat().st_mtime for f in (out / "vectors").glob("part-*.parquet")]) - start
    if not len(t):
        return {}
    q = np.quantile(t, [0.1, 0.5, 0.9])
    return {
        "first_part_s": round(float(t[0]), 3),
        "p10_s": round(float(q[0]), 3),
        "p50_s": round(float(q[1]), 3),
        "p90_s": round(float(q[2]), 3),
        "last_part_s": round(float(t[-1]), 3),
        "longest_pause_s": round(float(np.diff(t).max()) if len(t) > 1 else 0.0, 3),
        "manifest_s": round((out / "manifest.json").stat().st_mtime - start, 3),
    }


def run_plain(corpus: Path, model_path: str, out: Path, env: dict) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", PLAIN_SCRIPT, str(corpus), model_path, str(out)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"plain script failed:\n{p.stderr[-3000:]}")
    line = next(x for x in p.stdout.splitlines() if x.startswith("PLAIN"))
    _, n, enc_s, inner = line.split()
    return {"wall_s": wall, "encode_s": float(enc_s), "docs": int(n)}


def warm_model(work: Path, precision: str, **engine) -> Path:
    """The built model fbas uses (through its per-user build cache, as every ingest after the first does);
    ``engine``: more ``cfg.engine`` fields, the same the ingest command is given."""
    from core.config import FbasConfig
    from core.layout import OutputDir
    from pipeline.ingest.model_cache import ensure_model

    cfg = FbasConfig()
    cfg.engine.precision = precision
    for k, v in engine.items():
        setattr(cfg.engine, k, v)
    return ensure_model(cfg, OutputDir(work / f"warm-{precision}"))


def run_engine(corpus: Path, model_dir: Path, threads: int, device: str | None = None) -> dict:
    """The engine alone on the pre-tokenized corpus. On a GPU the whole corpus runs once first, so
    the timed run finds its CUDA graphs captured (as a long-running Triton instance does)."""
    import pyarrow.parquet as pq

    from engine.model_dir import load_engine, load_tokenizer

    texts = pq.read_table(corpus, columns=["text"]).column("text").to_pylist()
    tok = load_tokenizer(model_dir)
    t0 = time.perf_counter()
    enc = tok.encode(texts)
    tok_s = time.perf_counter() - t0
    engine = load_engine(model_dir, threads=threads, device=device)
    n_warm = len(enc.lengths) if device else 64
    engine.embed(enc.token_ids[: int(enc.lengths[:n_warm].sum())], enc.lengths[:n_warm])  # warm-up
    t0 = time.perf_counter()
    engine.embed(enc.token_ids, enc.lengths)
    model_s = time.perf_counter() - t0
    return {
        "model_s": round(model_s, 3),
        "tokenize_s": round(tok_s, 3),
        "docs": len(texts),
        "tokens": int(enc.lengths.sum()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "tests" / "data"), help="evaluation data folder (default: tests/data)")
    ap.add_argument("--repeat", type=int, default=8, help="times the STS-B sentences are repeated (distinct ids)")
    ap.add_argument("--runs", type=int, default=2, help="alternating runs of each side; the median counts")
    ap.add_argument("--threads", type=int, default=0, help="engine threads (0 = all cores, as fbas and torch use)")
    ap.add_argument("--skip-plain", action="store_true", help="do not run the sentence-transformers script")
    ap.add_argument("--precisions", default="fp32,int8", help="fbas engine precisions to run (comma list)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--work", default=str(ROOT / "out"), help="folder for the temporary corpus and outputs")
    args = ap.parse_args()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    from engine.checkpoint import default_model_path

    model_path = str(default_model_path())
    precisions = args.precisions.split(",")
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_before": os.getloadavg(),
        "plain": [],
        **{f"fbas_{p}": [] for p in precisions},
        **{f"engine_{p}": [] for p in precisions},
    }
    Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=args.work) as tmp:
        work = Path(tmp)
        corpus = work / "corpus.parquet"
        n = make_corpus(Path(args.data), args.repeat, corpus)
        results["docs"] = n
        print(f"corpus: {n} docs ({args.repeat} x STS-B test+dev sentences)", file=sys.stderr)
        models = {p: warm_model(work, p) for p in precisions}
        for r in range(args.runs):
            for p in precisions:
                results[f"engine_{p}"].append(run_engine(corpus, models[p], args.threads))
                print(f"run {r}: engine {p} {results[f'engine_{p}'][-1]}", file=sys.stderr)
                results[f"fbas_{p}"].append(run_fbas(corpus, work / f"out-{p}-{r}", env, p))
                print(f"run {r}: fbas {p} {results[f'fbas_{p}'][-1]}", file=sys.stderr)
            if not args.skip_plain:
                results["plain"].append(run_plain(corpus, model_path, work / f"plain{r}.faiss", env))
                print(f"run {r}: plain {results['plain'][-1]}", file=sys.stderr)
            results.setdefault("load_per_run", []).append(os.getloadavg())
    results["load_after"] = os.getloadavg()

    med = statistics.median
    summary: dict = {"docs": n}
    pl_wall = med(x["wall_s"] for x in results["plain"]) if results["plain"] else None
    if pl_wall:
        summary["plain"] = {
            "wall_s": round(pl_wall, 2),
            "docs_per_s": round(n / pl_wall, 1),
            "encode_docs_per_s": round(n / med(x["encode_s"] for x in results["plain"]), 1),
        }
    for p in precisions:
        fb = results[f"fbas_{p}"]
        wall, embed = med(x["wall_s"] for x in fb), med(x["embed_s"] for x in fb)
        compute = med(x["engine_compute_s"] or 0 for x in fb)
        eng = med(x["model_s"] for x in results[f"engine_{p}"])
        summary[p] = {
            "fbas_wall_s": round(wall, 2),
            "fbas_docs_per_s": round(n / wall, 1),
            "engine_docs_per_s": round(n / eng, 1),
            "efficiency": round(eng / wall, 3),
            "steady_state_efficiency": round(eng / embed, 3),
            "triton_busy_share_of_wall": round(compute / wall, 3) if compute else None,
        }
        if pl_wall:
            summary[p]["speedup_vs_plain"] = round(pl_wall / wall, 2)
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
