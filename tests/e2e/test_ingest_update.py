"""`ingest --update` end to end (local mode: real redis-server, tritonserver, Celery workers, all-MiniLM-L6-v2).

The oracle of a growing corpus: after any sequence of updates OUT holds exactly the ids of the latest corpus, in
its order, with vectors equal (within 1e-6) to a fresh ingest of it; only new and changed rows are embedded; an
update killed midway and run again gives the same result; an update with another model is refused before the
folder is touched; ``--keep-missing`` keeps the vectors of ids the corpus lost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import FbasConfig
from core.errors import InputError
from tests.pipeline_support import check_oracle, read_vectors, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    pq.write_table(pa.table({"id": [i for i, _ in rows], "text": [t for _, t in rows]}), path, row_group_size=100)
    return path


def _chunked_cfg(out: Path, update: bool) -> FbasConfig:
    c = _cfg(out, update=update)
    c.corpus.chunk = "tokens:8:2"
    return c


@pytest.fixture(scope="module")
def versions(stsb_en_test, tmp_path_factory) -> list[tuple[Path, list[str]]]:
    """Three versions of a corpus of STS-B sentences: v1; v2 = v1 less 10 ids, 10 texts changed, 60 ids added (one
    blank, quarantined); v3 = v2 with 5 more texts changed, 20 of its added ids gone, rows reordered."""
    texts = list(dict.fromkeys([a for a, _, _ in stsb_en_test] + [b for _, b, _ in stsb_en_test]))
    base = [(f"s{i}", t) for i, t in enumerate(texts[:700])]
    v1 = base[:400]
    v2 = [r for i, r in enumerate(v1) if not 10 <= i < 20]
    v2 = [(i, t + " (revised)") if 30 <= n < 40 else (i, t) for n, (i, t) in enumerate(v2)]
    v2 += base[400:459] + [("blank", "   ")]
    v3 = [(i, "Changed again: " + t) if n % 80 == 5 else (i, t) for n, (i, t) in enumerate(v2)]
    v3 = [r for r in v3 if r[0] not in {f"s{k}" for k in range(400, 420)}]
    v3 = v3[200:] + v3[:200]
    d = tmp_path_factory.mktemp("versions")
    return [(_write(d / f"v{k}.parquet", v), [i for i, _ in v]) for k, v in enumerate((v1, v2, v3), 1)]


def _cfg(out: Path, update: bool = True, keep_missing: bool = False) -> FbasConfig:
    cfg = FbasConfig()
    cfg.output.out = str(out)
    cfg.output.update = update
    cfg.output.keep_missing = keep_missing
    return cfg


@pytest.fixture(scope="module")
def fresh(versions, tmp_path_factory) -> list[Path]:
    """A fresh (plain) ingest of every version: what an update must equal."""
    from pipeline.ingest.run import ingest

    outs = []
    for k, (path, _) in enumerate(versions, 1):
        out = tmp_path_factory.mktemp(f"fresh{k}") / "out"
        ingest(str(path), _cfg(out, update=False), progress=False)
        outs.append(out)
    return outs


def _same_as_fresh(out: Path, fresh_out: Path, ids: list[str]) -> None:
    check_oracle(out, ids)
    rows, got_ids, vecs = read_vectors(out)
    rows0, ids0, vecs0 = read_vectors(fresh_out)
    assert np.array_equal(rows, rows0) and got_ids == ids0, "the same ids at the same rows as a fresh ingest"
    np.testing.assert_allclose(vecs, vecs0, atol=1e-6)
    assert _quarantine(out) == _quarantine(fresh_out)


def _quarantine(out: Path) -> list[dict]:
    q = out / "quarantine.parquet"
    return pq.read_table(q).to_pylist() if q.exists() else []


@pytest.fixture(scope="module")
def v1_out(versions, tmp_path_factory) -> Path:
    from pipeline.ingest.run import ingest

    out = tmp_path_factory.mktemp("updated") / "out"
    ingest(str(versions[0][0]), _cfg(out), progress=False)  # a first --update is a full ingest
    return out


def test_a_sequence_of_updates_equals_a_fresh_ingest_of_the_latest(versions, fresh, v1_out, tmp_path):
    from pipeline.ingest.run import ingest

    out = tmp_path / "out"
    shutil.copytree(v1_out, out)
    _same_as_fresh(out, fresh[0], versions[0][1])
    r = ingest(str(versions[1][0]), _cfg(out), progress=False)
    g = r.manifest["generations"][-1]
    assert (g["generation"], g["kept"], g["added"], g["changed"], g["removed"]) == (2, 380, 60, 10, 10)
    assert r.docs_this_run == 69, "only the added and changed rows were embedded (the blank one is quarantined)"
    _same_as_fresh(out, fresh[1], versions[1][1])
    r = ingest(str(versions[2][0]), _cfg(out), progress=False)
    g = r.manifest["generations"][-1]
    assert (g["generation"], g["changed"], g["removed"], g["added"]) == (3, 5 + 1, 20, 0), g  # the blank row again
    _same_as_fresh(out, fresh[2], versions[2][1])
    assert [x["generation"] for x in r.manifest["generations"]] == [1, 2, 3]
    assert not (out / ".fbas" / "prev").exists() and not (out / ".fbas" / "update").exists()
    r = ingest(str(versions[2][0]), _cfg(out), progress=False)  # nothing changed: nothing embedded
    assert r.docs_this_run == 0 and r.manifest["generations"][-1]["kept"] == len(versions[2][1]) - 1
    _same_as_fresh(out, fresh[2], versions[2][1])


def test_an_update_killed_midway_and_run_again_gives_the_same_result(versions, fresh, v1_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(v1_out, out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FBAS_TEST_PAUSE": "0:120:update"}
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", str(versions[1][0]), "--out", str(out), "--update"]
    log = open(tmp_path / "ingest.log", "ab")  # noqa: SIM115
    p = subprocess.Popen([*cmd, "--no-progress"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    try:
        wait_for(
            lambda: list((out / ".fbas" / "update" / "embed" / "vectors").glob("*.parquet")) or None, 240, "a part"
        )
    finally:
        p.kill()
        p.wait(timeout=30)
    assert (out / "manifest.json").exists() and not (out / ".fbas" / "prev").exists(), "OUT untouched until embedded"
    env.pop("FBAS_TEST_PAUSE")
    done = subprocess.run([*cmd, "--no-progress"], env=env, capture_output=True, text=True, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    _same_as_fresh(out, fresh[1], versions[1][1])
    assert json.loads((out / "manifest.json").read_text())["generations"][-1]["changed"] == 10


def test_an_update_with_another_model_is_refused_untouched(versions, v1_out, tmp_path):
    from pipeline.ingest.run import ingest

    out = tmp_path / "out"
    shutil.copytree(v1_out, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*") if "update" not in p.parts)
    cfg = _cfg(out)
    cfg.engine.max_seq_len = 128
    with pytest.raises(InputError, match="same model settings"):
        ingest(str(versions[1][0]), cfg, progress=False)
    after = sorted(p.relative_to(out) for p in out.rglob("*") if "update" not in p.parts)
    assert before == after and (out / "manifest.json").exists()


def test_keep_missing_keeps_the_vectors_of_ids_the_corpus_lost(versions, v1_out, tmp_path):
    from output.search import Searcher
    from pipeline.ingest.run import ingest

    out = tmp_path / "out"
    shutil.copytree(v1_out, out)
    _, _, v1_vecs = read_vectors(v1_out)
    r = ingest(str(versions[1][0]), _cfg(out, keep_missing=True), progress=False)
    assert r.manifest["generations"][-1]["kept_missing"] == 10
    rows, ids, vecs = read_vectors(out)
    lost = [f"s{i}" for i in range(10, 20)]
    assert ids[-10:] == lost and rows[-10:].tolist() == list(range(len(versions[1][1]), len(versions[1][1]) + 10))
    np.testing.assert_array_equal(vecs[-10:], v1_vecs[10:20])
    s = Searcher(out)
    hit = s.with_text(s.search_vectors(v1_vecs[12:13], 1))[0][0]
    assert hit.id == "s12" and "text" not in hit.fields  # no text: the corpus no longer has the row


def _chunk_table(out: Path) -> pa.Table:
    import pyarrow.dataset as ds

    t = ds.dataset(out / "vectors", format="parquet").to_table()
    return t.take(pa.array(np.argsort(t.column("row_id").to_numpy(), kind="stable")))


def test_a_chunked_corpus_updates_by_document(versions, v1_out, tmp_path):
    """With --chunk a kept document keeps all its chunks and a changed one is chunked again: the folder equals a
    fresh chunked ingest, chunk numbers, spans and vectors alike; the folder's chunking must be given."""
    from core.errors import ConfigError
    from pipeline.ingest.run import ingest

    fresh_out, out = tmp_path / "fresh", tmp_path / "out"
    ingest(str(versions[1][0]), _chunked_cfg(fresh_out, False), progress=False)
    ingest(str(versions[0][0]), _chunked_cfg(out, True), progress=False)
    r = ingest(str(versions[1][0]), _chunked_cfg(out, True), progress=False)
    g = r.manifest["generations"][-1]
    assert (g["kept"], g["added"], g["changed"], g["removed"]) == (380, 60, 10, 10)
    a, b = _chunk_table(out), _chunk_table(fresh_out)
    assert a.num_rows > 450, "sentences of more than 8 tokens have several chunks"
    for col in ("row_id", "id", "doc_row", "chunk", "tok_start", "tok_end", "char_start", "char_end", "n_tokens"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    va = np.asarray(a.column("embedding").to_pylist(), np.float32)
    vb = np.asarray(b.column("embedding").to_pylist(), np.float32)
    np.testing.assert_allclose(va, vb, atol=1e-6)
    assert _quarantine(out) == _quarantine(fresh_out)
    m, m0 = r.manifest["counts"], json.loads((fresh_out / "manifest.json").read_text())["counts"]
    assert (m["documents"], m["chunks"], m["embedded"]) == (m0["documents"], m0["chunks"], m0["embedded"])
    with pytest.raises(ConfigError, match=r"--chunk \(none\)"):
        ingest(str(versions[1][0]), _chunked_cfg(v1_out, True), progress=False)


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file of OUT and its bytes (but the update staging, where the model is built, and the lock file, which
    records when the last command took it)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and "update" not in p.relative_to(out).parts and p.name != "lock"
    }


