"""Chunked ingest end to end (``--chunk``), local mode with real redis-server, tritonserver, Celery workers and the
real all-MiniLM-L6-v2: SciFact abstracts with titles and long Chinese documents.

The oracle counts documents and chunks (every chunk once in the parts or the quarantine, every document with its
chunks), each stored vector is the model's embedding of its title + " " + the exact character span of its
document, the chunks of every document cover all its word pieces, search returns documents by their best chunk
(or chunks with their own text), eval scores documents, and a chunked job killed midway and rerun gives the same
rows and vectors as one uninterrupted run.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from core.config import FbasConfig
from tests.conftest import DATA, read_cnsd
from tests.pipeline_support import count_parts, seed_model, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHUNK = "sentences:96:24"
N_EN, N_ZH = 90, 8


def _docs() -> tuple[list[str], list[str], list[str]]:
    """(ids, titles, texts): SciFact abstracts (most past 96 tokens), long Chinese documents, one blank text."""
    with gzip.open(DATA / "beir_scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        en = [json.loads(next(f)) for _ in range(N_EN)]
    zh = [a for a, _, _ in read_cnsd(DATA / "stsb_zh_cnsd" / "STS-B.test.data")]
    ids = [d["_id"] for d in en] + [f"zh{i}" for i in range(N_ZH)] + ["blank"]
    titles = [d["title"] for d in en] + ["中文文档"] * N_ZH + ["no text"]
    texts = [d["text"] for d in en] + ["".join(zh[i * 25 : (i + 1) * 25]) for i in range(N_ZH)] + ["  \n "]
    return ids, titles, texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str], list[str], list[str]]:
    ids, titles, texts = _docs()
    path = tmp_path_factory.mktemp("chunked") / "corpus.parquet"
    pq.write_table(pa.table({"id": ids, "title": titles, "text": texts}), path, row_group_size=25)
    return path, ids, titles, texts


def _cfg(out: Path) -> FbasConfig:
    cfg = FbasConfig()
    cfg.output.out = str(out)
    cfg.corpus.chunk = CHUNK
    cfg.corpus.title_column = "title"
    cfg.corpus.batch_rows = 48  # several batches, so a document's chunks fall in different parts
    return cfg


@pytest.fixture(scope="module")
def clean_run(corpus, tmp_path_factory):
    from pipeline.ingest.run import ingest

    path = corpus[0]
    return ingest(str(path), _cfg(tmp_path_factory.mktemp("clean") / "out"), progress=False)


def _table(out: Path) -> pa.Table:
    t = ds.dataset(out / "vectors", format="parquet").to_table()
    return t.take(pa.array(np.argsort(t.column("row_id").to_numpy(), kind="stable")))


def test_every_document_and_chunk_is_accounted_for(clean_run, corpus):
    _, ids, _, texts = corpus
    out, m = clean_run.out, clean_run.manifest
    t = _table(out)
    q = pq.read_table(out / "quarantine.parquet").to_pylist()
    counts = m["counts"]
    assert counts["documents"] == counts["input_rows"] == len(ids)
    assert counts["chunks"] == t.num_rows + len(q) and counts["embedded"] == t.num_rows
    assert m["settings"]["chunk"] == CHUNK
    rows = t.column("row_id").to_numpy()
    assert sorted(rows.tolist() + [r["row_id"] for r in q]) == list(range(counts["chunks"])), "a chunk lost or twice"
    assert [r["id"] for r in q] == ["blank"] and q[0]["reason"] == "whitespace_text"
    doc_row = t.column("doc_row").to_numpy()
    assert t.column("id").to_pylist() == [ids[d] for d in doc_row], "each chunk carries its document's id"
    assert set(doc_row.tolist()) == set(range(len(ids) - 1)), "every embedded document has chunks"
    assert len(np.unique(doc_row)) < t.num_rows, "long documents were cut in several chunks"
    batches = {}
    for f in (out / "vectors").iterdir():
        for d in set(pq.read_table(f, columns=["doc_row"]).column(0).to_pylist()):
            batches.setdefault(d, set()).add(f.name)
    assert any(len(b) > 1 for b in batches.values()), "some document's chunks fall in different parts"
    assert not t.column("truncated").to_numpy(zero_copy_only=False).any()


def test_chunks_cover_every_token_and_hold_the_exact_span(clean_run, corpus):
    """Consecutive chunks of a document cover all its word pieces; each stored vector is the engine's embedding
    of the title + " " + text[char_start:char_end], and that span tokenizes to the chunk's pieces."""
    from core.tokenize import Tokenizer
    from engine.model_dir import load_engine

    _, _, titles, texts = corpus
    model = clean_run.out / ".fbas" / "model"
    tok, engine = Tokenizer.from_file(model / "tokenizer.json", 256), load_engine(model)
    t = _table(clean_run.out).to_pydict()
    by_doc: dict[int, list[int]] = {}
    for i, d in enumerate(t["doc_row"]):
        by_doc.setdefault(d, []).append(i)
    for d, rows in by_doc.items():
        pieces = tok.pieces([texts[d]])[0].ids
        spans = [(t["tok_start"][i], t["tok_end"][i]) for i in rows]
        assert [t["chunk"][i] for i in rows] == list(range(len(rows)))
        assert spans[0][0] == 0 and spans[-1][1] == len(pieces)
        assert all(b[0] <= a[1] and b[0] > a[0] for a, b in zip(spans, spans[1:])), f"doc {d}: a gap"
        for i in rows:
            sub = texts[d][t["char_start"][i] : t["char_end"][i]]
            assert tok.pieces([sub])[0].ids == pieces[t["tok_start"][i] : t["tok_end"][i]]
    sample = list(range(0, len(t["row_id"]), 7))
    chunk_texts = [
        f"{titles[t['doc_row'][i]]} {texts[t['doc_row'][i]][t['char_start'][i] : t['char_end'][i]]}" for i in sample
    ]
    enc = tok.encode(chunk_texts)
    want = engine.embed(enc.token_ids, enc.lengths)
    got = np.asarray([t["embedding"][i] for i in sample], dtype=np.float32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [t["n_tokens"][i] for i in sample] == enc.lengths.tolist()


def test_search_returns_documents_by_their_best_chunk(clean_run, corpus):
    from output.search import Searcher

    _, ids, _, texts = corpus
    s = Searcher(clean_run.out)
    t = _table(clean_run.out).to_pydict()
    # a middle chunk of a long abstract, searched for with its own text
    i = next(i for i, c in enumerate(t["chunk"]) if c == 2 and t["doc_row"][i] < N_EN)
    d = t["doc_row"][i]
    query = texts[d][t["char_start"][i] : t["char_end"][i]]
    chunks = s.with_text(s.search([query], k=8, by="chunk"), by="chunk")[0]
    assert chunks[0].id == ids[d] and chunks[0].chunk is not None and chunks[0].chunk["chunk"] == 2
    assert chunks[0].fields["text"] == query, "a chunk hit shows its own span of the text"
    docs = s.with_text(s.search([query], k=8))[0]
    assert len(docs) == 8 and len({h.id for h in docs}) == 8, "documents, each once"
    assert docs[0].id == ids[d] and docs[0].chunk["chunk"] == 2 and docs[0].fields["text"] == texts[d]
    assert docs[0].score == pytest.approx(chunks[0].score)
    best = {}
    for h in s.search([query], k=len(t["row_id"]), by="chunk")[0]:
        best.setdefault(h.id, h.score)
    assert [h.id for h in docs] == list(best)[:8], "documents ranked by their best chunk's score"
    zh = s.search(["天气"], k=3)[0]
    assert all(h.chunk is not None for h in zh)


def test_cli_search_by_chunk_and_eval_by_document(clean_run, corpus, tmp_path):
    from output.evaluate import evaluate

    _, ids, _, texts = corpus
    t = _table(clean_run.out).to_pydict()
    picks = [i for i, c in enumerate(t["chunk"]) if c == 1][:20]
    queries = tmp_path / "q.jsonl"
    qrels = tmp_path / "qrels.tsv"
    with open(queries, "w") as f, open(qrels, "w") as g:
        g.write("query-id\tcorpus-id\tscore\n")
        for n, i in enumerate(picks):
            d = t["doc_row"][i]
            f.write(json.dumps({"_id": f"q{n}", "text": texts[d][t["char_start"][i] : t["char_end"][i]]}) + "\n")
            g.write(f"q{n}\t{ids[d]}\t1\n")
    r = evaluate(clean_run.out, queries, qrels)
    assert r["queries"] == 20 and r["ndcg@10"] > 0.9, r
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline.cli", "search", str(clean_run.out), "--queries", str(queries), "-k", "3"]
    lines = subprocess.run([*cmd, "--by", "chunk"], env=env, capture_output=True, text=True, check=True).stdout
    first = json.loads(lines.splitlines()[0])["hits"][0]
    assert {"chunk", "tok_start", "tok_end", "char_start", "char_end", "text"} <= set(first)
    assert first["text"] == texts[ids.index(first["id"])][first["char_start"] : first["char_end"]]
    help_text = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ingest", "--help"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "--chunk" in help_text and "sentences:N[:OVERLAP]" in help_text.replace("\n", " ")


def _start(corpus: Path, out: Path, extra_env: dict[str, str] | None = None, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    log = open(out.parent / f"{out.name}-ingest.log", "ab")  # noqa: SIM115
    args = ["ingest", str(corpus), "--out", str(out), "--no-progress", "--title-column", "title", "--batch-rows", "48"]
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args, *flags],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(ROOT),
    )


