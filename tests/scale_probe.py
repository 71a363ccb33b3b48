"""One step of a job at a given row count, in a fresh process, printing its peak resident memory (``VmHWM``).

    python -m tests.scale_probe corpus ROWS PATH      # a corpus of ROWS real sentences with distinct ids
    python -m tests.scale_probe produce PATH          # the producer's scan, plan and signed messages (not sent),
                                                      # then a resumed job's messages from the saved plan
    python -m tests.scale_probe parts PATH OUT        # the job's files and parts of 8-d vectors for the corpus
    python -m tests.scale_probe finalize OUT          # finalize (flat) of those, alone in a fresh process

``tests/integration/test_scale_memory.py`` runs each step at two row counts and checks that peak memory grows
by no more than the per-row bound the README states; the full 10 M-row run is ``benchmarks/bench_scale.py``.
"""

from __future__ import annotations

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


def reset_peak() -> None:
    """Reset this process's ``VmHWM`` to its current RSS (Linux: ``5`` to ``/proc/self/clear_refs``), so that the
    peak read next is a later step's own."""
    Path("/proc/self/clear_refs").write_text("5")


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
    """The producer's work for a new job, without a broker, as ``pipeline.ingest.stream`` does it: ids checked
    (their keys in the job's file), the corpus scanned in windows (lengths estimated, as the gpu target does),
    each window planned, its messages built and signed, then its lengths and plan written to the job's files;
    last, the scan and plan saved."""
    import tempfile

    import pyarrow as pa

    from core.config import FbasConfig
    from core.formats import Plan, PlanFile
    from core.layout import rows_file
    from core.tokenize import Tokenizer, tokenizer_json_for
    from engine.checkpoint import load_checkpoint
    from pipeline.ingest.plan import ScanBuilder, check_unique_ids, corpus_id_hashes, plan_window, scan_windows
    from pipeline.ingest.produce import batch_messages, window_messages
    from pipeline.ingest.read import open_corpus
    from workers.signing import sign

    cfg = FbasConfig()
    corpus = open_corpus(str(path), cfg.corpus)
    with tempfile.TemporaryDirectory(dir=path.parent) as d:
        scan_file, plan_file = Path(d) / "scan.npz", Path(d) / "plan.npz"
        id_hash = corpus_id_hashes(corpus, rows_file(scan_file, "id_hash"))
        check_unique_ids(corpus, id_hash, spill=Path(d))
        tok = Tokenizer(tokenizer_json_for(load_checkpoint(None).tokenizer), 256)
        builder, plans = ScanBuilder(corpus, rows_file(scan_file, "n_tokens")), PlanFile(plan_file, corpus.n_rows)
        rows = 0
        for w in scan_windows(corpus, tok, cfg.corpus.plan_window, first_rows=4096, estimate=True):
            plan = plan_window(w.n_tokens, w.row0, 65_536, 4096)
            for msg in window_messages(
                w, plan, plans.n_batches, job="J", out="/x", model="M", dim=DIM, id_type="int64"
            ):
                sign(msg, "key")
                rows += len(msg["row_ids"])
            builder.add(w)
            plans.add(plan)
        builder.scan(id_hash, estimated=True).save(scan_file)
        plans.plan().save(plan_file)
        peak = round(peak_mb(), 1)
        # a resumed job's sending: every batch again, from the saved plan, the corpus read once more; its peak from
        # what the scan left (Arrow's allocator gives back what it keeps for a while, so the start does not vary)
        pa.default_memory_pool().release_unused()
        reset_peak()
        resent = sum(
            len(m["row_ids"])
            for m in batch_messages(corpus, Plan.load(plan_file), job="J", out="/x", model="M", dim=DIM)
        )
        return {
            "rows": rows,
            "resent": resent,
            "batches": plans.n_batches,
            "peak_mb": peak,
            "resend_peak_mb": round(peak_mb(), 1),
        }


def write_parts(path: Path, out_dir: Path) -> None:
    """The job's files and parts of random 8-d vectors for every row of the corpus (batches of 4,096)."""
    import pyarrow.parquet as pq

    from core.formats import Plan, Scan
    from core.ids import id_hashes
    from core.layout import OutputDir
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


def finalize_alone(out_dir: Path) -> dict:
    """``finalize`` with a flat index, in a process that did nothing else."""
    from core.layout import OutputDir
    from output.finalize import finalize

    m = finalize(OutputDir(out_dir), "flat")
    return {"rows": m["counts"]["embedded"], "batches": m["counts"]["batches"], "peak_mb": round(peak_mb(), 1)}


def main(argv: list[str]) -> int:
    step = argv[0]
    if step == "corpus":
        write_corpus(int(argv[1]), Path(argv[2]))
        return 0
    if step == "parts":
        write_parts(Path(argv[1]), Path(argv[2]))
        return 0
    got = produce(Path(argv[1])) if step == "produce" else finalize_alone(Path(argv[1]))
    print(json.dumps(got))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
