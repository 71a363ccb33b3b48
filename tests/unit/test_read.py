"""Corpus reading and validation (pipeline/ingest/read.py): layouts, schema errors that name the fix, ids, UTF-8."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import CorpusConfig
from core.errors import InputError
from core.ids import id_hashes
from pipeline.ingest.read import decode_texts, open_corpus


def _rows(corpus):
    ids, texts = [], []
    for rb in corpus.batches(batch_rows=7):
        ids += rb.ids
        texts += rb.texts
    return ids, texts


def test_file_folder_glob_and_uri_read_the_same_rows_in_order(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for k in range(3):
        pq.write_table(
            pa.table({"id": [f"f{k}-{i}" for i in range(10)], "text": [f"text {k} {i}" for i in range(10)]}),
            d / f"part-{k}.parquet",
            row_group_size=4,
        )
    (d / "_SUCCESS").write_text("")
    cfg = CorpusConfig()
    want_ids = [f"f{k}-{i}" for k in range(3) for i in range(10)]
    for uri in (str(d), str(d / "*.parquet"), f"file://{d}"):
        c = open_corpus(uri, cfg)
        assert c.n_rows == 30 and len(c.files) == 3
        ids, texts = _rows(c)
        assert ids == want_ids and texts[11] == "text 1 1"
    single = open_corpus(str(d / "part-1.parquet"), cfg)
    assert _rows(single)[0] == want_ids[10:20]
    assert open_corpus(str(d), cfg).fingerprint == open_corpus(str(d / "*.parquet"), cfg).fingerprint


def test_missing_and_wrongly_typed_columns_name_the_column_and_the_fix(tmp_path):
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["a", "b"], "score": [1.5, 2.5], "n": [1, 2]}), p)
    with pytest.raises(InputError, match=r"no text column 'text'.*--text-column"):
        open_corpus(str(p), CorpusConfig())
    with pytest.raises(InputError, match=r"text column 'n' has type int64.*cast it to string"):
        open_corpus(str(p), CorpusConfig(text_column="n"))
    with pytest.raises(InputError, match=r"id column 'score' has type double.*integers or strings"):
        open_corpus(str(p), CorpusConfig(text_column="body", id_column="score"))
    with pytest.raises(InputError, match=r"no id column 'doc_id'.*--id-column"):
        open_corpus(str(p), CorpusConfig(text_column="body", id_column="doc_id"))
    with pytest.raises(InputError, match=r"no title column 'title'"):
        open_corpus(str(p), CorpusConfig(text_column="body", title_column="title"))
    with pytest.raises(InputError, match="does not exist"):
        open_corpus(str(tmp_path / "nope.parquet"), CorpusConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Parquet files"):
        open_corpus(str(tmp_path / "empty"), CorpusConfig())


def test_default_id_column_absent_means_row_position(tmp_path):
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), p)
    c = open_corpus(str(p), CorpusConfig())
    assert c.id_column is None and c.id_type == "int64"
    assert _rows(c)[0] == [0, 1, 2]


def test_title_is_prepended_but_does_not_rescue_an_empty_text(tmp_path):
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "title": ["T1", None, "T3"], "text": ["body", "b2", "  "]}), p)
    _, texts = _rows(open_corpus(str(p), CorpusConfig(title_column="title")))
    assert texts == ["T1 body", "b2", "  "]


def test_invalid_utf8_is_replaced_and_flagged():
    data = b"ok" + b"ab\xff\xfecd" + b"x\x00y"
    offsets = np.array([0, 2, 8, 11], dtype=np.int32)
    arr = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])
    texts, repaired = decode_texts(arr)
    assert texts == ["ok", "ab\ufffd\ufffdcd", "x\x00y"]
    assert repaired.tolist() == [False, True, False]
    texts, repaired = decode_texts(pa.array([b"caf\xc3\xa9", None, b"\xc3"], pa.binary()))
    assert texts == ["café", None, "\ufffd"] and repaired.tolist() == [False, False, True]


def test_id_hashes_are_stable_and_spread():
    ids = [f"doc-{i}" for i in range(50_000)] + ["", "a", "b", "ab", "ba"]
    h = id_hashes(pa.array(ids))
    assert len(np.unique(h)) == len(ids)
    assert np.array_equal(h, id_hashes(pa.array(ids, pa.large_string())))
    assert np.array_equal(h[10:20], id_hashes(pa.array(ids).slice(10, 10)))
    assert id_hashes(pa.array([5, -1], pa.int32())).view(np.int64).tolist() == [5, -1]
    with pytest.raises(InputError, match="null id"):
        id_hashes(pa.array(["a", None]))


def test_id_keys_keep_their_values_whichever_way_they_are_computed():
    """The keys are stored (``.fbas/content.npz`` of an updated folder), so their values may never change: these
    were computed by the first implementation. Ids of similar lengths go by byte position, ids of very
    different lengths by powers; both must give the same keys."""
    from core import ids as ids_mod

    fixed = ["", "a", "doc-1", "中文", "x" * 3000]  # lengths spread past _MAX_SPREAD: the powers path
    want = [0x0, 0xF0EEA8C8A0607D15, 0x69CB749FEFDD5E23, 0x8DBC4F06B4701A6A, 0x9F32E19C283F1F8C]
    assert [int(x) for x in id_hashes(pa.array(fixed))] == want
    assert [int(x) for x in id_hashes(pa.array(fixed[:4]))] == want[:4]  # the by-position path
    rng = np.random.default_rng(0)
    mixed = ["".join(chr(int(c)) for c in rng.integers(0x20, 0xD000, rng.integers(0, 30))) for _ in range(3000)]
    col = pa.array(mixed, pa.large_string())
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[: len(mixed) + 1]
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8)
    lengths = np.diff(offsets)
    by_pos, by_pow = ids_mod._by_position(offsets, data, lengths), ids_mod._by_powers(offsets, data, lengths)
    assert np.array_equal(by_pos, by_pow) and len(np.unique(by_pos)) == len(set(mixed))


def test_the_first_rows_of_a_big_row_group_are_read_without_its_whole_column(tmp_path):
    """A producer's first window must not wait for (or hold) a whole row group's text: one row group of
    20,000 texts (about 40 MB of text) gives its first 1,024 rows with a few MB of Arrow memory, and the rows
    still come in order, all of them."""
    letters = np.random.default_rng(0).integers(ord("a"), ord("z") + 1, (20_000, 2000), dtype=np.uint8)
    texts = [row.tobytes().decode() for row in letters]  # all distinct: no dictionary to shrink the column
    p = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": np.arange(len(texts)), "text": texts}), p, row_group_size=len(texts))
    assert pq.ParquetFile(p).metadata.num_row_groups == 1
    corpus = open_corpus(str(p), CorpusConfig())
    before = pa.total_allocated_bytes()
    batches = corpus.batches(1024)
    first = next(batches)
    held = pa.total_allocated_bytes() - before
    assert len(first.texts) == 1024 and first.texts[5] == texts[5]
    assert held < 12 << 20, f"{held >> 20} MB of Arrow memory for the first 1,024 rows"
    rest = [x for b in batches for x in b.ids]
    assert first.ids + rest == list(range(len(texts)))
