"""Cost of `ingest --update` against a fresh ingest: a corpus of which a share of rows changed.

Same machine, same run: a fresh local-mode ``ingest`` of a corpus of ``--rows`` rows (every distinct STS-B
sentence, cycled, each row with its own id and a row number in its text so that no two texts are equal), then
``ingest --update`` of the same corpus with ``--changed`` of its rows' texts changed (spread evenly), into the
folder of a first ``--update`` ingest. Wall time of each call in-process, services started inside it (local
mode), as a nightly job would run them; the ratio is update / fresh.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_update.py --rows 100000 --changed 0.01 --json out/bench_update.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sentences() -> list[str]:
    out: list[str] = []
    for split in ("test", "dev"):
        with open(ROOT / "tests/data/stsb_multi_mt" / f"stsb-en-{split}.csv", encoding="utf-8", newline="") as f:
            for r in csv.reader(f):
                out += [r[0], r[1]]
    return list(dict.fromkeys(out))


def write(path: Path, texts: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(texts))], "text": texts}), path, row_group_size=65536)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--changed", type=float, default=0.01, help="share of rows whose text changes")
    ap.add_argument("--precision", default=None, help="engine precision of every run (default: the ingest's)")
    ap.add_argument(
        "--no-fresh",
        action="store_true",
        help="time the first --update (a full ingest into an empty folder, plus hashing) as the fresh ingest "
        "instead of running a separate one (halves a large run; the reference is then slightly slower)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    from core.config import FbasConfig
    from pipeline.ingest.run import ingest

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-update-"))
    work.mkdir(parents=True, exist_ok=True)
    base = sentences()
    texts = [f"{base[i % len(base)]} ({i})" for i in range(args.rows)]
    v1, v2 = work / "v1.parquet", work / "v2.parquet"
    write(v1, texts)
    step = max(1, round(1 / args.changed)) if args.changed else 0
    changed = list(range(0, args.rows, step)) if step else []
    for i in changed:
        texts[i] = "Revised: " + texts[i]
    write(v2, texts)

    def run(corpus: Path, out: Path, update: bool) -> tuple[float, dict]:
        cfg = FbasConfig()
        cfg.output.out, cfg.output.update = str(out), update
        if args.precision:
            cfg.engine.precision = args.precision
        t0 = time.perf_counter()
        r = ingest(str(corpus), cfg, progress=False)
        return time.perf_counter() - t0, r.manifest

    fresh_s = 0.0 if args.no_fresh else run(v2, work / "fresh", False)[0]
    first_s, _ = run(v1, work / "updated", True)
    fresh_s = fresh_s or first_s
    update_s, m = run(v2, work / "updated", True)
    result = {
        "rows": args.rows,
        "changed": len(changed),
        "fresh_s": round(fresh_s, 2),
        "fresh_is_first_update": args.no_fresh,
        "precision": args.precision or "default",
        "first_update_s": round(first_s, 2),
        "update_s": round(update_s, 2),
        "ratio": round(update_s / fresh_s, 4),
        "generation": m["generations"][-1],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
