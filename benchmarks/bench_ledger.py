"""The producer's own per-part and per-id work, this checkout against another (a baseline commit), same run.

    python benchmarks/bench_ledger.py --baseline ../fbas-base [--parts 240] [--ids 2154000] [--rounds 2]
                                      [--index flat|ivfpq] [--busy K]

Two measures, each run in a fresh process per checkout, the checkouts alternating:

* **ledger**: a worker-like writer commits ``--parts`` vectors parts (4,096 rows of 384 float32, string ids,
  ``workers.write.write_batch``) while the ledger (``output.ledger.PartLedger``, flat index) reads them eight
  parts behind it, as the producer's feeder does during a job; then the last parts and the index commit.
  Reported: ms a part for the writer and for the ledger. What the ledger cannot keep up with is finalize's tail.
  ``--index ivfpq``: the ledger trains the index on the first parts and adds the rest (the vectors are random
  around 2,000 centres), and the last step is finalize's (every core where the checkout allows it, then the
  index file written). ``peak_mb``: the process's peak resident memory (``VmHWM``). ``--busy K`` keeps K
  other processes spinning meanwhile, as a GPU host's workers hold its cores.
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
n, rows, dim, root, kind = int(sys.argv[2]), 4096, 384, sys.argv[3], sys.argv[4]
out = OutputDir(root)
out.make_dirs()
out.state("").mkdir(parents=True, exist_ok=True)
ids = [f"doc-{i}" for i in range(n * rows)]
rng = np.random.default_rng(0)
centres = rng.standard_normal((2000, dim)).astype(np.float32)
def part_vecs(b):
    if kind == "flat":  # the same random part each time (what the flat ledger does does not depend on values)
        return vecs0
    v = centres[rng.integers(0, 2000, rows)] + 0.5 * rng.standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)
vecs0 = rng.standard_normal((rows, dim)).astype(np.float32)
try:  # a checkout that maps the job's per-row state from files: the id keys and the plan as a new job has them
    import inspect
    from pathlib import Path
    from core.formats import Plan, PlanFile
    from core.rowfile import RowFile
    keys = RowFile.create(Path(root) / ".fbas" / "scan.id_hash.bin", np.uint64, n * rows).array
    keys[:] = id_hashes(ids)
    plan = PlanFile(Path(root) / ".fbas" / "plan.npz", n * rows)
    offsets = np.arange(0, n * rows + 1, rows)
    plan.add(Plan(np.arange(n * rows), offsets, np.full(n, 16, np.int32), np.full(n, 16 * rows)))
    ledger = PartLedger(out, "job", dim, kind, keys, n * rows, plan=plan)
except ImportError:
    ledger = PartLedger(out, "job", dim, kind, id_hashes(ids), n * rows)
write_s = ledger_s = 0.0
for b in range(n):
    r = np.arange(b * rows, (b + 1) * rows)
    vecs = part_vecs(b)
    t0 = time.perf_counter()
    write_batch(out, BatchOutput("job", b, "m", dim, "string", r, ids[b * rows : (b + 1) * rows], vecs,
                np.full(rows, 16, np.int32), np.zeros(rows, bool), np.zeros(rows, bool), np.zeros(0, np.int64), [], []))
    t1 = time.perf_counter()
    write_s += t1 - t0
    if b % 8 == 7:
        ledger.advance(b + 1)
    ledger_s += time.perf_counter() - t1
t0 = time.perf_counter()
getattr(ledger, "use_all_cores", lambda: None)()  # finalize's: the workers are done
assert ledger.advance(n) == n
if kind == "flat":
    ledger.commit_index()
elif hasattr(ledger.ivf, "write"):  # the index file written, as finalize does (SQ8 copies spilled or not)
    from pathlib import Path
    ledger.ivf.write(Path(root) / "index.faiss")
else:
    import faiss
    faiss.write_index(ledger.ivf.finish()[0], root + "/index.faiss")
tail = time.perf_counter() - t0
ledger_s += tail
shutil.rmtree(root, ignore_errors=True)
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"write_ms_per_part": 1000 * write_s / n, "ledger_ms_per_part": 1000 * ledger_s / n,
                  "last_step_s": tail, "peak_mb": peak}))
"""

IDS = r"""
import inspect, json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from core.config import CorpusConfig
from pipeline.ingest.plan import check_unique_ids, corpus_id_hashes
from pipeline.ingest.read import open_corpus
corpus = open_corpus(sys.argv[2], CorpusConfig())
to_file = "path" in inspect.signature(corpus_id_hashes).parameters  # the keys in the job's file, as ingest does
best = None
for _ in range(3):
    t0 = time.perf_counter()
    if to_file:
        check_unique_ids(corpus, corpus_id_hashes(corpus, Path(sys.argv[3]) / "ids.bin"), spill=Path(sys.argv[3]))
    else:
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
    ap.add_argument("--index", default="flat", choices=("flat", "ivfpq"), help="the index the ledger builds")
    ap.add_argument("--busy", type=int, default=0, help="other processes kept spinning meanwhile (workers' cores)")
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
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for r in range(args.rounds):
            for name, root in roots.items():
                got = run(LEDGER, str(root), str(args.parts), str(work / f"out-{name}-{r}"), args.index)
                got.update(run(IDS, str(root), str(corpus), str(work)))
                res[name].append(got)
                print(name, {k: round(v, 3) for k, v in got.items()}, flush=True)
    finally:
        for s in spin:
            s.kill()
    for key in ("ledger_ms_per_part", "last_step_s", "write_ms_per_part", "id_check_s"):
        base, this = (statistics.median(x[key] for x in res[k]) for k in ("baseline", "this"))
        print(f"{key}: baseline {base:.3f}, this checkout {this:.3f}, ratio {base / this:.2f}x")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