def test_a_bad_corpus_leaves_the_folder_as_it_was(versions, v1_out, tmp_path):
    """A missing corpus and one with duplicate ids fail before the old generation leaves OUT."""
    from pipeline.ingest.run import ingest

    out = tmp_path / "out"
    shutil.copytree(v1_out, out)
    before = _snapshot(out)
    with pytest.raises(InputError):
        ingest(str(tmp_path / "no-such.parquet"), _cfg(out), progress=False)
    assert _snapshot(out) == before
    dup = _write(tmp_path / "dup.parquet", [("s1", "one text"), ("s2", "another"), ("s1", "the same id again")])
    with pytest.raises(InputError, match="s1"):
        ingest(str(dup), _cfg(out), progress=False)
    assert _snapshot(out) == before


class _Killed(Exception):
    """Stands for the process being killed at a step of an update."""


@pytest.mark.parametrize("moves", [1, 2, 3, 4, 6])
def test_an_update_killed_while_moving_the_old_generation_and_run_again_gives_the_same_result(
    versions, fresh, v1_out, tmp_path, monkeypatch, moves
):
    """Killed after ``moves`` files of the old generation moved to prev/ (the manifest first, then index, vectors/
    and the state files: content.npz, generations.json, ...), a rerun finishes the move, keeps the old vectors
    and text hashes, and equals a fresh ingest."""
    import pipeline.ingest.update as upd
    from pipeline.ingest.run import ingest

    out = tmp_path / "out"
    shutil.copytree(v1_out, out)
    real, done = upd._rename, []

    def rename(src: Path, dst: Path) -> None:
        if len(done) == moves:
            raise _Killed
        real(src, dst)
        done.append(src.name)

    monkeypatch.setattr(upd, "_rename", rename)
    with pytest.raises(_Killed):
        ingest(str(versions[1][0]), _cfg(out), progress=False)
    monkeypatch.setattr(upd, "_rename", real)
    r = ingest(str(versions[1][0]), _cfg(out), progress=False)
    g = r.manifest["generations"][-1]
    assert (g["kept"], g["added"], g["changed"], g["removed"]) == (380, 60, 10, 10), "the old hashes were kept"
    _same_as_fresh(out, fresh[1], versions[1][1])
    assert not (out / ".fbas" / "prev").exists()


