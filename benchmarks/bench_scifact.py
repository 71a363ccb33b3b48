"""Retrieval quality and cost of chunking: BEIR SciFact (test split) with all-MiniLM-L6-v2, whole ingests.

For each setting, ``ingest`` in local mode (redis-server, tritonserver, a Celery worker, as a user runs it) of the
5,183 SciFact abstracts with their titles (``--title-column title``), then ``eval`` on the 300 test queries:

* ``truncate``: no chunking; every text is cut at the model's 256 tokens (MTEB's setting; its published
  nDCG@10 is 0.64508, which this run must reproduce within 0.003);
* ``tokens:N:OVERLAP`` and ``sentences:N:OVERLAP``: ``--chunk`` settings; search returns documents, each scored
  by its best chunk.

Cost, same run, same corpus: tokens embedded per second while embedding (manifest ``counts.tokens`` /
``timings.embed_s``), and the whole command's wall time. The settings run one after the other, in the order
given, each in a fresh output folder (the built model is copied in, not rebuilt).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_scifact.py --json out/bench_scifact.json \\
        --settings truncate,tokens,tokens::32,tokens:128:32,sentences::32
    # cost alone, the settings alternating on the same corpus:
    PYTHONPATH=. .venv/bin/python benchmarks/bench_scifact.py --no-eval --docs 2000 \\
        --settings truncate,tokens,truncate,tokens,truncate,tokens
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT / "tests" / "data" / "beir_scifact"
MTEB_NDCG10 = 0.64508  # all-MiniLM-L6-v2, SciFact test, texts truncated at 256 tokens


def write_corpus(folder: Path, n_docs: int = 0) -> tuple[Path, Path, Path]:
    """SciFact as a Parquet corpus (id, title, text; the first ``n_docs``, 0 = all), its test queries as JSONL and
    the qrels path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(DATA / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    docs = docs[:n_docs] if n_docs else docs
    corpus = folder / "scifact.parquet"
    columns = {"id": [d["_id"] for d in docs], "title": [d["title"] for d in docs], "text": [d["text"] for d in docs]}
    pq.write_table(pa.table(columns), corpus)
    queries = folder / "queries.jsonl"
    with gzip.open(DATA / "queries.jsonl.gz", "rt", encoding="utf-8") as f, open(queries, "w", encoding="utf-8") as g:
        for line in f:
            q = json.loads(line)
            g.write(json.dumps({"_id": q["_id"], "text": q["text"]}) + "\n")
    return corpus, queries, DATA / "qrels" / "test.tsv"


def run_setting(
    setting: str, corpus: Path, queries: Path, qrels: Path, work: Path, seed: Path | None, run: int, score: bool
) -> dict:
    from core.config import FbasConfig
    from output.evaluate import evaluate
    from pipeline.ingest.run import ingest

    out = work / f"{run:02d}-{setting.replace(':', '_')}"
    if seed is not None:  # the model built by the first setting: copied, not rebuilt
        (out / ".fbas").mkdir(parents=True)
        shutil.copytree(seed / ".fbas" / "model", out / ".fbas" / "model")
        shutil.copy2(seed / ".fbas" / "model.spec", out / ".fbas" / "model.spec")
    cfg = FbasConfig()
    cfg.output.out = str(out)
    cfg.corpus.title_column = "title"
    cfg.corpus.chunk = "" if setting == "truncate" else setting
    t0 = time.perf_counter()
    r = ingest(str(corpus), cfg, progress=False)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    q = evaluate(out, queries, qrels) if score else {"ndcg@10": float("nan"), "recall@100": float("nan"), "queries": 0}
    counts, timings = r.manifest["counts"], r.manifest["timings"]
    return {
        "setting": setting,
        "ndcg@10": q["ndcg@10"],
        "recall@100": q["recall@100"],
        "queries": q["queries"],
        "documents": counts["input_rows"],
        "rows": counts.get("chunks", counts["input_rows"]),
        "truncated": counts["truncated"],
        "tokens": counts["tokens"],
        "embed_s": timings["embed_s"],
        "scan_s": timings.get("scan_s"),
        "tokens_per_s": round(counts["tokens"] / timings["embed_s"], 1),
        "wall_s": round(wall, 2),
        "eval_s": round(time.perf_counter() - t1, 2),
        "out": str(out),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="truncate,tokens,tokens::32,tokens:128:32,sentences::32")
    ap.add_argument("--json", default=None, help="append one JSON line per setting to this file")
    ap.add_argument("--work", default=None, help="folder for corpora and outputs (default: a temporary one)")
    ap.add_argument("--docs", type=int, default=0, help="only the first DOCS abstracts (0 = all 5,183)")
    ap.add_argument("--no-eval", action="store_true", help="cost only: ingest, do not score (a setting may repeat)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scifact-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels = write_corpus(work, args.docs)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    print(f"# SciFact test, all-MiniLM-L6-v2; {machine}; {time.strftime('%Y-%m-%d')}", flush=True)
    print("| setting | nDCG@10 | recall@100 | rows | truncated | tokens | tokens/s embedding | wall s |", flush=True)
    seed = None
    for run, setting in enumerate(s.strip() for s in args.settings.split(",") if s.strip()):
        r = run_setting(setting, corpus, queries, qrels, work, seed, run, not args.no_eval)
        seed = seed or Path(r["out"])
        r["load"] = round(os.getloadavg()[0], 2)
        print(
            f"| {setting} | {r['ndcg@10']:.5f} | {r['recall@100']:.5f} | {r['rows']} | {r['truncated']} | "
            f"{r['tokens']} | {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} |",
            flush=True,
        )
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps({**r, "date": time.strftime("%Y-%m-%d"), "machine": machine}) + "\n")
    print(f"MTEB reference (truncated at 256 tokens): {MTEB_NDCG10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
