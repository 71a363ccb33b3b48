"""Chunking on real text (SciFact abstracts, Chinese STS-B sentences) with MiniLM's tokenizer: every word piece
covered, each span the exact substring that tokenizes to its pieces, windows and overlaps kept, the same cuts
on every call; bad --chunk values refused with the fix; the scan's chunked windows number chunks in corpus
order whatever the window and read-batch sizes."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.chunking import AUTO, SENTENCE_ENDS, Chunker, ChunkSpec
from core.config import CorpusConfig, FbasConfig
from core.errors import ConfigError
from tests.conftest import DATA, read_cnsd


def _english(n: int = 120) -> list[tuple[str, str]]:
    """(title, text) of the first SciFact abstracts (mean 215 words: most pass 256 tokens)."""
    with gzip.open(DATA / "beir_scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(next(f)) for _ in range(n)]
    return [(d["title"], d["text"]) for d in docs]


def _chinese(n_docs: int = 20, per_doc: int = 30) -> list[str]:
    """Long Chinese documents: consecutive CNSD test sentences joined (most end with 。 or ？, some with none)."""
    rows = read_cnsd(DATA / "stsb_zh_cnsd" / "STS-B.test.data")
    sents = [a for a, _, _ in rows]
    return ["".join(sents[i * per_doc : (i + 1) * per_doc]) for i in range(n_docs)]


def _check_cover(tok, texts: list[str], spans, window: int, overlap: int) -> None:
    """Every piece of every text in some chunk, chunks in order, spans that tokenize back to their pieces."""
    encs = tok.pieces(texts)
    for d, (text, enc) in enumerate(zip(texts, encs)):
        mine = np.flatnonzero(spans.doc == d)
        assert len(mine), f"text {d} has no chunk"
        s, e = spans.tok_start[mine], spans.tok_end[mine]
        assert list(spans.chunk[mine]) == list(range(len(mine)))
        assert s[0] == 0 and e[-1] == len(enc.ids), "the first chunk starts the text and the last one ends it"
        assert (e - s <= window).all() and (e > s).all()
        assert (s[1:] > s[:-1]).all(), "every chunk starts after the previous one"
        assert (s[1:] <= e[:-1]).all(), "no piece between two chunks is left out"
        assert (e[:-1] - s[1:] <= overlap).all(), "overlap at most OVERLAP pieces"
        for k in mine.tolist():
            a, b = int(spans.char_start[k]), int(spans.char_end[k])
            sub = text[a:b]
            assert sub == sub.strip() and sub, "a span starts and ends on a piece"
            again = tok.pieces([sub])[0].ids
            assert again == enc.ids[spans.tok_start[k] : spans.tok_end[k]], f"text {d} chunk {k}: {sub[:60]!r}"


@pytest.mark.parametrize("spec", ["tokens:64:16", "tokens:200:0", "tokens::32", "sentences:96:24", "sentences"])
def test_english_abstracts_are_covered_by_exact_spans(minilm_tokenizer, spec):
    docs = _english()
    texts = [t for _, t in docs]
    chunker = Chunker(minilm_tokenizer, ChunkSpec.parse(spec))
    spans = chunker.split(texts)
    parsed = ChunkSpec.parse(spec)
    assert parsed is not None
    _check_cover(minilm_tokenizer, texts, spans, chunker.size, parsed.overlap)
    assert len(spans.doc) > len(texts), "abstracts past the window are cut in several chunks"


@pytest.mark.parametrize("spec", ["tokens:50:10", "sentences:80:20"])
def test_chinese_documents_are_covered_by_exact_spans(minilm_tokenizer, spec):
    texts = _chinese()
    chunker = Chunker(minilm_tokenizer, ChunkSpec.parse(spec))
    spans = chunker.split(texts)
    parsed = ChunkSpec.parse(spec)
    assert parsed is not None
    _check_cover(minilm_tokenizer, texts, spans, chunker.size, parsed.overlap)


def test_sentence_mode_cuts_at_sentence_ends(minilm_tokenizer):
    """Where a window holds a sentence end, the chunk ends there (English and Chinese marks alike); token windows
    end at word boundaries wherever the sentence falls."""
    texts = [t for _, t in _english(60)] + _chinese(10)
    sent = Chunker(minilm_tokenizer, ChunkSpec.parse("sentences:96"))
    sp = sent.split(texts)
    ends = [texts[d][b - 1] for d, b in zip(sp.doc, sp.char_end)]
    last = np.r_[sp.doc[1:] != sp.doc[:-1], True]  # a document's last chunk ends where the text ends
    inner = [c for c, is_last in zip(ends, last) if not is_last]
    assert inner and sum(c in SENTENCE_ENDS for c in inner) / len(inner) > 0.95
    zh_inner = [c for c, is_last, d in zip(ends, last, sp.doc) if not is_last and d >= 60]
    assert zh_inner and all(c in "。！？；…" or c in SENTENCE_ENDS for c in zh_inner[:5])
    tok = Chunker(minilm_tokenizer, ChunkSpec.parse("tokens:96")).split(texts)
    assert len(tok.doc) <= len(sp.doc), "sentence cuts make chunks no longer than token windows"


def test_cuts_are_the_same_alone_and_in_any_batch(minilm_tokenizer):
    docs = _english(30)
    texts, titles = [t for _, t in docs], [ti for ti, _ in docs]
    chunker = Chunker(minilm_tokenizer, ChunkSpec.parse("sentences:120:30"))
    whole = chunker.split(texts, titles)
    for d in (0, 7, 29):
        alone = chunker.split([texts[d]], [titles[d]])
        mine = whole.doc == d
        for field in ("chunk", "tok_start", "tok_end", "char_start", "char_end"):
            assert np.array_equal(getattr(alone, field), getattr(whole, field)[mine])


def test_a_title_shrinks_the_window_so_title_and_chunk_fit(minilm_tokenizer):
    """With a title every chunk is embedded as title + " " + chunk: the window leaves room for the title."""
    title, text = _english(1)[0]
    chunker = Chunker(minilm_tokenizer, ChunkSpec.parse("tokens"))
    sp = chunker.split([text], [title])
    assert sp.title_tokens[0] > 5
    for a, b in zip(sp.char_start, sp.char_end):
        _, full = minilm_tokenizer.lengths([f"{title} {text[a:b]}"])
        assert full[0] <= 256


@pytest.mark.parametrize(
    "bad, says",
    [
        ("tokens:0", "N >= 1"),
        ("tokens:10:10", "OVERLAP < N"),
        ("tokens:10:12", "OVERLAP < N"),
        ("tokens:10:-1", "0 <= OVERLAP"),
        ("words:10", "tokens:N[:OVERLAP]"),
        ("tokens:ten", "whole numbers"),
        ("tokens:1:2:3", "tokens:N[:OVERLAP]"),
    ],
)
def test_bad_chunk_values_name_the_fix(bad, says):
    with pytest.raises(ConfigError, match="--chunk") as e:
        FbasConfig(corpus=CorpusConfig(chunk=bad)).validate()
    assert says in str(e.value)


def test_a_window_past_the_model_is_refused(minilm_tokenizer):
    with pytest.raises(ConfigError, match=r"N <= 254"):
        Chunker(minilm_tokenizer, ChunkSpec.parse("tokens:300"))
    assert ChunkSpec.parse("") is None and ChunkSpec.parse("none") is None
    assert ChunkSpec.parse("sentences::16") == ChunkSpec("sentences", 0, 16)
    assert ChunkSpec.parse("auto") == ChunkSpec.parse(AUTO) and ChunkSpec.parse("AUTO") is not None


def test_chunked_windows_number_chunks_in_corpus_order(minilm_tokenizer, tmp_path):
    """The scan's chunk rows are the same whatever the plan window and read-batch sizes: chunk numbers follow
    the documents, every document has its rows (a quarantined one exactly one, without tokens)."""
    from pipeline.ingest.plan import assemble_scan, corpus_id_hashes, scan_windows
    from pipeline.ingest.read import open_corpus

    docs = _english(40)
    texts = [t for _, t in docs]
    texts[5] = "   "  # quarantined: one row
    path = tmp_path / "c.parquet"
    ids = [f"d{i}" for i in range(len(texts))]
    pq.write_table(pa.table({"id": ids, "title": [ti for ti, _ in docs], "text": texts}), path, row_group_size=7)
    corpus = open_corpus(path, CorpusConfig(title_column="title"))
    chunker = Chunker(minilm_tokenizer, ChunkSpec.parse("tokens:100:20"))
    runs = []
    for window, first in ((1000, 1000), (9, 3)):
        ws = list(scan_windows(corpus, minilm_tokenizer, window, first_rows=first, chunker=chunker))
        scan = assemble_scan(corpus, corpus_id_hashes(corpus), ws)
        texts_of = [t for w in ws for t in w.texts]
        runs.append((scan, texts_of, [w.row0 for w in ws], [len(w.n_tokens) for w in ws]))
    (a, ta, r0, n0), (b, tb, r1, n1) = runs
    assert np.array_equal(a.doc_row, b.doc_row) and np.array_equal(a.n_tokens, b.n_tokens) and ta == tb
    assert r1 == list(np.cumsum([0] + n1[:-1])), "each window's first chunk follows the previous window's last"
    assert a.n_docs == 40 and np.array_equal(np.unique(a.doc_row), np.arange(40))
    q = a.q_rows.tolist()
    assert len(q) == 1 and a.doc_row[q[0]] == 5 and a.n_tokens[q[0]] == 0
    first_chunk = ta[int(np.flatnonzero(a.doc_row == 0)[0])]
    assert first_chunk.startswith(docs[0][0] + " "), "each chunk is embedded after its title"


def test_sentence_mode_does_not_cut_inside_numbers_urls_or_abbreviations(minilm_tokenizer):
    """A sentence ends at a mark followed by whitespace (or a CJK mark): "0.42" and "example.com" stay whole."""
    from core.chunking import _sentence_starts, _word_starts

    text = "The score rose to 0.42 on example.com today. Next sentence here! 第一句。第二句"
    enc = minilm_tokenizer.pieces([text])[0]
    starts = _sentence_starts(text, enc.offsets, _word_starts(enc.word_ids, len(enc.offsets)))
    begun = [text[enc.offsets[j][0] : enc.offsets[j][1]] for j in starts.tolist()]
    assert begun == ["Next", "第", "第"], "after '. ', '! ' and '。' only, not inside 0.42 or example.com"
    sp = Chunker(minilm_tokenizer, ChunkSpec.parse("sentences:12")).split([text])
    assert all(text[b - 1] != "." or text[b : b + 1] in ("", " ") for b in sp.char_end.tolist())


def test_sentence_mode_chunks_overlap(minilm_tokenizer):
    """With OVERLAP > 0 consecutive chunks share pieces: a chunk cut at a sentence end does not make the next
    one start right there."""
    texts = [t for _, t in _english(40)]
    sp = Chunker(minilm_tokenizer, ChunkSpec.parse("sentences:96:24")).split(texts)
    same = sp.doc[1:] == sp.doc[:-1]
    shared = (sp.tok_end[:-1] - sp.tok_start[1:])[same]
    assert len(shared) and (shared > 0).all() and (shared <= 24).all()


def test_a_title_too_long_for_the_window_is_cut_to_leave_half_of_it(minilm_tokenizer):
    """A title of more pieces than the model takes does not shrink the window to one piece: it is cut at a word
    start so that chunks keep at least half the window, and title + chunk still fit the model."""
    title, text = _english(1)[0]
    long_title = " ".join([title] * 30)  # far past 254 pieces
    chunker = Chunker(minilm_tokenizer, ChunkSpec.parse("tokens"))  # window 254
    sp = chunker.split([text], [long_title])
    c, kept = int(sp.title_chars[0]), int(sp.title_tokens[0])
    assert 0 < kept <= 254 - 127 and len(minilm_tokenizer.pieces([long_title[:c]])[0].ids) == kept
    sizes = sp.tok_end - sp.tok_start
    assert (sizes[:-1] >= 127).all() and sizes.max() <= 254 - kept
    for a, b in zip(sp.char_start, sp.char_end):
        _, full = minilm_tokenizer.lengths([f"{long_title[:c]} {text[a:b]}"])
        assert full[0] <= 256
    short = chunker.split([text], [title])
    assert short.title_chars[0] == -1, "a title that fits is kept whole"


def test_a_word_longer_than_the_window_is_cut_at_its_pieces(minilm_tokenizer):
    """A word of more pieces than the window is cut between pieces (the documented exception): every piece is in
    a chunk, and each span is the characters of its pieces, which may tokenize again differently."""
    text = "It was supercalifragilisticexpialidocious indeed."
    enc = minilm_tokenizer.pieces([text])[0]
    sp = Chunker(minilm_tokenizer, ChunkSpec.parse("tokens:4")).split([text])
    cuts = [(int(a), int(b)) for a, b in zip(sp.tok_start, sp.tok_end)]
    assert cuts[0][0] == 0 and cuts[-1][1] == len(enc.ids)
    assert all(b == c for (_, b), (c, _) in zip(cuts, cuts[1:]))
    for (a, b), cs, ce in zip(cuts, sp.char_start.tolist(), sp.char_end.tolist()):
        assert (cs, ce) == (enc.offsets[a][0], enc.offsets[b - 1][1])
    inside = [text[a:b] for a, b in zip(sp.char_start.tolist(), sp.char_end.tolist())]
    assert any(minilm_tokenizer.pieces([t])[0].ids != enc.ids[s:e] for t, (s, e) in zip(inside, cuts))
