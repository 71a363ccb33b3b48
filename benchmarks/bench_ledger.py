"""The producer's own per-part and per-id work, this checkout against another (a baseline commit), same run.

    python benchmarks/bench_ledger.py --baseline ../fbas-base [--parts 240] [--ids 2154000] [--rounds 2]

Two measures, each run in a fresh process per checkout, the checkouts alternating:

* **ledger**: a worker-like writer commits ``--parts`` vectors parts (4,096 rows of 384 float32, string ids,
  ``workers.write.write_batch``) while the ledger (``output.ledger.PartLedger``, flat index) reads them eight
  parts behind it, as the producer's feeder does during a job; then the last parts and the index commit.
  Reported: ms a part for the writer and for the ledger. What the ledger cannot keep up with is finalize's tail.
* **ids**: a new job's id check (``pipeline.ingest.plan.corpus_id_hashes`` + ``check_unique_ids``) on a
  corpus of ``--ids`` string ids in row groups of 32,768, as the STS-B benchmark corpus has them.

The ratio printed is baseline / this checkout (above 1: this checkout is faster). Needs no GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LEDGER = r"""
import json, shutil, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from core.ids import id_hashes
from core.layout import OutputDir
from output.ledger import PartLedger
from workers.write import BatchOutput, write_batch
n, rows, dim, root = int(sys.argv[2]), 4096, 384, sys.argv[3]
out = OutputDir(root)
out.make_dirs()
out.state("").mkdir(parents=True, exist_ok=True)
ids = [f"doc-{i}" for i in range(n * rows)]
vecs = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
ledger = PartLedger(out, "job", dim, "flat", id_hashes(ids), n * rows)
write_s = ledger_s = 0.0
for b in range(n):
    t0 = time.perf_counter()
    r = np.arange(b * rows, (b + 1) * rows)
    write_batch(out, BatchOutput("job", b, "m", dim, "string", r, ids[b * rows : (b + 1) * rows], vecs,
                np.full(rows, 16, np.int32), np.zeros(rows, bool), np.zeros(rows, bool), np.zeros(0, np.int64), [], []))
    t1 = time.perf_counter()
    write_s += t1 - t0
    if b % 8 == 7:
        ledger.advance(b + 1)
    ledger_s += time.perf_counter() - t1
t0 = time.perf_counter()
assert ledger.advance(n) == n
ledger.commit_index()
ledger_s += time.perf_counter() - t0
shutil.rmtree(root, ignore_errors=True)
print(json.dumps({"write_ms_per_part": 1000 * write_s / n, "ledger_ms_per_part": 1000 * ledger_s / n}))
"""

IDS = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from core.config import CorpusConfig
from pipeline.ingest.plan import check_unique_ids, corpus_id_hashes
from pipeline.ingest.read import open_corpus
corpus = open_corpus(sys.argv[2], CorpusConfig())
best = None
for _ in range(3):
    t0 = time.perf_counter()
    check_unique_ids(corpus, corpus_id_hashes(corpus))
    s = time.perf_counter() - t0
    best = s if best is None else min(best, s)
print(json.dumps({"id_check_s": best}))
"""


def run(code: str, *args: str) -> dict:
    got = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, type=Path, help="another checkout of fbas (the peer)")
    ap.add_argument("--parts", type=int, default=240)
    ap.add_argument("--ids", type=int, default=2_154_000)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each checkout, alternating")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder on the disk to measure")
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="fbas-bench-ledger-", dir=args.work))
    corpus = work / "ids.parquet"
    pq.write_table(
        pa.table({"id": [f"r{i // 32768}-{i % 32768}" for i in range(args.ids)], "text": [""] * args.ids}),
        corpus,
        row_group_size=32768,
    )
    roots = {"baseline": args.baseline.resolve(), "this": ROOT}
    res: dict[str, list[dict]] = {k: [] for k in roots}
    for r in range(args.rounds):
        for name, root in roots.items():
            got = run(LEDGER, str(root), str(args.parts), str(work / f"out-{name}-{r}"))
            got.update(run(IDS, str(root), str(corpus)))
            res[name].append(got)
            print(name, {k: round(v, 3) for k, v in got.items()}, flush=True)
    for key in ("ledger_ms_per_part", "write_ms_per_part", "id_check_s"):
        base, this = (statistics.median(x[key] for x in res[k]) for k in ("baseline", "this"))
        print(f"{key}: baseline {base:.3f}, this checkout {this:.3f}, ratio {base / this:.2f}x")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
