"""Writers, finalize and its oracle, index types, search mapping and metrics, without services.

Parts are written with the workers' own writer (workers/write.py) from synthetic vectors, so
these tests exercise exactly the files a real job produces.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.errors import InputError
from core.formats import Scan
from core.ids import id_hashes
from core.layout import OutputDir
from output.check import IncompleteJobError, OracleError
from output.evaluate import evaluate_run, ndcg_at_k, recall_at_k
from output.finalize import finalize
from pipeline.ingest.plan import plan_batches
from workers.write import BatchOutput, write_batch

DIM = 16


def _job(tmp_path, n=300, quarantine_rows=(5, 77), batch_tokens=256, batch_rows=32):
    """An output folder with job.json, scan.npz, plan.npz for n rows (ids "r<i>"), nothing committed."""
    out = OutputDir(tmp_path / "out")
    out.make_dirs()
    rng = np.random.default_rng(0)
    n_tokens = rng.integers(3, 40, n).astype(np.int32)
    n_tokens[list(quarantine_rows)] = 0
    ids = [f"r{i}" for i in range(n)]
    import pyarrow as pa

    scan = Scan(
        n,
        n_tokens,
        id_hashes(pa.array(ids)),
        np.array(quarantine_rows, np.int64),
        [ids[r] for r in quarantine_rows],
        ["empty_text"] * len(quarantine_rows),
    )
    plan = plan_batches(n_tokens, batch_tokens, batch_rows)
    scan.save(out.state("scan.npz"))
    plan.save(out.state("plan.npz"))
    pq.write_table(
        pa.table({"row_id": pa.array(scan.q_rows, pa.int64()), "id": scan.q_ids, "reason": scan.q_reasons}),
        out.state("quarantine-scan.parquet"),
    )
    job = {
        "job": "J1",
        "n_batches": plan.n_batches,
        "planned_rows": plan.n_rows,
        "corpus": {"id_type": "string", "uri": "x"},
        "model": {"dim": DIM, "dir": ".fbas/model", "fingerprint": "M"},
    }
    out.state("job.json").write_text(json.dumps(job))
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return out, plan, ids, vectors


def _commit(out, plan, ids, vectors, b, job="J1", bad_rows=()):
    rows = plan.rows(b)
    ok = np.array([r not in bad_rows for r in rows])
    q = rows[~ok]
    write_batch(
        out,
        BatchOutput(
            job,
            b,
            "M",
            DIM,
            "string",
            rows[ok],
            [ids[r] for r in rows[ok]],
            vectors[rows[ok]],
            np.full(ok.sum(), 7, np.int32),
            np.zeros(ok.sum(), bool),
            np.zeros(ok.sum(), bool),
            q,
            [ids[r] for r in q],
            ["non_finite_output"] * len(q),
        ),
    )


def _dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_finalize_checks_the_oracle_and_writes_checksummed_outputs(tmp_path):
    out, plan, ids, vectors = _job(tmp_path)
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b, bad_rows=(plan.rows(0)[0],) if b == 0 else ())
    stale = f"part-000000.parquet.tmp-{socket.gethostname()}-{_dead_pid()}-abcd"  # a killed worker's
    (out.path("vectors") / stale).write_bytes(b"half a file")
    m = finalize(out, "flat")
    assert m["counts"]["input_rows"] == 300 and m["counts"]["quarantined"] == 3
    assert m["counts"]["embedded"] == 297 and m["index"]["ntotal"] == 297
    assert m["counts"]["quarantine_reasons"] == {"empty_text": 2, "non_finite_output": 1}
    assert not list(out.path("vectors").glob("*.tmp-*")), "temp files of dead writers are removed"
    q = pq.read_table(out.path("quarantine.parquet"))
    assert q.column("row_id").to_pylist() == sorted([5, 77, int(plan.rows(0)[0])])
    first = out.path("index.faiss").read_bytes()
    assert finalize(out, "flat")["index"]["sha256"] == m["index"]["sha256"]  # rerun: identical index
    assert out.path("index.faiss").read_bytes() == first


def test_missing_parts_and_stray_files_are_refused(tmp_path):
    out, plan, ids, vectors = _job(tmp_path)
    for b in range(1, plan.n_batches):
        _commit(out, plan, ids, vectors, b)
    with pytest.raises(IncompleteJobError) as e:
        finalize(out, "flat")
    assert e.value.missing == [0]
    _commit(out, plan, ids, vectors, 0, job="OTHER")  # a part with this name from another job
    with pytest.raises(InputError, match=r"not parts of this job.*part-000000.parquet \(from job OTHER\)"):
        finalize(out, "flat")
    _commit(out, plan, ids, vectors, 0)
    shutil.copy(out.vectors_part(1), out.path("vectors") / "part-999999.parquet")
    with pytest.raises(InputError, match="part-999999"):
        finalize(out, "flat")
    out.path("vectors/part-999999.parquet").unlink()
    finalize(out, "flat")


def _without_timings(m):
    return {k: v for k, v in m.items() if k not in ("timings", "created")}


def test_parts_checked_while_the_job_runs_give_the_same_outputs(tmp_path):
    """A ledger fed as parts commit (out of order, with gaps) stops at the first gap, and finalize with it
    writes exactly what finalize from scratch writes, reading only the parts it had not checked."""
    from output.ledger import PartLedger

    out, plan, ids, vectors = _job(tmp_path)
    n = plan.n_batches
    ledger = PartLedger(out, "J1", DIM, "flat", Scan.load(out.state("scan.npz")).id_hash)
    for b in (0, 1, 3):
        _commit(out, plan, ids, vectors, b, bad_rows=(plan.rows(0)[0],) if b == 0 else ())
    assert ledger.advance() == 2, "part 2 is not committed yet: the ledger waits for it"
    for b in range(2, n - 1):
        _commit(out, plan, ids, vectors, b)
    assert ledger.advance() == n - 1
    assert ledger.file.n == sum(len(plan.rows(b)) for b in range(n - 1)) - 1
    _commit(out, plan, ids, vectors, n - 1)
    ahead = finalize(out, "flat", ledger=ledger)
    assert ahead["timings"]["parts_checked_ahead"] == n - 1
    index_ahead = out.path("index.faiss").read_bytes()
    fresh = finalize(out, "flat")
    assert fresh["timings"]["parts_checked_ahead"] == 0
    assert _without_timings(ahead) == _without_timings(fresh)
    assert out.path("index.faiss").read_bytes() == index_ahead


def test_finalize_uses_the_scan_and_plan_ingest_holds_and_writes_the_same(tmp_path):
    """ingest passes finalize the scan and plan it saved (a job's plan keeps its row ids in 4 bytes), so that
    finalize does not hold a second copy; the outputs are those of a finalize that reads them from .fbas/."""
    from core.formats import Plan
    from output.ledger import PartLedger

    out, plan, ids, vectors = _job(tmp_path)
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b)
    held = Plan.concat([plan])
    assert held.order.dtype == np.int32 and np.array_equal(held.order, plan.order)
    held.save(out.state("plan.npz"))
    assert Plan.load(out.state("plan.npz")).order.dtype == np.int32
    scan = Scan.load(out.state("scan.npz"))
    fresh = finalize(out, "flat")
    index = out.path("index.faiss").read_bytes()
    ledger = PartLedger(out, "J1", DIM, "flat", scan.id_hash)
    given = finalize(out, "flat", ledger=ledger, state=(scan, held))
    assert _without_timings(given) == _without_timings(fresh)
    assert out.path("index.faiss").read_bytes() == index
    wrong = Plan(held.order, held.offsets[:-1], held.padded_len[:-1], held.tokens[:-1])
    with pytest.raises(InputError, match="does not match job.json"):
        finalize(out, "flat", state=(scan, wrong))


def test_a_part_replaced_after_it_was_checked_is_checked_again(tmp_path):
    """The ledger's record of a part is trusted only while the file is unchanged: a part swapped in behind
    it (here batch 2's file under batch 1's name) is refused, as without a ledger."""
    from output.ledger import LedgerFeeder, PartLedger

    out, plan, ids, vectors = _job(tmp_path)
    feeder = LedgerFeeder(PartLedger(out, "J1", DIM, "flat", Scan.load(out.state("scan.npz")).id_hash), interval=0.01)
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b)
    deadline = time.monotonic() + 30
    while feeder.ledger.next_batch < plan.n_batches and time.monotonic() < deadline:
        time.sleep(0.01)
    ledger = feeder.stop()
    assert ledger.next_batch == plan.n_batches, "the feeder thread checked every committed part"
    shutil.copy(out.vectors_part(2), out.path("vectors") / "swap.tmp")
    os.replace(out.path("vectors") / "swap.tmp", out.vectors_part(1))
    with pytest.raises(InputError, match=r"part-000001.parquet \(from job J1\)"):
        finalize(out, "flat", ledger=ledger)
    os.unlink(out.vectors_part(1))
    _commit(out, plan, ids, vectors, 1)
    m = finalize(out, "flat", ledger=ledger)  # the ledger started over when it saw the change
    assert m["timings"]["parts_checked_ahead"] == 0 and m["counts"]["embedded"] == 298
    # a part with its own batch's footer but other ids, swapped in behind a checked one: only the file's
    # key tells the difference, and the oracle must see the new ids
    ledger = PartLedger(out, "J1", DIM, "flat", Scan.load(out.state("scan.npz")).id_hash)
    assert ledger.advance() == plan.n_batches
    other = OutputDir(tmp_path / "elsewhere")
    other.make_dirs()
    wrong = list(ids)
    wrong[int(plan.rows(1)[0])] = "intruder"
    _commit(other, plan, wrong, vectors, 1)
    shutil.copy(other.vectors_part(1), out.path("vectors") / "swap.tmp")
    os.replace(out.path("vectors") / "swap.tmp", out.vectors_part(1))
    with pytest.raises(OracleError, match="ids differ from the corpus"):
        finalize(out, "flat", ledger=ledger)


def test_a_part_with_wrong_ids_fails_the_oracle(tmp_path):
    out, plan, ids, vectors = _job(tmp_path)
    wrong = list(ids)
    r = int(plan.rows(2)[0])
    wrong[r] = "intruder"
    for b in range(plan.n_batches):
        _commit(out, plan, wrong if b == 2 else ids, vectors, b)
    with pytest.raises(OracleError, match="unexpected 1"):
        finalize(out, "flat")
    assert not out.path("manifest.json").exists()
    assert not list(out.root.glob("index.faiss*")), "the index file finalize had written is removed"


@pytest.mark.parametrize("checked_by", ["finalize's ledger", "a ledger without the plan", "a ledger with the plan"])
def test_a_part_holding_another_batchs_row_fails_the_oracle(tmp_path, checked_by):
    """Batches 1 and 2 swap a row: every row is still there once, with its own id, so only the plan check can
    tell. The ledger checks each part against its batch as it reads it when it has the plan (ingest passes the
    plan being written); finalize checks the parts it did not."""
    from core.formats import Plan
    from output.ledger import PartLedger

    out, plan, ids, vectors = _job(tmp_path)
    swapped = Plan(plan.order.copy(), plan.offsets, plan.padded_len, plan.tokens)
    a, b = plan.offsets[1], plan.offsets[2]
    swapped.order[a], swapped.order[b] = plan.order[b], plan.order[a]
    for k in range(plan.n_batches):
        _commit(out, swapped, ids, vectors, k)
    ledger = None
    if checked_by != "finalize's ledger":
        scan = Scan.load(out.state("scan.npz"))
        ledger = PartLedger(out, "J1", DIM, "flat", scan.id_hash, plan=plan if "with" in checked_by else None)
        assert ledger.advance() == plan.n_batches
        held = [f.rows is None for f in ledger.facts]
        assert all(held) if "with" in checked_by else not any(held), "rows are kept only where not checked yet"
    with pytest.raises(
        OracleError, match=r"unexpected 2 \(part-000001.parquet: rows outside its planned batch; part-000002"
    ):
        finalize(out, "flat", ledger=ledger)
    assert not out.path("manifest.json").exists()


def test_a_ledger_reads_a_part_only_once_its_batch_is_planned_and_keeps_no_rows(tmp_path):
    """During a new job the plan is written window by window (``PlanFile``) while parts commit; on a rerun an
    earlier run's parts are all there before the first window is planned. The ledger reads a part only once its
    batch is planned, checks it against it, and keeps none of its rows."""
    from core.formats import Plan, PlanFile
    from output.ledger import PartLedger

    out, plan, ids, vectors = _job(tmp_path)
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b)
    k = plan.n_batches // 2
    cut = int(plan.offsets[k])
    first = Plan(plan.order[:cut], plan.offsets[: k + 1], plan.padded_len[:k], plan.tokens[:k])
    rest = Plan(plan.order[cut:], plan.offsets[k:] - cut, plan.padded_len[k:], plan.tokens[k:])
    written = PlanFile(tmp_path / "new-plan.npz", 300)
    ledger = PartLedger(out, "J1", DIM, "flat", Scan.load(out.state("scan.npz")).id_hash, plan=written)
    assert ledger.advance() == 0, "nothing planned yet: every committed part waits"
    written.add(first)
    assert ledger.advance() == k
    written.add(rest)
    assert ledger.advance() == plan.n_batches
    assert all(f.rows is None for f in ledger.facts) and not ledger.unexpected
    assert finalize(out, "flat", ledger=ledger)["counts"]["embedded"] == 298


def test_a_part_whose_plan_check_fails_midway_is_not_counted(tmp_path, monkeypatch):
    """The plan check comes before the part is counted or indexed: when it fails (here: reading the plan), the
    part is read again later and counted once."""
    from output.ledger import PartLedger

    out, plan, ids, vectors = _job(tmp_path)
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b)
    ledger = PartLedger(out, "J1", DIM, "flat", Scan.load(out.state("scan.npz")).id_hash, plan=plan)
    rows = plan.rows

    def failing(b):
        if b == 3:
            raise OSError("the plan's file cannot be read")
        return rows(b)

    monkeypatch.setattr(plan, "rows", failing)
    with pytest.raises(OSError, match="cannot be read"):
        ledger.advance()
    assert ledger.next_batch == 3 and int(ledger.counts.sum()) == int(plan.offsets[3])
    assert ledger.file.n == int(plan.offsets[3]), "part 3's vectors were not appended"
    monkeypatch.setattr(plan, "rows", rows)
    assert finalize(out, "flat", ledger=ledger)["counts"]["embedded"] == 298


def test_paths_stay_inside_the_output_folder(tmp_path):
    out = OutputDir(tmp_path / "o")
    with pytest.raises(InputError, match="leave the output folder"):
        out.path("../escape")
    with pytest.raises(InputError):
        out.path("/etc/passwd")
    with pytest.raises(ValueError):
        out.vectors_part(-1)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_find_the_exact_neighbour(tmp_path, kind):
    import faiss

    out, plan, ids, vectors = _job(tmp_path, n=3000, quarantine_rows=(1,))
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b)
    m = finalize(out, kind)
    assert m["index"]["type"] == kind and m["index"]["ntotal"] == 2999
    index = faiss.read_index(str(out.path("index.faiss")))
    if kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = m["index"]["params"]["nlist"]
    want = [10, 500, 2500]
    _, got = index.search(vectors[want], 20)
    found = [w in row for w, row in zip(want, got.tolist())]
    if kind == "hnsw":
        assert got[:, 0].tolist() == want
    else:  # product quantization of random 16-d vectors is coarse: the true neighbour is near the top
        assert sum(found) >= 2


def test_an_ivfpq_index_trains_and_fills_while_parts_commit_and_matches_one_built_at_finalize(tmp_path):
    """The ledger trains ivfpq on the first ``train_size`` vectors in batch order and adds each later part as
    it is read: fed part by part while a job runs, it writes the same index file as a finalize that reads
    every part at the end, and it holds no more than ``train_size`` vectors plus one part before training."""
    from output.ledger import PartLedger

    out, plan, ids, vectors = _job(tmp_path, n=45_000, quarantine_rows=(1,), batch_tokens=1 << 20, batch_rows=2048)
    ledger = PartLedger(out, "J1", DIM, "ivfpq", Scan.load(out.state("scan.npz")).id_hash)
    assert ledger.ivf is not None
    train_size, largest = ledger.ivf.params["train_size"], max(len(plan.rows(b)) for b in range(plan.n_batches))
    assert train_size < 44_999, "the job has vectors left to add after training"
    held = []
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b)
        ledger.advance()
        held.append(ledger.ivf._n_held)
    assert max(held) < train_size + largest and held[-1] == 0, "trained once train_size vectors came"
    assert ledger.ivf.index is not None and ledger.ivf.ntotal == 44_999
    assert not ledger.ivf.all_cores, "half the cores (at most 8) while the workers run"
    # the SQ8 copies are in a temp file beside the index file, not in memory
    spilled = list(out.root.glob("index.faiss.tmp-*"))
    assert len(spilled) == 1 and spilled[0].stat().st_size == 44_999 * DIM
    assert ledger.ivf._sq.codes.size() == 0 and ledger.ivf._sq.ntotal == 44_999
    ahead = finalize(out, "ivfpq", ledger=ledger)
    assert ahead["timings"]["parts_checked_ahead"] == plan.n_batches
    assert ledger.ivf.all_cores, "every core once finalize has the machine"
    assert ahead["timings"]["index_train_s"] > 0 and ahead["timings"]["index_add_s"] > 0
    assert ahead["timings"]["index_encode_s"] > 0, "the readers encoded the parts read after training"
    first = out.path("index.faiss").read_bytes()
    assert not list(out.root.glob("index.faiss.tmp-*")), "the spilled copies are gone once the index is written"
    again = finalize(out, "ivfpq")  # no ledger: every part read now
    assert again["index"]["sha256"] == ahead["index"]["sha256"] and again["index"]["params"]["trained_on"] == train_size
    assert out.path("index.faiss").read_bytes() == first
    # what search sets on the read index: the manifest's nprobe, and the re-ranking depth kept in the file
    import faiss

    from output.ivf_index import tune

    read = faiss.read_index(str(out.path("index.faiss")))
    tune(read, again["index"]["params"])
    assert faiss.extract_index_ivf(read).nprobe == again["index"]["params"]["nprobe"] >= 64
    assert faiss.downcast_index(read.index).k_factor == again["index"]["params"]["k_factor"] == 32
    _, got = read.search(vectors[[100, 30_000]], 1)
    assert got[:, 0].tolist() == [100, 30_000], "re-ranked by the SQ8 copies, the query's own row comes first"


def test_metrics_match_hand_computed_values():
    rels = {"d1": 2, "d2": 1, "d9": 1}
    ranked = ["d2", "x", "d1"]
    dcg = 1 / np.log2(2) + 2 / np.log2(4)
    idcg = 2 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4)
    assert ndcg_at_k(ranked, rels, 10) == pytest.approx(dcg / idcg)
    assert recall_at_k(ranked, rels, 100) == pytest.approx(2 / 3)
    assert ndcg_at_k(["d1", "d2", "d9"], rels) == pytest.approx(1.0)
    r = evaluate_run({"q1": ["d1"], "q2": ["z"]}, {"q1": {"d1": 1}, "q2": {"d5": 1}, "q3": {"d1": 1}})
    assert r == {"ndcg@10": 0.5, "recall@100": 0.5, "queries": 2}


def test_the_first_commit_of_a_batch_wins(tmp_path):
    import faiss

    out, plan, ids, vectors = _job(tmp_path)
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b)
    first = out.vectors_part(0).read_bytes()
    # a duplicate delivery with (slightly) different numbers changes nothing once the part is committed
    rows = plan.rows(0)
    dup = BatchOutput(
        "J1",
        0,
        "M",
        DIM,
        "string",
        rows,
        [ids[r] for r in rows],
        vectors[rows] * 0.5,
        np.full(len(rows), 7, np.int32),
        np.zeros(len(rows), bool),
        np.zeros(len(rows), bool),
        rows[:0],
        [],
        [],
    )
    assert write_batch(out, dup) is False
    assert out.vectors_part(0).read_bytes() == first
    # the index holds the committed part's vectors, not the duplicate's
    finalize(out, "flat")
    index = faiss.read_index(str(out.path("index.faiss")))
    got = index.index.reconstruct_n(0, len(rows))
    assert np.array_equal(got, vectors[rows])
    # a part of another job under our name is replaced by ours
    _commit(out, plan, ids, vectors, 1, job="OTHER")
    assert (
        write_batch(
            out,
            dup.__class__(
                **{
                    **dup.__dict__,
                    "batch": 1,
                    "row_ids": plan.rows(1),
                    "ids": [ids[r] for r in plan.rows(1)],
                    "vectors": vectors[plan.rows(1)],
                    "n_tokens": np.full(len(plan.rows(1)), 7, np.int32),
                    "truncated": np.zeros(len(plan.rows(1)), bool),
                    "repaired": np.zeros(len(plan.rows(1)), bool),
                }
            ),
        )
        is True
    )
    finalize(out, "flat")


def test_parts_are_read_ahead_on_threads_but_used_in_order():
    """finalize's read-ahead yields fn(0..n-1) in order however long each takes, and raises what fn raised."""
    import random
    import time as _time

    from output.ledger import in_order

    def slow(b):
        _time.sleep(random.random() * 0.003)
        return b * b

    assert list(in_order(slow, 50)) == [b * b for b in range(50)]

    def bad(b):
        if b == 7:
            raise ValueError("part 7 is unreadable")
        return b

    got = []
    with pytest.raises(ValueError, match="part 7"):
        for x in in_order(bad, 20):
            got.append(x)
    assert got == list(range(7))


def test_status_of_a_folder_whose_job_is_still_being_scanned(tmp_path):
    """Before job.json exists (it is written after the last window), status says so instead of 'no job'."""
    from output.status import job_status

    (tmp_path / "out" / ".fbas").mkdir(parents=True)
    (tmp_path / "out" / ".fbas" / "job.pending").write_text('{"job": "j1", "corpus": "c.parquet"}')
    lines = job_status(out=str(tmp_path / "out"), broker=None)["lines"]
    assert lines[0].startswith("job j1 in ") and "0 batches committed; its scan is running" in lines[0]
    (tmp_path / "empty").mkdir()
    assert job_status(out=str(tmp_path / "empty"), broker=None)["lines"] == [f"{tmp_path / 'empty'}: no fbas job here"]


# --- the flat index file written part by part (pipeline/flat_index.py) ------------------------------


@pytest.mark.parametrize("dim", [16, 384, 768])
def test_the_installed_faiss_writes_flat_indexes_in_the_layout_we_stream(dim):
    from output.flat_index import layout_matches

    assert layout_matches(dim), "FAISS changed its file layout: finalize would fall back to writing in memory"


@pytest.mark.parametrize("case", ["expected", "fewer than expected", "expected late", "never expected", "empty"])
def test_a_streamed_flat_index_is_byte_for_byte_what_faiss_writes(tmp_path, monkeypatch, case):
    """However the count the hash assumed turns out (right, wrong, known late, never known), the committed
    file is exactly FAISS's own file for the same vectors, its SHA-256 is the file's, and it is flushed to
    disk along the way (the periodic sync runs here every few parts). The ids are written at commit in blocks
    (here of 16), from parts kept in 4 bytes or, past 2**31, in 8."""
    import hashlib

    import faiss

    import output.flat_index as fi

    monkeypatch.setattr(fi, "SYNC_BYTES", 5000)
    monkeypatch.setattr(fi, "_ID_BLOCK", 16)
    rng = np.random.default_rng(1)
    sizes = [] if case == "empty" else [7, 0, 40, 13]
    chunks = [
        (rng.permutation(1000)[:k].astype(np.int64), rng.standard_normal((k, DIM)).astype(np.float32)) for k in sizes
    ]
    if chunks:
        chunks[3] = (chunks[3][0] + 2**40, chunks[3][1])  # row ids that need 8 bytes
    n = sum(sizes)
    f = fi.FlatIndexFile(tmp_path / "index.faiss", DIM)
    if case in ("expected", "empty"):
        f.expect(n)
    elif case == "fewer than expected":
        f.expect(n + 3)
    for i, (ids, vecs) in enumerate(chunks):
        f.add(ids, vecs)
        if case == "expected late" and i == 2:
            f.expect(n)
    digest = f.commit()
    want = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    for ids, vecs in chunks:
        want.add_with_ids(vecs, ids)
    data = (tmp_path / "index.faiss").read_bytes()
    assert data == faiss.serialize_index(want).tobytes()
    assert digest == hashlib.sha256(data).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"], "no temp file is left"
    if n:
        got = faiss.read_index(str(tmp_path / "index.faiss"))
        _, found = got.search(chunks[2][1][:1], 1)
        assert found[0, 0] == chunks[2][0][0]


def test_finalize_writes_the_same_flat_index_when_faiss_lays_it_out_otherwise(tmp_path, monkeypatch):
    """With a FAISS whose file layout is not the one we stream, the ledger only checks parts and finalize
    builds the flat index in memory: the same file either way."""
    import output.ledger as fin

    out, plan, ids, vectors = _job(tmp_path)
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b, bad_rows=(plan.rows(1)[2],) if b == 1 else ())
    streamed = finalize(out, "flat")
    data = out.path("index.faiss").read_bytes()
    monkeypatch.setattr(fin, "layout_matches", lambda dim: False)
    in_memory = finalize(out, "flat")
    assert out.path("index.faiss").read_bytes() == data
    assert in_memory["index"] == streamed["index"] and in_memory["counts"]["embedded"] == 297