def test_an_update_killed_while_deleting_prev_is_finished_by_the_next_run(
    versions, fresh, v1_out, tmp_path, monkeypatch
):
    """Killed midway through deleting the replaced generation (its vectors gone, its manifest still there), the
    folder is final: a rerun with the same corpus keeps every row."""
    import pipeline.ingest.update as upd
    from pipeline.ingest.run import ingest

    out = tmp_path / "out"
    shutil.copytree(v1_out, out)
    real = shutil.rmtree

    def rmtree(path, *a, **k):
        if Path(path).name.startswith("prev"):
            real(Path(path) / "vectors")
            raise _Killed
        real(path, *a, **k)

    monkeypatch.setattr(upd.shutil, "rmtree", rmtree)
    with pytest.raises(_Killed):
        ingest(str(versions[1][0]), _cfg(out), progress=False)
    monkeypatch.setattr(upd.shutil, "rmtree", real)
    assert (out / "manifest.json").exists()
    r = ingest(str(versions[1][0]), _cfg(out), progress=False)
    assert r.docs_this_run == 0 and r.manifest["generations"][-1]["kept"] == len(versions[1][1]) - 1
    _same_as_fresh(out, fresh[1], versions[1][1])
    assert not [p for p in (out / ".fbas").iterdir() if p.name.startswith(("prev", "update"))]


