"""The length scan and the token-budget planner (pipeline/ingest/plan.py), and batch assembly (produce.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import CorpusConfig
from core.errors import InputError
from pipeline.ingest.plan import plan_batches, scan_corpus
from pipeline.ingest.produce import batch_messages
from pipeline.ingest.read import open_corpus


def _check_plan(n_tokens: np.ndarray, budget: int, max_rows: int):
    plan = plan_batches(n_tokens, budget, max_rows)
    planned = np.flatnonzero(n_tokens > 0)
    assert np.array_equal(np.sort(plan.order), planned), "every embeddable row exactly once"
    for i in range(plan.n_batches):
        rows = plan.rows(i)
        assert np.all(np.diff(rows) > 0)
        assert len(rows) <= max_rows
        assert plan.padded_len[i] == n_tokens[rows].max()
        assert len(rows) == 1 or len(rows) * plan.padded_len[i] <= budget
        assert plan.tokens[i] == n_tokens[rows].sum()
    return plan


def test_plan_covers_every_row_once_within_budget():
    rng = np.random.default_rng(0)
    n_tokens = rng.integers(3, 300, 20_000).astype(np.int32)
    n_tokens[rng.random(20_000) < 0.05] = 0  # quarantined rows are not planned
    n_tokens[7] = 5000  # longer than the budget: a batch of its own
    plan = _check_plan(n_tokens, 4096, 128)
    assert plan.padding_ratio() < 0.02  # length-homogeneous batches waste almost nothing
    again = plan_batches(n_tokens, 4096, 128)
    assert np.array_equal(plan.order, again.order) and np.array_equal(plan.offsets, again.offsets)


def test_full_batches_have_zero_padding_and_complete_in_row_order():
    n_tokens = np.array([10] * 50 + [20] * 30, dtype=np.int32)
    plan = _check_plan(n_tokens, 200, 1000)  # k = 20 rows of length 10, 10 rows of length 20
    full = [i for i in range(plan.n_batches) if plan.sizes()[i] in (20, 10) and len(set(n_tokens[plan.rows(i)])) == 1]
    assert len(full) >= 5
    lasts = [plan.rows(i)[-1] for i in range(plan.n_batches)]
    assert lasts[:5] == sorted(lasts[:5])


def test_scan_quarantines_unusable_texts_and_flags_truncation(tmp_path, minilm_tokenizer):

    texts = ["a normal sentence", None, "", "   \t\n", "\x00\x01\x02", "word " * 2000, "ok"]
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), p)
    scan = scan_corpus(open_corpus(str(p), CorpusConfig()), minilm_tokenizer)
    reasons = dict(zip(scan.q_rows.tolist(), scan.q_reasons))
    assert reasons == {1: "null_text", 2: "empty_text", 3: "whitespace_text", 4: "no_tokens"}
    assert scan.n_tokens[[1, 2, 3, 4]].tolist() == [0, 0, 0, 0]
    assert scan.n_tokens[5] == 256 and scan.n_truncated == 1


@pytest.mark.parametrize("ids", [["a", "b", "a", "c"], [1, 2, 3, 2]])
def test_duplicate_ids_stop_the_scan_and_are_named(tmp_path, minilm_tokenizer, ids):

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ids, "text": ["x y", "y z", "z w", "w v"]}), p)
    with pytest.raises(InputError, match=r"duplicate id.*rows 1, 3|duplicate id.*rows 0, 2"):
        scan_corpus(open_corpus(str(p), CorpusConfig()), minilm_tokenizer)


def test_batch_messages_follow_the_plan_and_skip_done_batches(tmp_path, minilm_tokenizer):

    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    texts = [" ".join(rng.choice(words, rng.integers(1, 30))) for _ in range(500)]
    texts[17] = None
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(500)], "text": texts}), p, row_group_size=64)
    corpus = open_corpus(str(p), CorpusConfig())
    scan = scan_corpus(corpus, minilm_tokenizer)
    plan = plan_batches(scan.n_tokens, 256, 32)
    msgs = list(batch_messages(corpus, plan, job="j", out="/o", model="m", dim=8))
    assert sorted(m["batch"] for m in msgs) == list(range(plan.n_batches))
    for m in msgs:
        assert m["row_ids"] == plan.rows(m["batch"]).tolist()
        assert m["ids"] == [f"d{r}" for r in m["row_ids"]]
        assert m["texts"] == [texts[r] for r in m["row_ids"]]
    skipped = list(batch_messages(corpus, plan, job="j", out="/o", model="m", dim=8, skip={0, 1, 2}))
    assert sorted(m["batch"] for m in skipped) == list(range(3, plan.n_batches))


def test_batches_go_out_while_later_windows_are_still_unread(tmp_path, minilm_tokenizer, minilm_meta):
    """scan_and_send plans each window alone and sends its batches before reading the next window; the
    saved plan is the concatenation, the same on a rerun, and matches what was sent, row for row."""
    from core.config import FbasConfig
    from core.layout import OutputDir
    from pipeline.ingest.job import JobContext, resume_job
    from pipeline.ingest.plan import corpus_id_hashes
    from pipeline.ingest.stream import scan_and_send, start_scan

    rng = np.random.default_rng(2)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    texts = [" ".join(rng.choice(words, rng.integers(1, 40))) for _ in range(700)]
    texts[5], texts[402] = None, "   "
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(700)], "text": texts}), p, row_group_size=100)
    cfg = FbasConfig()
    cfg.corpus.batch_tokens, cfg.corpus.batch_rows, cfg.corpus.plan_window = 512, 40, 200
    corpus = open_corpus(str(p), cfg.corpus)
    tok, meta = minilm_tokenizer, minilm_meta
    read_rows: list[int] = []
    real_lengths = tok.lengths
    tok.lengths = lambda batch: (read_rows.append(len(batch)), real_lengths(batch))[1]
    sent: list[tuple[dict, int]] = []  # (message, texts read when it was sent)
    out = OutputDir(tmp_path / "out")

    def send_all(out: OutputDir, send, skip: set[int]):
        ctx = JobContext(corpus, cfg, out, meta)
        with start_scan(ctx, tok) as windows:
            return scan_and_send(ctx, windows, corpus_id_hashes(corpus), send, skip)

    job = send_all(out, lambda m: sent.append((m, sum(read_rows))), skip={3})
    plan = job.plan
    assert [m["batch"] for m, _ in sent] == [b for b in range(plan.n_batches) if b != 3]
    assert sent[0][1] <= 600  # the first window's batches left before the rest was read
    #                                              (the scan reads ahead by one window, beside the one it sends)
    assert sum(read_rows) == 698  # every embeddable text was tokenized once
    for m, _ in sent:
        assert m["row_ids"] == plan.rows(m["batch"]).tolist()
        assert m["texts"] == [texts[r] for r in m["row_ids"]] and m["ids"] == [f"d{r}" for r in m["row_ids"]]
        assert max(m["row_ids"]) - min(m["row_ids"]) < 200  # a batch never spans two windows
    assert sorted(np.concatenate([plan.order, job.scan.q_rows]).tolist()) == list(range(700))
    assert job.scan.q_rows.tolist() == [5, 402]
    again = resume_job(JobContext(corpus, cfg, out, meta))  # what a rerun finds in the folder
    assert again is not None and again.id == job.id
    assert np.array_equal(again.plan.order, plan.order) and np.array_equal(again.plan.offsets, plan.offsets)
    # a run stopped before job.json was written plans again from scratch: the same batches
    fresh = send_all(OutputDir(tmp_path / "out2"), lambda m: None, skip=set())
    assert np.array_equal(fresh.plan.order, plan.order) and np.array_equal(fresh.plan.offsets, plan.offsets)
    # growing windows (--first-window 50: rows 0-49, 50-149, 150-349, then 200 each): batches stay inside them
    cfg.corpus.first_window = 50
    grown_sent: list[dict] = []
    grown = send_all(OutputDir(tmp_path / "out3"), grown_sent.append, skip=set())
    assert grown.id != job.id, "the window schedule is part of the job's identity"
    bounds = [0, 50, 150, 350, 550, 700]
    for m in grown_sent:
        k = np.searchsorted(bounds, min(m["row_ids"]), side="right")
        assert max(m["row_ids"]) < bounds[k], f"batch {m['batch']} spans two windows"
    assert sorted(r for m in grown_sent for r in m["row_ids"]) == sorted(plan.order.tolist())


def test_the_first_window_is_small_only_for_the_unpadded_gpu_target():
    from core.config import FbasConfig
    from pipeline.ingest.job import first_window

    cfg = FbasConfig()
    assert first_window(cfg) == cfg.corpus.plan_window == 65536  # onnx pads: one size of window
    cfg.engine.target = "gpu"
    assert first_window(cfg) == 4096
    cfg.corpus.plan_window = 1000
    assert first_window(cfg) == 1000
    cfg.corpus.first_window = 300
    assert first_window(cfg) == 300


def test_read_ahead_produces_on_a_thread_in_order_and_stops_when_closed():
    """The window scan runs one window ahead on a thread: items come in order, the producer works while the
    consumer is busy, its error arrives after the items before it, and closing early stops it."""
    import threading
    import time

    from pipeline.ingest.read import ReadAhead

    produced: list[int] = []
    second_ready = threading.Event()

    def gen(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"window {i} is unreadable")
            produced.append(i)
            if i == 1:
                second_ready.set()
            yield i

    it = ReadAhead(gen(5))
    assert next(it) == 0
    assert second_ready.wait(5), "item 1 was produced while the consumer held item 0"
    assert list(it) == [1, 2, 3, 4]
    got = []
    with pytest.raises(ValueError, match="window 3"):
        for x in ReadAhead(gen(10, fail_at=3)):
            got.append(x)
    assert got == [0, 1, 2]
    produced.clear()
    it = ReadAhead(gen(1000))
    assert next(it) == 0
    it.close()  # the consumer stopped (an error while sending, say)
    n = len(produced)
    time.sleep(0.3)
    assert n == len(produced) <= 3, "the producer stopped after at most one item beyond the queue"
    # cancelled but not closed: next() gives what was already made, then stops instead of waiting forever
    it = ReadAhead(gen(1000))
    assert next(it) == 0
    it.cancel()
    t0 = time.monotonic()
    rest = list(it)
    assert time.monotonic() - t0 < 5 and len(rest) <= 2 and rest == list(range(1, 1 + len(rest)))


def test_a_started_scan_works_before_anyone_asks_and_stops_when_cancelled_or_closed():
    """``ReadAhead`` (what ingest starts as soon as the ids are checked) produces from construction on, before the
    first ``next``; ``cancel`` stops it without waiting, ``close`` (or ``with``) waits, both before any ``next``."""
    import threading
    import time

    from pipeline.ingest.read import ReadAhead

    started = threading.Event()
    produced: list[int] = []

    def gen(n):
        started.set()
        for i in range(n):
            produced.append(i)
            yield i

    ahead = ReadAhead(gen(1000))
    assert started.wait(5), "the producer started with no consumer yet"
    time.sleep(0.1)
    assert 1 <= len(produced) <= 3
    ahead.cancel()
    time.sleep(0.3)
    n = len(produced)
    assert n <= 3 and not ahead._thread.is_alive(), "cancel stopped it, without a next or a close"
    ahead.close()
    assert next(ahead, "end") == "end", "a closed scan yields nothing more"
    produced.clear()
    with ReadAhead(gen(5)) as it:
        assert list(it) == [0, 1, 2, 3, 4]
    with ReadAhead(gen(1000)) as it:
        assert next(it) == 0
    assert not it._thread.is_alive() and len(produced) <= 5 + 3


def test_windows_start_at_multiples_of_the_window_whatever_the_files(tmp_path, minilm_tokenizer):
    """Window k holds rows k*W .. (k+1)*W - 1 across files of any size (an empty one too) and row groups,
    so a rerun finds the same windows; the rows and lengths equal the one-window scan's."""
    from pipeline.ingest.plan import scan_windows

    rng = np.random.default_rng(3)
    folder = tmp_path / "corpus"
    folder.mkdir()
    row = 0
    for k, (n, group) in enumerate([(130, 17), (0, 10), (45, 45), (301, 64), (7, 3)]):
        texts = [" ".join(rng.choice(["one", "two", "three", "four"], rng.integers(1, 20))) for _ in range(n)]
        pq.write_table(
            pa.table(
                {"id": pa.array([f"f{k}-{i}" for i in range(n)], pa.string()), "text": pa.array(texts, pa.string())}
            ),
            folder / f"part-{k}.parquet",
            row_group_size=group,
        )
        row += n
    corpus = open_corpus(str(folder), CorpusConfig())
    tok = minilm_tokenizer
    whole = scan_corpus(corpus, tok)
    windows = list(scan_windows(corpus, tok, 50))
    assert [w.row0 for w in windows] == list(range(0, row, 50))
    assert [len(w.texts) for w in windows] == [50] * (row // 50) + ([row % 50] if row % 50 else [])
    assert np.array_equal(np.concatenate([w.n_tokens for w in windows]), whole.n_tokens)
    assert [i for w in windows for i in w.ids] == [
        f"f{k}-{i}" for k, n in enumerate([130, 0, 45, 301, 7]) for i in range(n)
    ]
    # growing first windows (8, 16, 32 rows, then 50 each): the same rows, cut at the same arithmetic places
    grown = list(scan_windows(corpus, tok, 50, first_rows=8))
    starts = [0, 8, 24, 56] + list(range(106, row, 50))
    assert [w.row0 for w in grown] == starts
    assert [len(w.texts) for w in grown] == [b - a for a, b in zip(starts, starts[1:] + [row])]
    assert np.array_equal(np.concatenate([w.n_tokens for w in grown]), whole.n_tokens)


def test_window_boundaries_grow_then_stay_at_the_plan_window():
    from pipeline.ingest.plan import window_end

    ends = sorted({window_end(r, 65536) for r in range(0, 300_000, 512)})
    assert ends[:6] == [4096, 12288, 28672, 61440, 126976, 192512]
    assert all(0 < b - a <= 65536 for a, b in zip([0] + ends, ends))
    assert all(window_end(r, 65536) > r for r in (0, 4095, 4096, 61439, 61440, 10**9))
    assert [window_end(r, 50) for r in (0, 49, 50, 51)] == [50, 50, 100, 100]  # plan_window <= first: fixed


def _long_docs(sentences: list[str], n: int, seed: int) -> list[str]:
    """Documents of 1..40 consecutive sentences (a long-text mix like benchmark 2's)."""
    rng = np.random.default_rng(seed)
    docs, i = [], 0
    for _ in range(n):
        k = int(rng.integers(1, 41))
        docs.append(" ".join(sentences[(i + j) % len(sentences)] for j in range(k)))
        i += k
    return docs


@pytest.mark.parametrize("language", ["en", "zh"])
def test_estimated_lengths_track_the_tokenizer_on_real_text(
    minilm_tokenizer, stsb_en_test, stsb_zh_cnsd_test, language
):
    """``--lengths estimate``: calibrated on the corpus's first texts, the estimate of a batch's tokens stays
    close to the exact count on real English and Chinese text, short sentences and long documents alike; it
    is integer arithmetic (the same plan on every run) and never below [CLS] x [SEP] for a real text."""
    from pipeline.ingest.plan import LengthEstimate

    pairs = stsb_en_test if language == "en" else stsb_zh_cnsd_test
    sentences = [t for a, b, _ in pairs for t in (a, b)]
    texts = sentences[:3000] + _long_docs(sentences, 1500, seed=5)
    order = np.random.default_rng(7).permutation(len(texts))  # calibration sees both kinds
    texts = [texts[i] for i in order]
    tok = minilm_tokenizer
    est = LengthEstimate.calibrate(texts, tok)
    assert LengthEstimate.calibrate(texts, tok).__dict__ == est.__dict__, "deterministic"
    assert isinstance(est.num, int) and isinstance(est.den, int)
    exact, exact_full = tok.lengths(texts)
    guess, guess_full = est.lengths(texts)
    assert guess.dtype == np.int32 and guess.max() <= tok.max_seq_len and guess.min() >= 3
    assert np.array_equal(guess, np.minimum(guess_full, tok.max_seq_len))
    per_doc = guess / exact - 1
    assert abs(np.median(per_doc)) < 0.05
    assert np.percentile(np.abs(per_doc), 90) < 0.35
    # batches of the plan the estimate makes: their real token totals stay near the budget
    plan = plan_batches(guess, 8192, 512)
    real = np.array([exact[plan.rows(i)].sum() for i in range(plan.n_batches)])
    big = plan.tokens >= 4096  # all but the leftovers of each length group
    assert big.sum() >= 10
    ratio = real[big] / plan.tokens[big]
    assert 0.85 < np.median(ratio) < 1.15 and ratio.max() < 1.5, ratio
    assert int(exact.sum()) == pytest.approx(int(guess.sum()), rel=0.08)


def test_estimated_lengths_on_characters_of_every_width(minilm_tokenizer, monkeypatch):
    """Wide characters (CJK, emoji) count one token each, narrow ones by the ratio; a text is never estimated
    below 3 tokens, and truncation caps it."""
    from pipeline.ingest.plan import LengthEstimate

    # no Arrow array is built from the texts: pyarrow's first pa.array imports pandas where it is installed
    monkeypatch.setattr(pa, "array", lambda *a, **k: pytest.fail("pa.array called while estimating lengths"))
    est = LengthEstimate(1, 4, 16)  # a token every 4 narrow characters
    texts = ["abcd", "abcde", "一二三", "😀😀😀😀😀", "é", "x" * 1000, "ab 一"]
    lens, full = est.lengths(texts)
    assert full.tolist()[:5] == [3, 4, 5, 7, 3]
    assert lens.tolist() == [3, 4, 5, 7, 3, 16, 4] and full[5] == 252
    assert est.exact is False
    from pipeline.ingest.plan import _char_counts

    chars, wide = _char_counts(["a", "é", "中", "😀😀", "", "x中😀é", "\ud800"])  # a lone surrogate too
    assert chars.tolist() == [1, 1, 1, 2, 0, 4, 1] and wide.tolist() == [0, 0, 1, 2, 0, 2, 1]
    assert getattr(minilm_tokenizer, "exact", True) is True


def test_a_scan_on_estimated_lengths_quarantines_what_it_can_see_and_does_not_guess_truncation(
    tmp_path, minilm_tokenizer
):
    from pipeline.ingest.plan import scan_windows

    texts = ["a normal sentence", None, "", "   \t\n", "\x00\x01\x02", "word " * 2000, "ok"]
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), p)
    corpus = open_corpus(str(p), CorpusConfig())
    (w,) = list(scan_windows(corpus, minilm_tokenizer, 100, estimate=True))
    assert dict(zip(w.q_rows, w.q_reasons)) == {1: "null_text", 2: "empty_text", 3: "whitespace_text"}
    assert w.n_tokens[4] >= 3, "control characters only: sent, the worker finds no tokens and quarantines it"
    assert w.n_tokens[5] == 256 and w.n_truncated == 0
    assert w.ids == list(range(len(texts))) and w.texts == texts


