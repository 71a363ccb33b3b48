"""Per-row arrays in files (``core.rowfile``), the duplicate-id check that spills to bucket files, and the plan a
new job writes window by window (``core.formats.PlanFile``): what keeps a job's memory from growing with its rows.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from core.formats import Plan, PlanFile, Scan
from core.layout import rows_file
from core.rowfile import RowFile, backing, blocks, equal, release, store


def _rss_file_mb() -> float:
    """This process's resident pages mapped from files (on tmpfs: shared memory), in MB."""
    status = Path("/proc/self/status").read_text()
    return sum(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("RssFile", "RssShmem")) / 1024  # type: ignore[union-attr]


def test_a_row_file_holds_its_rows_on_disk_and_hands_its_pages_back(tmp_path):
    n = 8 << 20  # 64 MB of uint64
    a = RowFile.create(tmp_path / "keys.bin", np.uint64, n)
    assert backing(a.array) is not None and backing(np.zeros(3)) is None
    before = _rss_file_mb()
    a.array[:] = np.arange(n, dtype=np.uint64)  # every page touched
    assert _rss_file_mb() - before > 48, "the written pages are mapped into the process"
    release(a.array)
    assert _rss_file_mb() - before < 8, "release() unmaps them"
    b = RowFile.open(tmp_path / "keys.bin", np.uint64, n)
    assert b.array[12345] == 12345 and b.array[-1] == n - 1, "the data stayed in the file"
    assert not b.array.flags.writeable
    with pytest.raises(ValueError, match="holds"):
        RowFile.open(tmp_path / "keys.bin", np.uint64, n + 1)
    # a walk block by block holds one block at a time
    total = 0
    for _, block in blocks(b.array, 4 << 20):
        total += int(block[-1] - block[0] + 1)
        assert _rss_file_mb() - before < 16
    assert total == n


def test_a_scratch_row_file_leaves_nothing_behind(tmp_path):
    c = RowFile.scratch(tmp_path, np.uint16, 1000)
    np.add.at(c.array, np.array([3, 3, 999]), 1)
    assert c.array[3] == 2 and c.array[999] == 1 and c.array.sum() == 3
    assert list(tmp_path.iterdir()) == [], "the file has no name"
    assert len(RowFile.scratch(tmp_path, np.uint16, 0).array) == 0


def test_store_flushes_a_file_in_place_and_copies_anything_else(tmp_path):
    path = tmp_path / "rows.bin"
    a = RowFile.create(path, np.int32, 10)
    a.array[:] = np.arange(10)
    inode = path.stat().st_ino
    store(path, a.array[:6])  # a prefix of the very file: left as it is (the file may be longer)
    assert path.stat().st_ino == inode and path.stat().st_size == 40
    store(path, np.arange(5, dtype=np.int32) * 7)  # an array in memory replaces the file
    assert path.stat().st_ino != inode
    assert np.array_equal(RowFile.open(path, np.int32).array, np.arange(5) * 7)
    assert a.array[9] == 9, "a mapping of the replaced file still reads it"
    store(tmp_path / "copy.bin", a.array[2:8])  # a slice, not from the file's start: copied
    assert np.array_equal(RowFile.open(tmp_path / "copy.bin", np.int32).array, np.arange(2, 8))


def test_equal_compares_block_by_block():
    x = np.arange(100, dtype=np.uint64)
    y = x.copy()
    assert equal(x, x) and equal(x, y)
    y[77] += 1
    assert not equal(x, y)
    assert not equal(x, x[:50]) and not equal(x, x.astype(np.int64))