def test_an_unfinished_index_file_is_never_left_behind(tmp_path):
    """A ledger's file is removed by ``discard`` (ingest's exit); a temp file left by a killed run stays
    through a finalize that fails and is removed by the next one that succeeds. (A finalize that fails after
    writing: test_a_part_with_wrong_ids_fails_the_oracle.)"""
    from output.ledger import PartLedger

    out, plan, ids, vectors = _job(tmp_path)
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b)
    ledger = PartLedger(out, "J1", DIM, "flat", Scan.load(out.state("scan.npz")).id_hash)
    assert ledger.advance() == plan.n_batches
    assert ledger.file is not None and ledger.file.tmp.exists()
    assert ledger.file.expected is None, "a job.json older than the ledger is an earlier attempt's: not trusted"
    os.close(ledger.file._fd)
    killed = ledger.file.tmp.with_name(f"index.faiss.tmp-{socket.gethostname()}-{_dead_pid()}-abcd")
    os.rename(ledger.file.tmp, killed)  # as if the process that wrote it had been killed: its temp file stays
    ledger.file = None
    os.unlink(out.vectors_part(3))
    with pytest.raises(IncompleteJobError):
        finalize(out, "flat")
    assert sorted(p.name for p in out.root.glob("index.faiss*")) == [killed.name]
    _commit(out, plan, ids, vectors, 3)
    ledger = PartLedger(out, "J1", DIM, "flat", Scan.load(out.state("scan.npz")).id_hash)
    ledger.advance()
    tmp = ledger.file.tmp
    ledger.discard()
    assert not tmp.exists()
    finalize(out, "flat")
    assert [p.name for p in out.root.glob("index.faiss*")] == ["index.faiss"]