def test_the_estimate_is_calibrated_on_the_first_window_whatever_the_files(tmp_path, minilm_tokenizer, stsb_en_test):
    """The calibration sample is the first window's texts, so files and row groups cut anywhere give the same
    estimate, the same lengths and the same windows as one file."""
    from pipeline.ingest.plan import LengthEstimate, scan_windows

    texts = _long_docs([t for a, b, _ in stsb_en_test for t in (a, b)], 700, seed=2)
    tok = minilm_tokenizer
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"id": list(range(700)), "text": texts}), one)
    folder = tmp_path / "many"
    folder.mkdir()
    for k, (a, b) in enumerate([(0, 3), (3, 3), (3, 250), (250, 700)]):
        pq.write_table(
            pa.table({"id": pa.array(range(a, b), pa.int64()), "text": pa.array(texts[a:b], pa.string())}),
            folder / f"p{k}.parquet",
            row_group_size=37,
        )
    runs = [
        list(scan_windows(open_corpus(str(c), CorpusConfig()), tok, 300, first_rows=100, estimate=True))
        for c in (one, folder)
    ]
    assert [w.row0 for w in runs[0]] == [w.row0 for w in runs[1]] == [0, 100, 300, 600]
    for a, b in zip(*runs):
        assert np.array_equal(a.n_tokens, b.n_tokens)
    want = LengthEstimate.calibrate(texts[:100], tok).lengths(texts)[0]
    assert np.array_equal(np.concatenate([w.n_tokens for w in runs[0]]), want)
    exact = np.concatenate([w.n_tokens for w in scan_windows(open_corpus(str(one), CorpusConfig()), tok, 300)])
    assert not np.array_equal(exact, want) and abs(want.sum() / exact.sum() - 1) < 0.1