@pytest.mark.parametrize("ids", ["consecutive", "random"])
def test_duplicate_keys_spilled_to_buckets_are_the_ones_a_sort_finds(tmp_path, monkeypatch, ids):
    import pipeline.ingest.plan as plan_mod

    rng = np.random.default_rng(5)
    n = 50_000
    keys = np.arange(n, dtype=np.uint64) if ids == "consecutive" else rng.integers(0, 2**64, n, dtype=np.uint64)
    keys[[10, 20_000, 49_999]] = keys[[5, 7, 5]]  # three duplicates of two keys
    want = np.unique(keys[[5, 7]])
    assert np.array_equal(plan_mod.duplicate_keys(keys), want), "sorted in memory"
    monkeypatch.setattr(plan_mod, "SORT_ROWS", 4096)
    monkeypatch.setattr(plan_mod, "_SPREAD_BYTES", 8192)
    spilled = plan_mod.duplicate_keys(keys, spill=tmp_path)
    assert np.array_equal(spilled, want), "spread over 25 bucket files"
    assert len(plan_mod.duplicate_keys(np.unique(keys), spill=tmp_path)) == 0
    assert list(tmp_path.iterdir()) == [], "the bucket files have no names"


def test_a_corpus_with_duplicate_ids_is_refused_also_when_the_check_spills(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pipeline.ingest.plan as plan_mod
    from core.config import FbasConfig
    from core.errors import InputError
    from pipeline.ingest.read import open_corpus

    ids = [f"doc-{i}" for i in range(20_000)]
    ids[15_000] = "doc-3"
    pq.write_table(pa.table({"id": ids, "text": ["a text"] * len(ids)}), tmp_path / "c.parquet")
    corpus = open_corpus(str(tmp_path / "c.parquet"), FbasConfig().corpus)
    monkeypatch.setattr(plan_mod, "SORT_ROWS", 2048)
    h = plan_mod.corpus_id_hashes(corpus, tmp_path / "keys.bin")
    assert backing(h) is not None and (tmp_path / "keys.bin").stat().st_size == 8 * len(ids)
    with pytest.raises(InputError, match=r"'doc-3' at rows 3, 15000"):
        plan_mod.check_unique_ids(corpus, h, spill=tmp_path)


def _window_plans() -> list[Plan]:
    """Three windows' plans with global row ids (batches of ascending rows, some rows in no batch)."""
    from pipeline.ingest.plan import plan_window

    rng = np.random.default_rng(2)
    plans, row0 = [], 0
    for n in (100, 300, 257):
        n_tokens = rng.integers(0, 40, n).astype(np.int32)  # 0: quarantined, in no batch
        plans.append(plan_window(n_tokens, row0, 200, 16))
        row0 += n
    return plans


def test_a_plan_written_window_by_window_is_the_plan_kept_in_memory_and_reads_back(tmp_path):
    plans = _window_plans()
    want = Plan.concat(plans)
    pf = PlanFile(tmp_path / "plan.npz", 657)
    assert pf.rows(0) is None, "nothing planned yet"
    pf.add(plans[0])
    assert np.array_equal(pf.rows(plans[0].n_batches - 1), want.rows(plans[0].n_batches - 1))
    assert pf.rows(plans[0].n_batches) is None, "the next window's batches are not planned yet"
    for p in plans[1:]:
        pf.add(p)
    got = pf.plan()
    for b in range(want.n_batches):
        assert np.array_equal(pf.rows(b), want.rows(b))
    assert np.array_equal(got.offsets, want.offsets) and np.array_equal(got.order, want.order)
    assert np.array_equal(got.padded_len, want.padded_len) and np.array_equal(got.tokens, want.tokens)
    got.save(tmp_path / "plan.npz")
    assert (tmp_path / "plan.order.bin").stat().st_size == 657 * 4, "saved in place, at the size it was made"
    back = Plan.load(tmp_path / "plan.npz")
    assert backing(back.order) is not None and np.array_equal(back.order, want.order)
    assert all(np.array_equal(back.rows(b), want.rows(b)) for b in range(want.n_batches)), "every batch's rows"
    from core.errors import InputError

    with pytest.raises(InputError, match="more than the corpus's 657: the corpus changed"):
        pf.add(plans[0])


def test_scan_and_plan_files_of_either_format_load(tmp_path):
    """Saved now: the per-row arrays in files of their own, mapped when loaded. Saved before: inside the
    ``.npz``, loaded as they are (a job started by an earlier version resumes)."""
    n_tokens, keys = np.array([3, 0, 7], np.int32), np.array([9, 8, 7], np.uint64)
    scan = Scan(3, n_tokens, keys, np.array([1], np.int64), [], [], 1, 0)
    scan.save(tmp_path / "scan.npz")
    assert rows_file(tmp_path / "scan.npz", "id_hash").stat().st_size == 24
    back = Scan.load(tmp_path / "scan.npz")
    assert backing(back.id_hash) is not None and backing(back.n_tokens) is not None
    assert np.array_equal(back.id_hash, keys) and np.array_equal(back.n_tokens, n_tokens)
    assert back.n_embeddable == 2 and back.q_rows.tolist() == [1] and back.n_truncated == 1
    old = tmp_path / "old"
    old.mkdir()
    np.savez(old / "scan.npz", n_rows=3, n_tokens=n_tokens, id_hash=keys, q_rows=[1], n_truncated=1, n_repaired=0)
    np.savez(old / "plan.npz", order=[0, 2], offsets=[0, 1, 2], padded_len=[3, 7], tokens=[3, 7])
    s, p = Scan.load(old / "scan.npz"), Plan.load(old / "plan.npz")
    assert np.array_equal(s.id_hash, keys) and backing(s.id_hash) is None
    assert p.rows(1).tolist() == [2] and p.n_rows == 2


def test_a_missing_rows_file_is_named_and_a_resumed_job_scans_again(tmp_path):
    from core.errors import InputError

    scan = Scan(3, np.array([3, 0, 7], np.int32), np.array([9, 8, 7], np.uint64), np.zeros(0, np.int64), [], [])
    scan.save(tmp_path / "scan.npz")
    rows_file(tmp_path / "scan.npz", "id_hash").unlink()
    with pytest.raises(InputError, match=r"scan.npz's rows cannot be read .*rerun the same ingest command"):
        Scan.load(tmp_path / "scan.npz")


def test_a_disk_without_room_for_the_rows_is_a_clear_error(tmp_path):
    """A file's blocks are taken when it is made: a full disk is an error then, not a SIGBUS on a later write."""
    import subprocess

    from core.errors import PermanentError

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a 1 MB tmpfs needs root")
    try:
        with pytest.raises(PermanentError, match=r"no room on disk for .*keys.bin \(8.0 MB.*free space"):
            RowFile.create(mnt / "keys.bin", np.uint64, 1 << 20)
        assert list(mnt.iterdir()) == [], "nothing is left behind"
        with pytest.raises(PermanentError, match="no room on disk"):
            RowFile.scratch(mnt, np.uint16, 1 << 20)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_new_scan_forgets_the_saved_one_before_it_writes_its_rows(tmp_path):
    """A new scan replaces ``scan.id_hash.bin`` and the rest from its first step; a saved ``scan.npz`` and
    ``plan.npz`` naming them go first, so that a run killed meanwhile scans again instead of resuming a plan of
    half-written rows. ``job.json`` stays (without them it is not resumed)."""
    from core.layout import OutputDir
    from pipeline.ingest.job import forget_scan

    out = OutputDir(tmp_path / "out")
    out.make_dirs()
    Scan(2, np.array([3, 4], np.int32), np.array([1, 2], np.uint64), np.zeros(0, np.int64), [], []).save(
        out.state("scan.npz")
    )
    Plan(np.array([0, 1], np.int32), np.array([0, 2]), np.array([4], np.int32), np.array([7])).save(
        out.state("plan.npz")
    )
    out.state("job.json").write_text("{}")
    forget_scan(out)
    assert not out.state("scan.npz").exists() and not out.state("plan.npz").exists()
    assert out.state("job.json").exists()