def test_killed_chunked_job_resumes_to_the_same_rows(clean_run, corpus, tmp_path):
    path = corpus[0]
    out = tmp_path / "out"
    seed_model(out, clean_run.out)
    p = _start(path, out, {"FBAS_TEST_PAUSE": "2:120"}, "--chunk", CHUNK)
    try:
        wait_for(lambda: count_parts(out) >= 1, 240, "a committed part")
        p.kill()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    n = count_parts(out)
    assert n < clean_run.manifest["counts"]["batches"] and not (out / "manifest.json").exists()
    # an unchunked ingest into the folder is another job: refused, naming the way out
    p = _start(path, out)
    assert p.wait(timeout=240) != 0
    log = (tmp_path / "out-ingest.log").read_text()
    assert "not this one" in log and "another --out" in log
    p = _start(path, out, None, "--chunk", CHUNK)
    assert p.wait(timeout=600) == 0, (tmp_path / "out-ingest.log").read_text()[-3000:]
    a, b = _table(out), _table(clean_run.out)
    for col in ("row_id", "id", "doc_row", "chunk", "tok_start", "tok_end", "char_start", "char_end", "n_tokens"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    va = np.asarray(a.column("embedding").to_pylist(), np.float32)
    vb = np.asarray(b.column("embedding").to_pylist(), np.float32)
    np.testing.assert_allclose(va, vb, atol=2e-6)
    m = json.loads((out / "manifest.json").read_text())
    assert m["job"] == clean_run.manifest["job"] and m["counts"]["chunks"] == clean_run.manifest["counts"]["chunks"]


@pytest.mark.parametrize("column", ["doc_row", "chunk"])
def test_finalize_refuses_a_part_whose_chunk_columns_disagree_with_the_scan(clean_run, tmp_path, column):
    """Finalize checks the parts' own doc_row and chunk columns, not only the scan's: a part naming another
    document (or chunk) for a row is an oracle failure."""
    import shutil

    from core.layout import OutputDir
    from output.check import OracleError
    from output.finalize import finalize

    out = tmp_path / "out"
    shutil.copytree(clean_run.out, out)
    (out / "manifest.json").unlink()
    part = sorted((out / "vectors").glob("*.parquet"))[0]
    t = pq.read_table(part)
    col = t.column(column).to_numpy().copy()
    col[0] += 1  # the first row of the part names the next document (or chunk)
    i = t.schema.get_field_index(column)
    pq.write_table(t.set_column(i, t.schema.field(i), pa.array(col, t.schema.field(i).type)), part)
    with pytest.raises(OracleError, match="doc_row/chunk"):
        finalize(OutputDir(out), clean_run.manifest["index"]["type"])