def test_the_length_mode_follows_the_target():
    from core.config import FbasConfig
    from pipeline.ingest.job import length_mode

    cfg = FbasConfig()
    assert length_mode(cfg) == "exact"  # onnx pads: exact lengths, least padding
    cfg.engine.target = "gpu"
    assert length_mode(cfg) == "estimate"
    cfg.corpus.lengths = "exact"
    assert length_mode(cfg) == "exact"
    cfg.engine.target, cfg.corpus.lengths = "onnx", "estimate"
    assert length_mode(cfg) == "estimate"


def test_the_estimate_has_a_fallback_when_the_first_window_cannot_measure_it(tmp_path, minilm_tokenizer, caplog):
    """A first window with no text to embed gives the fallback ratio and a warning naming the cause; characters
    that share tokens (emoji runs: one [UNK]) are measured with the rest; a corpus shorter than the first window
    is calibrated on all of it. Every case plans every embeddable row."""
    import logging

    from pipeline.ingest.plan import LengthEstimate, scan_windows

    tok = minilm_tokenizer
    texts = [None] * 30 + ["", " "] * 5 + ["a short sentence about cats", "一个男人在弹吉他。"] * 40
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": pa.array(texts, pa.string())}), p)
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest.plan"):
        windows = list(scan_windows(open_corpus(str(p), CorpusConfig()), tok, 64, first_rows=40, estimate=True))
    assert "has no text to embed" in caplog.text
    n_tokens = np.concatenate([w.n_tokens for w in windows])
    assert (n_tokens > 0).sum() == 80 and (n_tokens[:40] == 0).all()
    fb = LengthEstimate(*LengthEstimate.FALLBACK, tok.max_seq_len)
    assert np.array_equal(n_tokens[40:], fb.lengths(texts[40:])[0])
    emoji = ["so happy 😀😀😀😀😀😀", "🎉🎉🎉 party"] * 20
    est = LengthEstimate.calibrate(emoji, tok)
    assert est.wide_one is False
    guess, exact = est.lengths(emoji)[0], tok.lengths(emoji)[0]
    assert abs(guess.sum() / exact.sum() - 1) < 0.2
    short = tmp_path / "short.parquet"
    pq.write_table(pa.table({"id": [0, 1, 2], "text": ["one two three", "four", "五六七"]}), short)
    (w,) = list(scan_windows(open_corpus(str(short), CorpusConfig()), tok, 4096, estimate=True))
    assert (
        np.array_equal(
            w.n_tokens,
            LengthEstimate.calibrate(["one two three", "four", "五六七"], tok).lengths(
                ["one two three", "four", "五六七"]
            )[0],
        )
        and (w.n_tokens >= 3).all()
    )