def test_an_ivfpq_folder_takes_a_small_delta_and_stays_ivfpq(stsb_en_test, tmp_path):
    """The delta's own ingest (5 rows) is not the folder's index: it is flat; the new generation keeps ivfpq
    though --index is not given."""
    from pipeline.ingest.run import ingest

    texts = list(dict.fromkeys([a for a, _, _ in stsb_en_test] + [b for _, b, _ in stsb_en_test]))[:1105]
    v1 = _write(tmp_path / "v1.parquet", [(f"s{i}", t) for i, t in enumerate(texts[:1100])])
    v2 = _write(tmp_path / "v2.parquet", [(f"s{i}", t) for i, t in enumerate(texts)])
    out = tmp_path / "out"
    cfg = _cfg(out)
    cfg.output.index = "ivfpq"
    ingest(str(v1), cfg, progress=False)
    r = ingest(str(v2), _cfg(out), progress=False)
    assert r.docs_this_run == 5 and r.manifest["index"]["type"] == "ivfpq"
    assert r.manifest["index"]["ntotal"] == 1105
    check_oracle(out, [f"s{i}" for i in range(1105)])


def test_an_old_generation_without_vectors_updates(tmp_path):
    """A first corpus whose every row is blank (all quarantined, no vector) updates like any other."""
    from pipeline.ingest.run import ingest

    out = tmp_path / "out"
    ingest(str(_write(tmp_path / "v1.parquet", [("a", " "), ("b", "  ")])), _cfg(out), progress=False)
    v2 = [("a", "A sentence now."), ("b", "  "), ("c", "Another one.")]
    r = ingest(str(_write(tmp_path / "v2.parquet", v2)), _cfg(out), progress=False)
    g = r.manifest["generations"][-1]
    assert (g["kept"], g["added"], g["changed"], g["removed"]) == (0, 1, 2, 0), g
    check_oracle(out, ["a", "b", "c"])