def test_an_append_that_fails_midway_is_redone_cleanly(tmp_path, monkeypatch):
    """A write that fails halfway through a part (disk full, say), or a sync that fails after it, counts
    nothing of that part: the ledger reads it again and the index is byte for byte the one a clean run writes,
    with no row counted twice."""
    import output.flat_index as fi
    from output.ledger import PartLedger

    out, plan, ids, vectors = _job(tmp_path)
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b)
    clean = finalize(out, "flat")
    want = out.path("index.faiss").read_bytes()

    real_pwrite, real_sync = os.pwrite, os.fdatasync
    faults = {"pwrite": 1, "sync": 1}

    def half_then_fail(fd, data, offset):
        if faults["pwrite"] and len(data) > 64:
            faults["pwrite"] -= 1
            real_pwrite(fd, memoryview(data)[: len(data) // 2], offset)
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    def sync_fails_once(fd):
        if faults["sync"]:
            faults["sync"] -= 1
            raise OSError(5, "Input/output error")
        return real_sync(fd)

    monkeypatch.setattr(fi.os, "pwrite", half_then_fail)
    monkeypatch.setattr(fi.os, "fdatasync", sync_fails_once)
    monkeypatch.setattr(fi, "_SYNC_RANGE", None)  # the write-back's own failure: the next test
    monkeypatch.setattr(fi, "SYNC_BYTES", 2000)
    ledger = PartLedger(out, "J1", DIM, "flat", Scan.load(out.state("scan.npz")).id_hash, plan.n_rows)
    for _ in range(2):
        with pytest.raises(OSError):
            ledger.advance()
    assert faults == {"pwrite": 0, "sync": 0}
    assert ledger.advance() == plan.n_batches
    m = finalize(out, "flat", ledger=ledger)
    assert out.path("index.faiss").read_bytes() == want
    assert m["index"]["sha256"] == clean["index"]["sha256"] and m["counts"] == clean["counts"]


def test_a_failed_write_back_starts_the_index_file_over(tmp_path, monkeypatch):
    """The index file is written back to disk window by window while later parts are appended
    (``sync_file_range``): an I/O error there may have lost bytes of parts counted already, so the ledger
    starts the file over from the first part, and the index is byte for byte a clean run's."""
    import ctypes

    import output.flat_index as fi
    from output.ledger import PartLedger

    out, plan, ids, vectors = _job(tmp_path)
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b)
    clean = finalize(out, "flat")
    want = out.path("index.faiss").read_bytes()
    real = fi._SYNC_RANGE
    if real is None:
        pytest.skip("no sync_file_range on this platform: the fdatasync path is the test above")
    calls = {"n": 0, "failed": 0}

    def fails_on_second_wait(fd, offset, length, flags):
        calls["n"] += 1
        if flags == fi._WAIT_ALL and calls["n"] >= 4 and not calls["failed"]:
            calls["failed"] = 1
            ctypes.set_errno(5)
            return -1
        return real(fd, offset, length, flags)

    monkeypatch.setattr(fi, "_SYNC_RANGE", fails_on_second_wait)
    monkeypatch.setattr(fi, "SYNC_BYTES", 2000)
    ledger = PartLedger(out, "J1", DIM, "flat", Scan.load(out.state("scan.npz")).id_hash, plan.n_rows)
    with pytest.raises(OSError, match="Input/output error"):
        ledger.advance()
    assert calls["failed"] == 1 and ledger.next_batch == 0  # started over
    assert ledger.advance() == plan.n_batches
    m = finalize(out, "flat", ledger=ledger)
    assert out.path("index.faiss").read_bytes() == want
    assert m["index"]["sha256"] == clean["index"]["sha256"] and m["counts"] == clean["counts"]


class _RowsIndex:
    """A stand-in FAISS index: every query's neighbours are rows 0, 1, 2, ... with falling scores; it records
    how many rows each search asked for."""

    def __init__(self, ntotal: int) -> None:
        self.ntotal, self.asked = ntotal, []

    def search(self, x, k):
        self.asked.append(k)
        rows = np.tile(np.arange(min(k, self.ntotal), dtype=np.int64), (len(x), 1))
        return -rows.astype(np.float32), rows


def _chunked_searcher(doc_of: np.ndarray):
    import pyarrow as pa

    from output.search import Searcher

    s = Searcher.__new__(Searcher)
    s.index, s.chunked = _RowsIndex(len(doc_of)), True
    s._row_ids = np.arange(len(doc_of), dtype=np.int64)
    s._ids = pa.array([f"d{d}" for d in doc_of.tolist()])
    chunk = np.zeros(len(doc_of), np.int64)
    for d in np.unique(doc_of):
        at = np.flatnonzero(doc_of == d)
        chunk[at] = np.arange(len(at))
    zeros = np.zeros(len(doc_of), np.int64)
    s._chunks = {"doc_row": doc_of, "chunk": chunk, "tok_start": zeros, "tok_end": zeros}
    s._chunks |= {"char_start": zeros, "char_end": zeros}
    return s


def test_search_by_doc_never_asks_for_the_whole_index(monkeypatch):
    """k more than the documents: the rows fetched stop at MAX_DOC_FETCH (not ntotal) and what was found is
    returned; k documents are found within k * (most chunks per document) rows."""
    import output.search as search

    s = _chunked_searcher(np.arange(1000, dtype=np.int64) // 100)  # 10 documents of 100 chunks, one after another
    hits = s.search_vectors(np.zeros((1, DIM), np.float32), k=3)
    assert [h.id for h in hits[0]] == ["d0", "d1", "d2"] and max(s.index.asked) == 300
    s = _chunked_searcher(np.arange(1000, dtype=np.int64) % 10)  # 10 documents of 100 chunks, interleaved
    monkeypatch.setattr(search, "MAX_DOC_FETCH", 100)
    hits = s.search_vectors(np.zeros((2, DIM), np.float32), k=20)
    assert [len(h) for h in hits] == [10, 10] and max(s.index.asked) == 100


def test_ivfpq_settings_a_benchmark_can_weigh_follow_from_the_list_count():
    """``index_params(nlist=)`` recomputes what follows from the lists (an eighth searched, 50 training vectors
    a list), and ``pq_train_points`` bounds the sub-quantizers' training set."""
    import faiss

    from output.ivf_index import index_params, new_ivfpq

    default, more = index_params("ivfpq", 10_000_000, 384), index_params("ivfpq", 10_000_000, 384, nlist=3162)
    assert (default["nlist"], default["nprobe"], default["train_size"]) == (1000, 125, 50_000), "at most 1,000 lists"
    assert (more["nlist"], more["nprobe"], more["train_size"]) == (3162, 395, 158_100)
    assert index_params("ivfpq", 250_000, 384)["nlist"] == 500, "sqrt(n) below the cap"
    plain = {k: v for k, v in default.items() if k != "pq_train_points"}
    bounded, unbounded = new_ivfpq(384, default), new_ivfpq(384, plain)  # kept alive: the inner indexes below
    # belong to them
    assert faiss.downcast_index(faiss.extract_index_ivf(bounded)).pq.cp.max_points_per_centroid == 64
    assert faiss.downcast_index(faiss.extract_index_ivf(unbounded)).pq.cp.max_points_per_centroid == 256


@pytest.mark.parametrize("spill", [0, 1, 2], ids=["in-memory", "sq8-spilled", "spilled-no-copy_file_range"])
def test_ivfpq_codes_encoded_on_reader_threads_give_the_file_add_with_ids_gives(tmp_path, monkeypatch, spill):
    """The builder appends FAISS standalone codes: parts encoded on other threads (``prepare``), parts read
    before training (vectors), a part encoded by an earlier training's codec (encoded again) and one empty part
    all end in the bytes that ``IndexIDMap.add_with_ids`` writes from the same vectors in the same order, also
    when the SQ8 copies were spilled to a file beside the index (then put back into it by ``write``, in the
    kernel or, where the file system refuses ``copy_file_range``, read and written)."""
    import errno
    import os
    from concurrent.futures import ThreadPoolExecutor

    import faiss

    if spill == 2:

        def refused(*args):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refused)

    from output.ivf_index import IvfPqBuilder, index_params, new_ivfpq

    rng = np.random.default_rng(7)
    centres = rng.standard_normal((64, 32)).astype(np.float32)
    x = centres[rng.integers(0, 64, 30_000)] + 0.3 * rng.standard_normal((30_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.permutation(30_000).astype(np.int64) * 7_919 + 13  # row ids, not positions
    p = index_params("ivfpq", len(x), 32)
    want = new_ivfpq(32, p)
    want.train(x[: p["train_size"]])
    want.add_with_ids(x, ids)

    stale = IvfPqBuilder(32, p)  # another training: its codes must not be appended as they are
    stale.add(ids[: p["train_size"]] + 1, x[::-1][: p["train_size"]].copy())
    assert stale.codec is not None
    b = IvfPqBuilder(32, p, beside=tmp_path / "index.faiss" if spill else None)
    cuts = list(range(0, len(x), 700)) + [len(x)]
    parts = [(ids[lo:hi], x[lo:hi]) for lo, hi in zip(cuts, cuts[1:])]
    parts.insert(20, (ids[:0], x[:0]))
    with ThreadPoolExecutor(3) as pool:
        prepared = [pool.submit(b.prepare, r, v) for r, v in parts[:14]]  # before training: vectors come back
        for f in prepared:
            b.add_part(f.result())
        assert b.codec is None and b.ntotal == 14 * 700
        b.add_part(b.prepare(*parts[14]))  # the vectors train_size needed: trained, then every held one added
        assert b.codec is not None and b.ntotal == 15 * 700
        later = [pool.submit(b.prepare, r, v) for r, v in parts[15:]]
        for i, f in enumerate(later):
            part = f.result()
            assert part.codes is not None or not len(part.rows)
            if i == 10:
                part = stale.prepare(part.rows, parts[15 + i][1])
            b.add_part(part)
    assert b.ntotal == len(x) and b.encode_s > 0 and b.params["trained_on"] == p["train_size"]
    assert len(list(tmp_path.glob("index.faiss.tmp-*"))) == int(spill > 0)
    if not spill:
        assert np.array_equal(faiss.serialize_index(b.finish()[0]), faiss.serialize_index(want))
    b.write(tmp_path / "built.faiss")
    assert (tmp_path / "built.faiss").read_bytes() == faiss.serialize_index(want).tobytes()
    b.write(tmp_path / "again.faiss")  # a write that failed later (its hash, its rename) can be done again
    assert (tmp_path / "again.faiss").read_bytes() == (tmp_path / "built.faiss").read_bytes()
    b.discard()
    assert not list(tmp_path.glob("index.faiss.tmp-*")), "the spilled file goes with the builder"
    with pytest.raises(RuntimeError, match="discarded"):
        b.write(tmp_path / "late.faiss")
    got = faiss.read_index(str(tmp_path / "built.faiss"))
    _, hits = got.search(x[:5], 1)
    assert hits[:, 0].tolist() == ids[:5].tolist()


def test_spilled_sq8_codes_are_removed_when_a_ledger_closes_or_starts_over_and_refuse_a_foreign_file(tmp_path):
    """A job that stops before finalize (the ledger closed) or a ledger that starts over leaves no spilled file;
    ``insert_into`` refuses a file whose end is not the layout it knows, rather than writing a wrong index."""
    import faiss

    from output.ivf_index import SpilledCodes
    from output.ledger import PartLedger

    out, plan, ids, vectors = _job(tmp_path, n=12_000, batch_tokens=1 << 20, batch_rows=2048)
    scan = Scan.load(out.state("scan.npz"))
    ledger = PartLedger(out, "J1", DIM, "ivfpq", scan.id_hash)
    for b in range(plan.n_batches):
        _commit(out, plan, ids, vectors, b)
    ledger.advance()
    assert ledger.ivf is not None and ledger.ivf.index is not None, "trained: its copies spilled"
    first = list(out.root.glob("index.faiss.tmp-*"))
    assert len(first) == 1
    ledger._start()  # what revalidate does when a part changed
    assert not first[0].exists()
    ledger.advance()
    assert len(list(out.root.glob("index.faiss.tmp-*"))) == 1
    ledger.close()
    assert not list(out.root.glob("index.faiss.tmp-*"))

    flat = faiss.IndexIDMap(faiss.IndexFlatIP(DIM))
    flat.add_with_ids(vectors[:10].astype(np.float32), np.arange(10, dtype=np.int64))
    faiss.write_index(flat, str(tmp_path / "flat.faiss"))
    before = (tmp_path / "flat.faiss").read_bytes()
    spilled = SpilledCodes(tmp_path / "codes.tmp", DIM)
    spilled.append(0, np.zeros((10, DIM), np.uint8))
    with pytest.raises(RuntimeError, match="not the file layout"):
        spilled.insert_into(tmp_path / "flat.faiss", 10)
    spilled.discard()
    assert (tmp_path / "flat.faiss").read_bytes() == before and not (tmp_path / "codes.tmp").exists()


def test_ivfpq_training_that_fails_midway_changes_nothing_and_a_failed_write_back_starts_the_index_over(
    tmp_path, monkeypatch
):
    """Disk full while the held vectors' copies are spilled: the part that triggered training is not counted,
    the held vectors stay held and no spilled file is left, so the same part again gives the right index. A
    write-back of the copies that fails (``sync_file_range``) makes the ledger build its index again from the
    first part, as it does for a flat index file; finalize then writes the index a clean run writes."""
    import errno

    import faiss

    import output.ivf_index as iv
    from output.ledger import PartLedger

    rng = np.random.default_rng(3)
    x = rng.standard_normal((12_000, 32)).astype(np.float32)
    ids = np.arange(12_000, dtype=np.int64) * 3
    p = iv.index_params("ivfpq", len(x), 32)
    want = iv.new_ivfpq(32, p)
    want.train(x[: p["train_size"]])
    want.add_with_ids(x, ids)
    # the layout check spills too: it runs (and is cached) before the fault is injected, or the fault hits it
    assert iv.spill_layout_matches(32), "this FAISS writes spilled copies where FAISS keeps them"
    real_append, calls = iv.SpilledCodes.append, {"n": 0}

    def full_once(self, at, codes):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, at, codes)

    monkeypatch.setattr(iv.SpilledCodes, "append", full_once)
    b = iv.IvfPqBuilder(32, p, beside=tmp_path / "index.faiss")
    parts = [(ids[lo : lo + 1000], x[lo : lo + 1000]) for lo in range(0, len(x), 1000)]
    trigger = next(i for i in range(len(parts)) if 1000 * (i + 1) >= p["train_size"])
    for r, v in parts[:trigger]:
        b.add(r, v)
    with pytest.raises(OSError):
        b.add(*parts[trigger])
    assert b.index is None and b.codec is None and b.ntotal == 1000 * trigger
    assert not list(tmp_path.glob("index.faiss.tmp-*"))
    for r, v in parts[trigger:]:
        b.add(r, v)
    b.write(tmp_path / "built.faiss")
    b.discard()
    assert (tmp_path / "built.faiss").read_bytes() == faiss.serialize_index(want).tobytes()
    monkeypatch.setattr(iv.SpilledCodes, "append", real_append)

    out, plan, row_ids, vectors = _job(tmp_path / "job", n=12_000, batch_tokens=1 << 20, batch_rows=1024)
    scan = Scan.load(out.state("scan.npz"))
    for b_ in range(plan.n_batches):
        _commit(out, plan, row_ids, vectors, b_)
    clean = finalize(out, "ivfpq")
    clean_bytes = out.path("index.faiss").read_bytes()
    out.path("index.faiss").unlink()
    out.path("manifest.json").unlink()

    monkeypatch.setattr(iv, "SYNC_BYTES", 4096)  # a write-back every part
    real_back, backs = iv.write_back, {"n": 0}

    def fails_once(fd, written, flushing, end):
        backs["n"] += 1
        if backs["n"] == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real_back(fd, written, flushing, end)

    monkeypatch.setattr(iv, "write_back", fails_once)
    ledger = PartLedger(out, clean["job"], DIM, "ivfpq", scan.id_hash)
    with pytest.raises(OSError):
        ledger.advance()
    assert ledger.next_batch == 0 and ledger.ivf is not None and ledger.ivf.index is None, "started over"
    assert not list(out.root.glob("index.faiss.tmp-*"))
    again = finalize(out, "ivfpq", ledger=ledger)
    assert backs["n"] > 3 and again["index"]["sha256"] == clean["index"]["sha256"]
    assert out.path("index.faiss").read_bytes() == clean_bytes
    assert not list(out.root.glob("index.faiss.tmp-*"))


def test_faiss_blas_kernel_follows_the_cpu_and_leaves_a_users_choice():
    from core.envs import faiss_blas_kernel

    avx512 = {"sse3", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
    assert faiss_blas_kernel(avx512, {}) == "SkylakeX"
    assert faiss_blas_kernel({"sse3", "avx2", "fma", "avx512f"}, {}) == "Haswell", "AVX-512 F alone is not enough"
    assert faiss_blas_kernel({"sse3", "avx2"}, {}) is None, "no FMA: OpenBLAS's own choice"
    assert faiss_blas_kernel(avx512, {"OPENBLAS_CORETYPE": "Zen"}) is None, "set by the user: kept"


def test_faiss_loads_the_openblas_kernel_output_chose(tmp_path):
    """In a fresh process, importing ``output`` before FAISS makes FAISS's bundled OpenBLAS use the kernel chosen
    for this CPU (left to itself, it falls back to 2004's kernels on CPUs it predates, NOTES 4o)."""
    from core.envs import cpu_flags, faiss_blas_kernel

    want = faiss_blas_kernel(cpu_flags(), {})
    if want is None:
        pytest.skip("this CPU has neither AVX-512 nor AVX2: OpenBLAS keeps its own choice")
    code = (
        "import ctypes, glob, os, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "os.environ.pop('OPENBLAS_CORETYPE', None)\n"
        "import output, faiss\n"
        "libs = glob.glob(os.path.join(os.path.dirname(faiss.__file__), '..', 'faiss_cpu.libs', '*openblas*'))\n"
        "if not libs:\n"
        "    print('no-openblas'); sys.exit(0)\n"
        "ob = ctypes.CDLL(libs[0]); ob.openblas_get_corename.restype = ctypes.c_char_p\n"
        "print(ob.openblas_get_corename().decode())\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    got = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, check=True)
    core = got.stdout.strip().splitlines()[-1]
    if core == "no-openblas":
        pytest.skip("this FAISS build does not bundle OpenBLAS")
    assert core == want


@pytest.mark.parametrize("beside", [False, True], ids=["ids-held", "ids-in-a-file"])
def test_an_ivfpq_index_completed_twice_holds_every_row_id_once_in_order(tmp_path, monkeypatch, beside):
    """The builder keeps the row ids of the parts it appended (in memory, 4 bytes each, or beside the index in a
    file without a name, read back 700 at a time here) and puts them into the IndexIDMap's own vector when the
    index is needed; doing that midway and again at the end gives the file FAISS writes for the same training
    and adds."""
    import faiss

    import output.ivf_index as iv

    monkeypatch.setattr(iv, "_ID_BLOCK", 700)

    rng = np.random.default_rng(5)
    x = rng.standard_normal((6000, 32)).astype(np.float32)
    ids = np.arange(6000, dtype=np.int64) * 5 + 3
    p = iv.index_params("ivfpq", len(x), 32)
    b = iv.IvfPqBuilder(32, p, beside=tmp_path / "index.faiss" if beside else None)
    for lo in range(0, 3000, 1000):
        b.add(ids[lo : lo + 1000], x[lo : lo + 1000])
    assert np.array_equal(faiss.vector_to_array(b._complete().id_map), ids[:3000])  # trains on what it holds
    if beside:  # a part whose ids cannot be written (a full disk) is not counted, and can be added again
        real = iv.pwrite_all

        def full(fd, data, offset):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(iv, "pwrite_all", full)
        with pytest.raises(OSError, match="No space"):
            b.add(ids[3000:4000], x[3000:4000])
        assert b.ntotal == 3000
        monkeypatch.setattr(iv, "pwrite_all", real)
    b.add(ids[3000:4000], x[3000:4000])
    b.add(ids[4000:5000], x[4000:5000])
    assert len(b._ids) == (0 if beside else 2), "with a place beside the index, no id is held in memory"
    b.add(ids[5000:], x[5000:])
    b.write(tmp_path / "built.faiss")
    want = iv.new_ivfpq(32, p)
    want.train(x[:3000])
    want.add_with_ids(x, ids)
    assert (tmp_path / "built.faiss").read_bytes() == faiss.serialize_index(want).tobytes()