def test_sending_some_batches_again_reads_only_the_row_groups_that_hold_them(tmp_path, minilm_tokenizer):
    """A re-send of one batch (a lost worker's) must not read the whole corpus: only the row groups holding
    its rows are decoded, and reading stops once the batch went out."""
    from core.config import CorpusConfig
    from pipeline.ingest.plan import plan_batches, scan_corpus

    texts = [f"text number {i} " + "word " * (i % 13) for i in range(5000)]
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": list(range(5000)), "text": texts}), p, row_group_size=500)
    corpus = open_corpus(str(p), CorpusConfig())
    plan = plan_batches(scan_corpus(corpus, minilm_tokenizer).n_tokens, 2048, 64)
    target = plan.n_batches // 2
    read: list[tuple[int, int]] = []
    real = corpus.batches
    corpus.batches = lambda *a, **k: (read.append((rb.row0, len(rb))) or rb for rb in real(*a, **k))  # type: ignore
    skip = set(range(plan.n_batches)) - {target}
    msgs = list(batch_messages(corpus, plan, job="j", out="/o", model="m", dim=8, skip=skip))
    assert [m["batch"] for m in msgs] == [target] and msgs[0]["row_ids"] == plan.rows(target).tolist()
    assert msgs[0]["texts"] == [texts[r] for r in msgs[0]["row_ids"]]
    assert sum(n for _, n in read) < 5000 / 2, f"read {sum(n for _, n in read)} of 5000 rows for one batch"