def test_a_rerun_does_not_reuse_a_delta_whose_text_was_edited_in_place(versions, v1_out, tmp_path, monkeypatch):
    """Killed after the delta was embedded, then one delta row edited in place (the file's size unchanged): the
    rerun embeds the edited text, not the staged one."""
    import pipeline.ingest.update as upd
    from pipeline.ingest.run import ingest

    out = tmp_path / "out"
    shutil.copytree(v1_out, out)
    rows = pq.read_table(versions[1][0]).to_pylist()
    v2 = _write(tmp_path / "v2.parquet", [(r["id"], r["text"]) for r in rows])

    def killed(*a, **k):
        raise _Killed

    monkeypatch.setattr(upd, "_write_generation", killed)
    with pytest.raises(_Killed):
        ingest(str(v2), _cfg(out), progress=False)
    monkeypatch.undo()
    at = next(n for n, r in enumerate(rows) if r["id"] == "s400")  # an added row: in the delta
    size, text = v2.stat().st_size, rows[at]["text"]
    for k in range(len(text) - 1):  # swap two letters until the file keeps its size
        edited = text[:k] + text[k + 1] + text[k] + text[k + 2 :]
        if edited == text:
            continue
        _write(v2, [(r["id"], edited if n == at else r["text"]) for n, r in enumerate(rows)])
        if v2.stat().st_size == size:
            break
    else:
        pytest.skip("no same-size edit found")
    ingest(str(v2), _cfg(out), progress=False)
    fresh_out = tmp_path / "fresh"
    ingest(str(v2), _cfg(fresh_out, update=False), progress=False)
    _same_as_fresh(out, fresh_out, [r["id"] for r in rows])


def test_a_kept_document_with_a_quarantined_chunk_is_chunked_again(versions, tmp_path):
    """A document whose chunk was quarantined (its other chunks have vectors) is not kept with a chunk missing:
    it is embedded again, and the folder equals a fresh chunked ingest."""
    from pipeline.ingest.run import ingest

    fresh_out, out = tmp_path / "fresh", tmp_path / "out"
    ingest(str(versions[0][0]), _chunked_cfg(fresh_out, False), progress=False)
    ingest(str(versions[0][0]), _chunked_cfg(out, True), progress=False)
    # the old generation as a worker's failure would leave it: one chunk of a long document quarantined
    part = next(p for p in sorted((out / "vectors").glob("*.parquet")) if pq.read_table(p).num_rows)
    t = pq.read_table(part)
    at = next(i for i, c in enumerate(t.column("chunk").to_pylist()) if c == 1)
    victim = t.slice(at, 1).to_pylist()[0]
    pq.write_table(pa.concat_tables([t.slice(0, at), t.slice(at + 1)]), part)
    q = pa.table({"row_id": [victim["row_id"]], "id": [victim["id"]], "reason": ["inference failed"]})
    pq.write_table(q, out / "quarantine.parquet")
    r = ingest(str(versions[0][0]), _chunked_cfg(out, True), progress=False)
    g = r.manifest["generations"][-1]
    assert (g["kept"], g["changed"]) == (399, 1), g
    a, b = _chunk_table(out), _chunk_table(fresh_out)
    for col in ("row_id", "id", "doc_row", "chunk", "tok_start", "tok_end", "n_tokens"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    assert r.manifest["counts"]["chunks"] == json.loads((fresh_out / "manifest.json").read_text())["counts"]["chunks"]
