"""Throughput across hosts on the CPU engine: the same corpus ingested by a fleet of 1, then 2 worker hosts
(network namespaces on this machine, tests/fleet.py), same run. The hosts share this machine's cores, so
the ratio says how well work spreads and what the fleet machinery costs, not what 2 real machines would do.

    sudo .venv/bin/python benchmarks/bench_fleet.py --rows 6000 --hosts 1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fleet import Fleet, available  # noqa: E402
from tests.pipeline_support import check_oracle  # noqa: E402


def _corpus(path: Path, rows: int) -> list[str]:
    import csv

    with open(ROOT / "tests" / "data" / "stsb_multi_mt" / "stsb-en-test.csv", encoding="utf-8", newline="") as f:
        pairs = list(csv.reader(f))
    base = [r[0] for r in pairs] + [r[1] for r in pairs]
    ids = [f"b{i}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "text": [f"{base[i % len(base)]} ({i})" for i in range(rows)]}), path)
    return ids


def run(work: Path, model: Path, corpus: Path, ids: list[str], hosts: int, concurrency: int) -> dict:
    """One ingest of the corpus by a fresh fleet of ``hosts`` worker hosts (a fresh output folder)."""
    with Fleet(work / f"fleet-{len(list(work.glob('fleet-*')))}-{hosts}", model) as fleet:
        fleet.start_broker()
        for _ in range(hosts):
            fleet.add_worker_host(concurrency=concurrency)
        out = fleet.out_root / "out"
        t0 = time.monotonic()
        code = fleet.run_producer(corpus, out).wait()
        seconds = time.monotonic() - t0
        if code != 0:
            raise SystemExit(f"the ingest with {hosts} hosts failed: see {fleet.work}")
        manifest = check_oracle(out, ids)
    return {
        "hosts": hosts,
        "seconds": round(seconds, 2),
        "docs_per_s": round(len(ids) / seconds, 1),
        "embed_s": manifest["timings"].get("embed_s"),
    }


def main() -> int:
    from core.config import FbasConfig
    from core.layout import OutputDir
    from pipeline.ingest.model_cache import ensure_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=6000, help="corpus rows (default: 6000)")
    ap.add_argument("--hosts", default="1,2", help="fleet sizes to compare (default: 1,2)")
    ap.add_argument("--concurrency", type=int, default=1, help="worker processes per host (default: 1)")
    args = ap.parse_args()
    why = available()
    if why:
        print(f"cannot build the fleet: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fbas-bench-fleet-"))
    model = ensure_model(FbasConfig(), OutputDir(work / "template"))
    corpus = work / "corpus.parquet"
    ids = _corpus(corpus, args.rows)
    results = [run(work, model, corpus, ids, int(h), args.concurrency) for h in args.hosts.split(",")]
    base = results[0]["docs_per_s"]
    for r in results:
        r["ratio"] = round(r["docs_per_s"] / base, 3)
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
