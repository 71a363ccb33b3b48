"""The length scan and the batch plan.

``scan_windows`` streams the corpus once in windows (``window_end``: ``plan_window`` rows; with a
smaller first window, as the gpu target's ingest uses, they double up to ``plan_window``) and
learns every text's token count: tokenized exactly (HF tokenizers, Rust), or estimated from its
characters (``LengthEstimate``: the gpu target's default, whose unpadded engine needs budgets, not
exact lengths; the workers tokenize anyway). Each window is planned on its own (``plan_window``), so
its batches can be queued while the next window is read. ``scan_corpus`` is the exact pass kept
whole. What the job keeps is per-row arrays: ``n_tokens`` (int32, tokens after truncation, 0 where
the row is quarantined) and ``id_hash`` (uint64, from the id column alone, for the uniqueness check
and the final id oracle): 12 bytes a row, which a new job writes to files of its own as it goes
(``ScanBuilder``, ``core.rowfile``) rather than holding them. Null, empty and whitespace-only
texts are quarantined here with a reason, and, with exact lengths, texts that tokenize to nothing
(with estimated ones their worker quarantines them); null or duplicate ids stop the job before any
text is read.

``plan_batches`` turns a window's lengths into batches that waste almost no padding, by a token
budget rather than a row count (padded cost of a batch = rows x its longest row, as TEI's
queue counts it):

1. Rows of the same token length form a group (in row order). Each group is cut into full
   batches of ``k = min(batch_rows, batch_tokens // length)`` rows: zero padding.
2. What is left of every group (fewer than ``k`` rows each) is pooled, sorted by length and
   cut greedily under the same budget: padding only between neighbouring lengths.

Within a window, full batches are numbered by the position of their last row (the order in
which a streaming pass completes them), the pooled ones after them; windows follow each other.
The plan depends only on the lengths, the budget and the windows (whose boundaries are arithmetic,
``window_end``), so it is the same on every run: batch ``i`` always holds the same
rows, which is what makes part names deterministic and reruns resumable. A resumed job's
producer streams the corpus again and holds only the open batches (at most one per length and
window, plus the pooled rest) in memory.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from core.envs import cpu_count
from core.errors import InputError
from core.formats import ChunkCols, Plan, Scan
from core.ids import id_hashes
from core.rowfile import RowFile, blocks, release
from pipeline.ingest.read import READ_BATCH_ROWS, Corpus, RowBatch

logger = logging.getLogger(__name__)

__all__ = [
    "Scan",
    "Plan",
    "Window",
    "LengthEstimate",
    "scan_corpus",
    "scan_windows",
    "corpus_id_hashes",
    "assemble_scan",
    "ScanBuilder",
    "check_unique_ids",
    "duplicate_keys",
    "plan_batches",
    "plan_window",
    "QUARANTINE_REASONS",
]

# Version of the windowing + planning rules: part of the job id, so a plan made by other rules is never
# resumed as if it were this one (a rerun re-plans when job.json was not written yet).
PLAN_VERSION = 3
FIRST_WINDOW = 4096  # rows of a job's first window; windows double from here up to plan_window

QUARANTINE_REASONS = {
    "null_text": "the text is null",
    "empty_text": "the text is empty",
    "whitespace_text": "the text holds only whitespace",
    "no_tokens": "the text has no tokens after normalization (control characters only)",
}


def _classify(texts: list) -> tuple[list[int], list[tuple[int, str]]]:
    """(positions of embeddable texts, [(position, reason)] of the rest)."""
    good, bad = [], []
    for i, t in enumerate(texts):
        if t is None:
            bad.append((i, "null_text"))
        elif not t:
            bad.append((i, "empty_text"))
        elif t.isspace():
            bad.append((i, "whitespace_text"))
        else:
            good.append(i)
    return good, bad


@dataclass
class Window:
    """Consecutive rows ``row0 .. row0 + n - 1`` as the streaming scan read them: what it learned
    (lengths, quarantine) and the rows themselves, so their batches can be sent without reading again."""

    row0: int
    n_tokens: np.ndarray  # int32 [n]: tokens after truncation (exact or estimated), 0 = quarantined
    ids: list  # [n] original ids
    texts: list  # [n] texts as embedded (None where null)
    repaired: np.ndarray  # bool [n]
    q_rows: list[int] = field(default_factory=list)  # quarantined rows (global), ascending
    q_ids: list = field(default_factory=list)
    q_reasons: list[str] = field(default_factory=list)
    n_truncated: int = 0
    seconds: float = 0.0  # reading this window and measuring its lengths
    chunks: ChunkCols | None = None  # chunked jobs: a row is a chunk (``row0``: the first chunk's number)
    n_docs: int = 0  # chunked jobs: documents read into this window


def corpus_id_hashes(corpus: Corpus, path: Path | None = None) -> np.ndarray:
    """uint64 [n_rows]: every row's id hash, from the id column alone (no text is read); with ``path``, written to
    that file and mapped from it (``core.rowfile``: a new job's ``scan.id_hash.bin``), else in memory."""
    file = RowFile.create(path, np.uint64, corpus.n_rows) if path is not None else None
    h = file.array if file is not None else np.zeros(corpus.n_rows, dtype=np.uint64)

    def keys(row0: int, arr, m: int) -> None:
        h[row0 : row0 + m] = id_hashes(arr, row0, m)
        release(h[row0 : row0 + m])

    # on threads (NumPy releases the GIL), a few chunks ahead at most; waited for in order, so a bad id (a null)
    # is reported from the first chunk that holds one
    workers = max(1, min(8, cpu_count()))
    with ThreadPoolExecutor(workers, thread_name_prefix="id-keys") as pool:
        ahead: deque = deque()
        for row0, arr, m in corpus.id_arrays():
            ahead.append(pool.submit(keys, row0, arr, m))
            if len(ahead) > 2 * workers:
                ahead.popleft().result()
        while ahead:
            ahead.popleft().result()
    # Arrow's allocator keeps what the id batches freed for a while, more the more batches were read: given back
    # now, what this pass leaves does not grow with the rows
    pa.default_memory_pool().release_unused()
    return h


def window_end(row: int, window_rows: int, first_rows: int = FIRST_WINDOW) -> int:
    """The end of the window that holds ``row``. Windows grow from ``first_rows`` rows, doubling, to
    ``window_rows``, then stay there (0..4096, ..12288, ..28672, ..61440, then steps of 65,536 by default), so
    the first batches are queued after a short scan; the boundaries are arithmetic, the same on every run."""
    end, size = 0, max(1, min(window_rows, first_rows))
    while size < window_rows:
        end += size
        if row < end:
            return end
        size = min(window_rows, 2 * size)
    return end + ((row - end) // window_rows + 1) * window_rows


class LengthEstimate:
    """Token counts estimated from character counts, for plans that need no exact budgets (``--lengths estimate``).

    Tokenizing every text in the producer only to learn its length costs as much host CPU as the workers'
    own tokenization, while this estimate costs next to nothing. A text of ``c`` characters of which ``m``
    are wide (3- and 4-byte UTF-8: CJK, which BERT splits one token a character) is estimated at
    ``2 + m + ceil((c - m) * num / den)`` tokens, capped at ``max_seq_len``; ``num / den`` is the ratio of
    word-piece tokens to other characters, measured by tokenizing the first embeddable texts of the corpus's
    first window (``CALIBRATION_TEXTS`` or ``CALIBRATION_CHARS``), in integers, so the estimate (and the plan)
    is the same on every run and host. Where wide characters do not make one token each (runs of emoji, one
    [UNK] a run) the ratio covers every character (``wide_one`` False); a first window with nothing to embed
    gets ``FALLBACK``, with a warning. Summed over a batch the estimate comes close to the exact count
    (closest for long documents), which is what budgets need; single documents vary more. Workers tokenize
    exactly; the Triton client splits any request over the server's token limit, and a text that turns out
    to have no tokens is quarantined by its worker.
    """

    CALIBRATION_TEXTS = 2048  # at most this many texts ...
    CALIBRATION_CHARS = 1_000_000  # ... or characters (about 250,000 English tokens), whichever comes first
    FALLBACK = (1, 4)  # tokens a character when the first window has nothing to measure
    exact = False  # the scan counts truncated rows only from exact lengths

    def __init__(self, num: int, den: int, max_seq_len: int, wide_one: bool = True) -> None:
        self.num, self.den, self.max_seq_len = int(num), max(1, int(den)), max_seq_len
        self.wide_one = wide_one  # wide characters one token each (else every character by the ratio)

    @classmethod
    def calibrate(cls, texts: list, tokenizer) -> LengthEstimate:
        """Measure the ratio on the first embeddable ones of ``texts`` (the corpus's first window, in row order;
        ``tokenizer``: a ``core.tokenize.Tokenizer`` or ``dll.wordpiece.FastTokenizer``)."""
        good, _ = _classify(texts)
        sample: list[str] = []
        n_chars = 0
        for i in good:
            if len(sample) >= cls.CALIBRATION_TEXTS or n_chars >= cls.CALIBRATION_CHARS:
                break
            sample.append(texts[i])
            n_chars += len(texts[i])
        if not sample:
            logger.warning(
                "the first window (%d rows) has no text to embed: token lengths are estimated at %d/%d "
                "tokens a character, so batches may miss --batch-tokens",
                len(texts),
                *cls.FALLBACK,
            )
            return cls(*cls.FALLBACK, tokenizer.max_seq_len)
        _, full = tokenizer.lengths(sample)
        chars, wide = _char_counts(sample)
        pieces = int(full.sum(dtype=np.int64)) - 2 * len(sample)  # word pieces, [CLS] and [SEP] left out
        num, den = pieces - int(wide.sum()), int((chars - wide).sum())
        wide_one = True
        if den <= 0:  # wide characters only: nothing to measure the others on
            num, den = cls.FALLBACK
        elif num <= 0:  # wide characters that share tokens (emoji runs: one [UNK] a run)
            num, den, wide_one = pieces, int(chars.sum()), False
            if num <= 0:
                num, den = cls.FALLBACK
        g = math.gcd(num, den)
        logger.info(
            "token lengths estimated from characters: %.3f tokens a character%s (measured on the first %d texts)",
            num / den,
            ", wide ones one each" if wide_one else "",
            len(sample),
        )
        return cls(num // g, den // g, tokenizer.max_seq_len, wide_one)

    def lengths(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(int32 estimated tokens after truncation, int32 before it), as ``Tokenizer.lengths`` answers."""
        chars, wide = _char_counts(texts)
        if not self.wide_one:
            wide = np.zeros_like(wide)
        full = 2 + wide + -(-(chars - wide) * self.num // self.den)  # int64: (chars * num) < 2**63 for any text
        full = np.minimum(full, np.iinfo(np.int32).max)
        return np.minimum(full, self.max_seq_len).astype(np.int32), full.astype(np.int32)


def _char_counts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(int64 characters, int64 wide characters) of each text; wide = encoded in 3 or 4 bytes of UTF-8 (CJK,
    emoji and beyond: U+0800 up), counted by their lead bytes (0xE0 and above). Pure-ASCII texts (a flag
    Python keeps) are skipped; no Arrow array is made from the list, since pyarrow's first ``pa.array``
    imports pandas where it is installed (a slow import, on the way to the first batch)."""
    chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    wide = np.zeros(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        if not t.isascii():
            b = t.encode("utf-8", "surrogatepass")
            wide[i] = len(b) - len(b.translate(None, _WIDE_LEADS))
    return chars, wide


_WIDE_LEADS = bytes(range(0xE0, 0x100))


def scan_windows(
    corpus: Corpus,
    tokenizer,
    window_rows: int,
    progress: Callable[[int], None] | None = None,
    first_rows: int = FIRST_WINDOW,
    estimate: bool = False,
    chunker=None,
) -> Iterator[Window]:
    """The corpus in windows (``window_end``: ``first_rows`` rows, doubling up to ``window_rows``; the last
    one shorter), each with its rows' token lengths and quarantine. The boundaries are arithmetic, whatever
    the files and record batches, so the windows (and the plan) are the same on every run.

    ``tokenizer`` is a ``core.tokenize.Tokenizer`` or ``dll.wordpiece.FastTokenizer`` (truncates at the model's
    max_seq_len). Lengths are
    exact, or with ``estimate`` a ``LengthEstimate`` calibrated on the first window's texts (held until that
    window is read whole, so the sample is the same whatever the files and record batches). Ids are not
    checked here: ``corpus_id_hashes`` + ``check_unique_ids`` do that before anything is read.

    With ``chunker`` (a ``core.chunking.Chunker``) the windows are still cut by documents, but their rows are
    chunks (``_chunk_rows``), numbered on from the previous window's, with exact lengths.
    """
    import time

    lengths = None if estimate and chunker is None else tokenizer
    next_chunk = 0  # chunked: the number of the next window's first chunk
    held: list[RowBatch] = []  # the first window's rows while the estimate waits for them
    w: Window | None = None
    t = time.perf_counter()

    def complete() -> Window:
        nonlocal lengths, next_chunk
        assert w is not None, "complete() closes the open window"
        next_chunk += len(w.n_tokens) if chunker is not None else 0
        if lengths is None:
            lengths = LengthEstimate.calibrate([x for rb in held for x in rb.texts], tokenizer)
            for rb in held:
                _scan_rows(rb, lengths, w)
            held.clear()
        w.seconds = time.perf_counter() - t
        return w

    # record batches no bigger than the first window: its rows are decoded first, not 32,768 of them, so the
    # first window is ready sooner, and later batches cost the same per row
    for whole in corpus.batches(max(1, min(READ_BATCH_ROWS, first_rows)), split_title=chunker is not None):
        for rb in _split_at(whole, window_rows, first_rows):
            if w is None:
                row0 = rb.row0 if chunker is None else next_chunk
                w = Window(row0, np.zeros(0, dtype=np.int32), [], [], np.zeros(0, dtype=bool))
                w_end = window_end(rb.row0, window_rows, first_rows)
            if chunker is not None:
                _chunk_rows(rb, chunker, w)
            elif lengths is None:
                held.append(rb)
            else:
                _scan_rows(rb, lengths, w)
            if progress:
                progress(len(rb))
            if rb.row0 + len(rb) == w_end:
                yield complete()
                w, t = None, time.perf_counter()  # the consumer's time between windows is not the scan's
    if w is not None:
        yield complete()


def _split_at(rb: RowBatch, window_rows: int, first_rows: int = FIRST_WINDOW) -> Iterator[RowBatch]:
    """``rb`` cut where a window boundary (``window_end``) falls inside it."""
    start = 0
    while start < len(rb):
        end = min(len(rb), window_end(rb.row0 + start, window_rows, first_rows) - rb.row0)
        if start == 0 and end == len(rb):
            yield rb
            return
        yield RowBatch(
            rb.row0 + start,
            rb.ids[start:end],
            rb.id_array.slice(start, end - start) if rb.id_array is not None else None,
            rb.texts[start:end],
            rb.repaired[start:end],
            rb.titles[start:end] if rb.titles is not None else None,
        )
        start = end


def _scan_rows(rb: RowBatch, tokenizer, w: Window) -> None:
    """Append ``rb``'s lengths, quarantine and contents to the window ``w``."""
    n_tokens = np.zeros(len(rb), dtype=np.int32)
    good, bad = _classify(rb.texts)
    if good:
        lens, full = tokenizer.lengths([rb.texts[i] for i in good])
        idx = np.asarray(good, dtype=np.int64)
        empty = lens <= 2  # [CLS] [SEP] only
        for j in np.flatnonzero(empty):
            bad.append((good[int(j)], "no_tokens"))
        keep = ~empty
        n_tokens[idx[keep]] = lens[keep]
        if getattr(tokenizer, "exact", True):
            w.n_truncated += int((full > lens)[keep].sum())
    for i, reason in sorted(bad):
        w.q_rows.append(rb.row0 + i)
        w.q_ids.append(rb.ids[i])
        w.q_reasons.append(reason)
    w.n_tokens = np.concatenate([w.n_tokens, n_tokens])
    w.repaired = np.concatenate([w.repaired, rb.repaired])
    w.ids.extend(rb.ids)
    w.texts.extend(rb.texts)


def _chunk_rows(rb: RowBatch, chunker, w: Window) -> None:
    """Append ``rb``'s documents to the chunked window ``w``, a row per chunk (``chunker``: a
    ``core.chunking.Chunker``): each document's chunks in order, or one row without tokens for a document that
    is quarantined (its reason as ``_scan_rows`` gives it), so every document has at least one row."""
    n = len(rb)
    good, bad = _classify(rb.texts)
    titles = rb.titles
    sp = chunker.split([rb.texts[i] for i in good], [titles[i] for i in good] if titles is not None else None)
    per_good = np.bincount(sp.doc, minlength=len(good)) if len(good) else np.zeros(0, np.int64)
    for j in np.flatnonzero(per_good == 0):
        bad.append((good[int(j)], "no_tokens"))
    per_doc = np.ones(n, dtype=np.int64)
    good_idx = np.asarray(good, dtype=np.int64)
    per_doc[good_idx] = np.maximum(per_good, 1)
    first = np.concatenate([[0], np.cumsum(per_doc)[:-1]]).astype(np.int64)
    n_units = int(per_doc.sum())
    base = w.row0 + len(w.n_tokens)  # the number of this batch's first chunk
    doc_of_unit = np.repeat(np.arange(n, dtype=np.int64), per_doc)
    cols = ChunkCols.empty()
    cols = ChunkCols(*(np.zeros(n_units, a.dtype) for a in cols.arrays()))
    cols.doc_row = rb.row0 + doc_of_unit
    pos = first[good_idx[sp.doc]] + sp.chunk if len(sp.doc) else np.zeros(0, np.int64)
    cols.chunk[pos], cols.tok_start[pos], cols.tok_end[pos] = sp.chunk, sp.tok_start, sp.tok_end
    cols.char_start[pos], cols.char_end[pos] = sp.char_start, sp.char_end
    title_tok = np.zeros(n, dtype=np.int64)
    title_tok[good_idx] = sp.title_tokens
    title_chars = np.full(n, -1, dtype=np.int64)
    title_chars[good_idx] = sp.title_chars
    want = 2 + title_tok[doc_of_unit[pos]] + (sp.tok_end - sp.tok_start)  # tokens with the title, [CLS], [SEP]
    n_tokens = np.zeros(n_units, dtype=np.int32)
    n_tokens[pos] = np.minimum(want, chunker.max_seq_len)
    w.n_truncated += int((want > chunker.max_seq_len).sum())
    texts: list[str | None] = [None] * n_units
    for p, d, a, b in zip(pos.tolist(), doc_of_unit[pos].tolist(), sp.char_start.tolist(), sp.char_end.tolist()):
        t, ti = rb.texts[d], titles[d] if titles is not None else None
        if ti is not None and title_chars[d] >= 0:  # a title too long for the window: its first words
            ti = ti[: title_chars[d]]
        texts[p] = f"{ti} {t[a:b]}" if ti and ti.strip() else t[a:b]
    for i, reason in sorted(bad):
        w.q_rows.append(base + int(first[i]))
        w.q_ids.append(rb.ids[i])
        w.q_reasons.append(reason)
    w.n_tokens = np.concatenate([w.n_tokens, n_tokens])
    w.repaired = np.concatenate([w.repaired, rb.repaired[doc_of_unit]])
    w.ids.extend(rb.ids[d] for d in doc_of_unit.tolist())
    w.texts.extend(texts)
    w.chunks = cols if w.chunks is None else ChunkCols.concat([w.chunks, cols])
    w.n_docs += n


class ScanBuilder:
    """A job's ``Scan``, put together window by window as the scan reads them (``add``), so the windows need not
    be kept. With ``lengths`` (a path: ``scan.n_tokens.bin``; rows, not chunks) their token counts go straight to
    that file, mapped (``core.rowfile``); else they are kept in memory."""

    def __init__(self, corpus: Corpus, lengths: Path | None = None) -> None:
        self.corpus = corpus
        self._file = RowFile.create(lengths, np.int32, corpus.n_rows) if lengths is not None else None
        self._n_tokens: list[np.ndarray] = []
        self._chunks: list[ChunkCols] = []
        self.q_rows: list[int] = []
        self.q_ids: list = []
        self.q_reasons: list[str] = []
        self.n_rows = self.n_docs = self.n_truncated = self.n_repaired = self.n_embeddable = self.tokens = 0
        self.seconds = 0.0

    def _changed(self, rows: int) -> InputError:
        return InputError(
            f"{self.corpus.uri} yielded {rows} rows, its metadata says {self.corpus.n_rows}: the corpus "
            "changed while it was read; do not modify a corpus during an ingest, then rerun"
        )

    def add(self, w: Window) -> None:
        """The next window's lengths, quarantine and counts."""
        n = len(w.n_tokens)
        if self._file is not None and w.chunks is None:
            if w.row0 != self.n_rows or w.row0 + n > len(self._file.array):
                raise self._changed(w.row0 + n)
            dst = self._file.array[w.row0 : w.row0 + n]
            dst[:] = w.n_tokens
            release(dst)
        else:
            self._n_tokens.append(w.n_tokens)
        if w.chunks is not None:
            self._chunks.append(w.chunks)
            self.n_docs += w.n_docs
        self.n_rows += n
        self.n_embeddable += int(np.count_nonzero(w.n_tokens))
        self.tokens += int(w.n_tokens.sum(dtype=np.int64))
        self.q_rows.extend(w.q_rows)
        self.q_ids.extend(w.q_ids)
        self.q_reasons.extend(w.q_reasons)
        self.n_truncated += w.n_truncated
        self.n_repaired += int(w.repaired.sum())
        self.seconds += w.seconds

    def scan(self, id_hash: np.ndarray, estimated: bool = False) -> Scan:
        """The whole-corpus ``Scan`` from the windows added (in order) and the id hashes (``estimated``: their
        lengths are ``LengthEstimate``'s, which the log says)."""
        corpus, chunked = self.corpus, bool(self._chunks)
        if (self.n_docs if chunked else self.n_rows) != corpus.n_rows:
            raise self._changed(self.n_rows)
        if self._file is not None and not self._n_tokens:
            n_tokens = self._file.array
        else:
            n_tokens = np.concatenate(self._n_tokens) if self._n_tokens else np.zeros(0, dtype=np.int32)
        scan = Scan(
            corpus.n_rows,
            n_tokens,
            id_hash,
            np.asarray(self.q_rows, dtype=np.int64),
            self.q_ids,
            self.q_reasons,
            self.n_truncated,
            self.n_repaired,
            self.seconds,
        )
        if chunked:  # rows are chunks: the id oracle checks each chunk against its document's id
            doc_row = ChunkCols.concat(self._chunks).doc_row
            scan.id_hash, scan.doc_row, scan.n_docs = id_hash[doc_row], doc_row, corpus.n_rows
            scan.n_rows = self.n_rows
            logger.info("cut %d documents into %d chunks", corpus.n_rows, self.n_rows)
        truncated = (
            "workers count truncation and texts without tokens" if estimated else f"{self.n_truncated} truncated"
        )
        logger.info(
            "scanned %d rows in %.1fs: %d to embed (%s%d tokens), %d quarantined, %d repaired, %s",
            scan.n_rows,
            scan.seconds,
            self.n_embeddable,
            "about " if estimated else "",
            self.tokens,
            len(scan.q_rows),
            scan.n_repaired,
            truncated,
        )
        return scan


def assemble_scan(corpus: Corpus, id_hash: np.ndarray, windows: list[Window], estimated: bool = False) -> Scan:
    """The whole-corpus ``Scan`` from its windows (in order) and the id hashes, in memory (``ScanBuilder``)."""
    builder = ScanBuilder(corpus)
    for w in windows:
        builder.add(w)
    return builder.scan(id_hash, estimated)


def scan_corpus(corpus: Corpus, tokenizer, progress: Callable[[int], None] | None = None) -> Scan:
    """The id check, then one pass: token lengths and quarantine of every row (windows dropped as read).

    Raises ``InputError`` for null or duplicate ids before any text is read.
    """
    id_hash = corpus_id_hashes(corpus)
    check_unique_ids(corpus, id_hash)
    windows = []
    for w in scan_windows(corpus, tokenizer, READ_BATCH_ROWS, progress):
        w.ids, w.texts = [], []  # keep only what the Scan needs
        windows.append(w)
    return assemble_scan(corpus, id_hash, windows)


SORT_ROWS = 1 << 18  # id keys sorted at once (2 MB); more are first spread over bucket files
MAX_BUCKETS = 256  # bucket files at most (open at once): past 33 M keys, buckets grow past SORT_ROWS / 2


def duplicate_keys(id_hash: np.ndarray, spill: Path | None = None) -> np.ndarray:
    """The id keys that occur more than once in ``id_hash``, sorted. Up to ``SORT_ROWS`` keys (or with no
    ``spill`` folder) they are sorted in memory; more are spread over unnamed bucket files in ``spill`` by a
    multiplicative hash of the key, about ``SORT_ROWS / 2`` keys a bucket (at most ``MAX_BUCKETS`` buckets), and
    each bucket is sorted on its own: a key's copies share a bucket, and memory is that of one bucket (4 MB at
    100 M rows, 32 MB at a billion)."""
    n = len(id_hash)
    if n <= SORT_ROWS or spill is None:
        keys = np.sort(id_hash)  # the common case, no duplicate, needs no order (argsort: 3x the time)
        release(id_hash)
        return np.unique(keys[1:][keys[1:] == keys[:-1]])
    n_buckets = min(MAX_BUCKETS, -(-n // (SORT_ROWS // 2)))
    files: list = []
    try:
        files.extend(tempfile.TemporaryFile(dir=spill) for _ in range(n_buckets))
        for _, block in blocks(id_hash, _SPREAD_BYTES):
            with np.errstate(over="ignore"):
                which = ((block * _FIB) >> np.uint64(32)) * np.uint64(n_buckets) >> np.uint64(32)
            which = which.astype(np.uint8)  # MAX_BUCKETS fit: a stable sort of bytes is a radix sort
            order = np.argsort(which, kind="stable")
            ends = np.cumsum(np.bincount(which, minlength=n_buckets))
            grouped = block[order]
            for k, (lo, hi) in enumerate(zip([0, *ends[:-1].tolist()], ends.tolist())):
                if hi > lo:
                    files[k].write(grouped[lo:hi].tobytes())
        found = []
        for f in files:
            f.seek(0)
            keys = np.frombuffer(f.read(), dtype=np.uint64).copy()
            keys.sort()
            same = keys[1:][keys[1:] == keys[:-1]]
            if len(same):
                found.append(np.unique(same))
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.uint64)
    finally:
        for f in files:
            f.close()


assert MAX_BUCKETS <= 256, "bucket numbers are sorted as bytes"
_SPREAD_BYTES = 2 << 20  # keys spread over the buckets at a time (with their temporaries, about 4x this)
_FIB = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: spreads consecutive integer ids over the buckets


def check_unique_ids(corpus: Corpus, id_hash: np.ndarray, show: int = 5, spill: Path | None = None) -> None:
    """Raise ``InputError`` naming duplicate ids (hash collisions are confirmed on the real ids); ``spill``: a
    folder for ``duplicate_keys``' bucket files."""
    if corpus.id_column is None or id_hash.size < 2:
        return
    cand_hashes = duplicate_keys(id_hash, spill)
    if not len(cand_hashes):
        return
    cand_rows = np.concatenate([s + np.flatnonzero(np.isin(b, cand_hashes)) for s, b in blocks(id_hash)])
    # second, id-only pass: fetch the candidates' real ids
    values: dict[int, object] = {}
    for row0, arr, m in corpus.id_arrays():
        assert arr is not None, "an id column is set, so every batch has ids"
        lo, hi = np.searchsorted(cand_rows, [row0, row0 + m])
        if hi > lo:
            local = cand_rows[lo:hi] - row0
            for r, v in zip(cand_rows[lo:hi].tolist(), arr.take(local).to_pylist()):
                values[r] = v
    groups: dict[object, list[int]] = {}
    for r in sorted(values):
        groups.setdefault(values[r], []).append(r)
    dups = {k: v for k, v in groups.items() if len(v) > 1}
    if not dups:
        return
    shown = "; ".join(f"{k!r} at rows {', '.join(map(str, v[:4]))}" for k, v in list(dups.items())[:show])
    more = f" and {len(dups) - show} more" if len(dups) > show else ""
    raise InputError(
        f"id column {corpus.id_column!r} has {len(dups)} duplicate id(s): {shown}{more}. Ids must be "
        "unique (FAISS does not deduplicate): deduplicate the corpus, or pass --id-column with a "
        "unique column"
    )


def plan_batches(n_tokens: np.ndarray, batch_tokens: int, batch_rows: int) -> Plan:
    """Token-budget batches over the rows with ``n_tokens > 0`` (see the module docstring).

    ``batch_tokens``: most padded tokens per batch (rows x longest row); a row longer than the
    budget gets a batch of its own. ``batch_rows``: most rows per batch.
    """
    if batch_tokens < 1 or batch_rows < 1:
        raise ValueError("batch_tokens and batch_rows must be >= 1")
    rows = np.flatnonzero(n_tokens > 0).astype(np.int64)
    by_len = rows[np.argsort(n_tokens[rows], kind="stable")]  # ascending length; row order within a length
    lens = n_tokens[by_len].astype(np.int64)
    values, starts, counts = np.unique(lens, return_index=True, return_counts=True)

    full: list[tuple[int, np.ndarray, int]] = []  # (last row id, rows, length)
    rest_parts: list[np.ndarray] = []
    for length, s, c in zip(values.tolist(), starts.tolist(), counts.tolist()):
        k = max(1, min(batch_rows, batch_tokens // length))
        group = by_len[s : s + c]
        nfull = c // k
        if nfull:
            blocks = group[: nfull * k].reshape(nfull, k)
            full.extend((int(b[-1]), b, length) for b in blocks)
        if c - nfull * k:
            rest_parts.append(group[nfull * k :])
    full.sort(key=lambda x: x[0])

    batches: list[np.ndarray] = [b for _, b, _ in full]
    padded: list[int] = [ln for _, _, ln in full]
    if rest_parts:
        rest = np.concatenate(rest_parts)  # still ascending by length
        rlen = n_tokens[rest].astype(np.int64)
        start, n = 0, len(rest)
        while start < n:
            # largest end with (end - start) * rlen[end - 1] <= budget; rlen is non-decreasing
            lo, hi = start + 1, min(n, start + batch_rows)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if (mid - start) * rlen[mid - 1] <= batch_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            end = lo
            batches.append(np.sort(rest[start:end]))
            padded.append(int(rlen[end - 1]))
            start = end
    batches = [np.sort(b) for b in batches]
    sizes = np.array([len(b) for b in batches], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    order = np.concatenate(batches).astype(np.int64) if batches else np.zeros(0, dtype=np.int64)
    tokens = np.add.reduceat(n_tokens[order].astype(np.int64), offsets[:-1]) if batches else np.zeros(0, dtype=np.int64)
    plan = Plan(order, offsets, np.asarray(padded, dtype=np.int32), tokens)
    logger.info(
        "planned %d batches over %d rows (%d full-length groups, padding %.1f%%)",
        plan.n_batches,
        plan.n_rows,
        len(full),
        100 * plan.padding_ratio(),
    )
    return plan


def plan_window(n_tokens: np.ndarray, row0: int, batch_tokens: int, batch_rows: int) -> Plan:
    """``plan_batches`` over one window's rows (``n_tokens`` of rows ``row0 ..``), with global row ids."""
    plan = plan_batches(n_tokens, batch_tokens, batch_rows)
    plan.order = plan.order + row0
    return plan
