"""One step of a job at a given row count, in a fresh process, printing its peak resident memory (``VmHWM``).

    python -m tests.scale_probe corpus ROWS PATH      # a corpus of ROWS real sentences with distinct ids
    python -m tests.scale_probe produce PATH          # the producer's scan, plan and signed messages (not sent)
    python -m tests.scale_probe finalize PATH OUT     # parts of 8-d vectors for the corpus, then finalize

``tests/integration/test_scale_memory.py`` runs each step at two row counts and checks that peak memory grows
by no more than the per-row bound the README states; the full 10 M-row run is ``benchmarks/bench_scale.py``.
"""

from __future__ import annotations

import gc
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
DIM = 8


def peak_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def reset_peak() -> float:
    """Reset this process's ``VmHWM`` to its current RSS (Linux: ``5`` to ``/proc/self/clear_refs``), so that the
    peak read next is a later step's own; returns the RSS it starts from, in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return peak_mb()


def write_corpus(rows: int, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import read_stsb_multi

    sentences: dict[str, None] = {}
    for p in sorted((DATA / "stsb_multi_mt").glob("stsb-en-*.csv")):
        for a, b, _ in read_stsb_multi(p):
            sentences.update(dict.fromkeys((a, b)))
    texts = [s for s in sentences if s.strip()]
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, 65_536):
            n = min(65_536, rows - start)
            col = [texts[(start + i) % len(texts)] for i in range(n)]
            w.write_table(pa.table({"id": pa.array(range(start, start + n), pa.int64()), "text": col}, schema))


def produce(path: Path) -> dict:
    """The producer's work for a new job, without a broker: ids checked, the corpus scanned in windows (lengths
    estimated, as the gpu target does), each window planned and its messages built and signed."""
    from core.config import FbasConfig
    from core.tokenize import Tokenizer, tokenizer_json_for
    from engine.checkpoint import load_checkpoint
    from pipeline.ingest.plan import check_unique_ids, corpus_id_hashes, plan_window, scan_windows
    from pipeline.ingest.produce import window_messages
    from pipeline.ingest.read import open_corpus
    from workers.signing import sign

    cfg = FbasConfig()
    corpus = open_corpus(str(path), cfg.corpus)
    id_hash = corpus_id_hashes(corpus)
    check_unique_ids(corpus, id_hash)
    tok = Tokenizer(tokenizer_json_for(load_checkpoint(None).tokenizer), 256)
    rows = batches = 0
    kept = []
    for w in scan_windows(corpus, tok, cfg.corpus.plan_window, first_rows=4096, estimate=True):
        plan = plan_window(w.n_tokens, w.row0, 65_536, 4096)
        for msg in window_messages(w, plan, batches, job="J", out="/x", model="M", dim=DIM, id_type="int64"):
            sign(msg, "key")
            rows += len(msg["row_ids"])
        batches += plan.n_batches
        w.ids, w.texts = [], []  # as the ingest does once a window is sent
        kept.append((w, plan))  # as the ingest keeps them for the job's files
    return {"rows": rows, "batches": batches, "peak_mb": round(peak_mb(), 1)}


def finalize_parts(path: Path, out_dir: Path) -> dict:
    """Parts of random 8-d vectors for every row of the corpus (batches of 4,096), the job's files, then
    ``finalize`` with a flat index."""
    import pyarrow.parquet as pq

    from core.formats import Plan, Scan
    from core.ids import id_hashes
    from core.layout import OutputDir
    from output.finalize import finalize
    from workers.write import BatchOutput, write_batch

    ids = pq.read_table(path, columns=["id"]).column("id")
    n = len(ids)
    out = OutputDir(out_dir)
    out.make_dirs()
    n_tokens = np.full(n, 12, np.int32)
    scan = Scan(n, n_tokens, id_hashes(ids), np.zeros(0, np.int64), [], [])
    offsets = np.unique(np.r_[np.arange(0, n, 4096), n]).astype(np.int64)
    sizes = np.diff(offsets)
    plan = Plan(np.arange(n, dtype=np.int64), offsets, np.full(len(sizes), 12, np.int32), sizes * 12)
    scan.save(out.state("scan.npz"))
    plan.save(out.state("plan.npz"))
    job = {
        "job": "J",
        "n_batches": plan.n_batches,
        "planned_rows": n,
        "corpus": {"id_type": "int64", "uri": str(path)},
        "model": {"dim": DIM, "dir": ".fbas/model", "fingerprint": "M"},
    }
    out.state("job.json").write_text(json.dumps(job))
    rng = np.random.default_rng(0)
    for b in range(plan.n_batches):
        rows = plan.rows(b)
        k = len(rows)
        vecs = rng.standard_normal((k, DIM)).astype(np.float32)
        write_batch(
            out,
            BatchOutput(
                "J",
                b,
                "M",
                DIM,
                "int64",
                rows,
                rows.tolist(),
                vecs,
                n_tokens[rows],
                np.zeros(k, bool),
                np.zeros(k, bool),
                rows[:0],
                [],
                [],
            ),
        )
    n_batches, before = plan.n_batches, peak_mb()
    # finalize reads the job's files itself: the probe's own copies go first, so the peak is finalize's
    del ids, scan, plan, n_tokens, offsets, sizes, rows, vecs
    gc.collect()
    start = reset_peak()
    m = finalize(out, "flat")
    return {
        "rows": m["counts"]["embedded"],
        "batches": n_batches,
        "peak_mb": round(peak_mb(), 1),
        "rss_at_finalize_mb": round(start, 1),
        "probe_peak_before_finalize_mb": round(before, 1),
    }


def main(argv: list[str]) -> int:
    step = argv[0]
    if step == "corpus":
        write_corpus(int(argv[1]), Path(argv[2]))
        return 0
    got = produce(Path(argv[1])) if step == "produce" else finalize_parts(Path(argv[1]), Path(argv[2]))
    print(json.dumps(got))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
