"""A new job's scan and send: the corpus is read window by window (the next window on a thread), each window
planned on its own and its batches sent at once, so workers embed while later windows are read."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np

from core.chunking import Chunker
from core.errors import InputError
from core.formats import Plan, PlanFile, narrow_rows
from core.layout import MODEL_SUBDIR, PENDING_FILE, SCAN_FILE, OutputDir, rows_file
from core.tokenize import Tokenizer
from output.check import committed_parts
from pipeline.ingest.job import Job, JobContext, chunk_spec, first_window, length_mode, save_job
from pipeline.ingest.plan import ScanBuilder, Window, plan_window, scan_windows
from pipeline.ingest.produce import window_messages
from pipeline.ingest.read import ReadAhead

__all__ = ["start_scan", "scan_and_send", "chunk_messages"]


def _windows(ctx: JobContext, tokenizer: Tokenizer) -> Iterator[Window]:
    cfg = ctx.cfg
    spec = chunk_spec(cfg)
    chunker = None
    if spec is not None:  # cuts by HF tokenizers' character offsets (the C tokenizer gives ids and lengths only)
        hf = Tokenizer.from_file(ctx.out.state(MODEL_SUBDIR) / "tokenizer.json", ctx.meta.max_seq_len)
        chunker = Chunker(hf, spec)
    return scan_windows(
        ctx.corpus,
        tokenizer,
        cfg.corpus.plan_window,
        first_rows=first_window(cfg),
        estimate=length_mode(cfg) == "estimate",
        chunker=chunker,
    )


def start_scan(ctx: JobContext, tokenizer: Tokenizer) -> ReadAhead[Window]:
    """The corpus's windows (lengths by ``--lengths``; with ``--chunk``, rows are chunks), scanned on a thread
    from now on, one window ahead of the consumer: ``ingest`` starts it as soon as the ids are checked, so the
    first window is read while Celery and Redis are set up; close it (``with``) when done."""
    return ReadAhead(_windows(ctx, tokenizer), name="scan-ahead")


def chunk_messages(ctx: JobContext, tokenizer: Tokenizer, n_batches: int, skip: set[int]) -> Iterator[dict]:
    """A chunked job's task messages for its batches not in ``skip``, its chunks cut again (the cuts and the plan
    are the same on every run) from a new pass over the corpus: what a resumed chunked job sends, as
    ``produce.batch_messages`` does for rows."""
    wanted = n_batches - len(skip & set(range(n_batches)))
    if not wanted:
        return
    c, meta, first = ctx.cfg.corpus, ctx.meta, 0
    for w in _windows(ctx, tokenizer):
        wplan = plan_window(w.n_tokens, w.row0, c.batch_tokens, c.batch_rows)
        for msg in window_messages(
            w,
            wplan,
            first,
            job=ctx.job_id,
            out=str(ctx.out),
            model=meta.fingerprint,
            dim=meta.dim,
            id_type=ctx.corpus.id_type,
            skip=skip,
        ):
            yield msg
            wanted -= 1
        first += wplan.n_batches
        if wanted <= 0:
            return


def scan_and_send(
    ctx: JobContext,
    windows: Iterator[Window],
    id_hash: np.ndarray,
    send: Callable[[dict], None],
    skip: set[int],
    on_window: Callable[[int, int], None] | None = None,
    plan_file: PlanFile | None = None,
) -> Job:
    """Plan each window of a scan (``start_scan``; the next window is read on a thread while this one's batches
    are sent) and ``send`` its batches (except ``skip``; workers embed them meanwhile); then save the scan, the
    plan and ``job.json`` (the caller checked ``resume_job`` first and the ids with ``check_unique_ids``). The
    plan is the same on every run, so an ingest stopped midway finds its committed batches again.
    ``on_window(batches, rows)``: planned so far. ``plan_file``: where the plan goes as it is made (rows, not
    chunks), else it is kept in memory; the lengths likewise go to ``scan.n_tokens.bin`` then."""
    out, corpus = ctx.out, ctx.corpus
    out.make_dirs()
    # whose parts these will be, before the first one exists (job.json comes after the last window)
    OutputDir.write_atomic(
        out.state(PENDING_FILE),
        lambda p: p.write_text(json.dumps({"job": ctx.job_id, "corpus": corpus.uri}), encoding="utf-8"),
    )
    sent = [0]

    def counted(msg: dict) -> None:
        send(msg)
        sent[0] += 1

    lengths = rows_file(out.state(SCAN_FILE), "n_tokens") if plan_file is not None else None
    scanned = ScanBuilder(corpus, lengths)
    plans: list[Plan] | PlanFile = [] if plan_file is None else plan_file
    try:
        _plan_and_send(ctx, windows, counted, skip, on_window, scanned, plans)
    except InputError:
        # a corpus that cannot be read (a damaged file): if nothing of this job was sent (so no part of it can
        # still be committed), nothing needs the folder's claim, and a rerun with a repaired file, even one
        # whose job differs, is not refused
        if not sent[0] and not committed_parts(out, ctx.job_id, None):
            out.state(PENDING_FILE).unlink(missing_ok=True)
        raise
    scan = scanned.scan(id_hash, estimated=length_mode(ctx.cfg) == "estimate")
    return save_job(ctx, scan, plans.plan() if isinstance(plans, PlanFile) else Plan.concat(plans))


def _plan_and_send(
    ctx: JobContext,
    windows: Iterator[Window],
    send: Callable[[dict], None],
    skip: set[int],
    on_window: Callable[[int, int], None] | None,
    scanned: ScanBuilder,
    plans: list[Plan] | PlanFile,
) -> None:
    """Plan and send each window in turn, adding it to the scan and its plan to the plan."""
    c, out, corpus, meta = ctx.cfg.corpus, ctx.out, ctx.corpus, ctx.meta
    n_batches = n_rows = 0
    for w in windows:  # the next window is read while this one's batches wait for room in the queue
        wplan = plan_window(w.n_tokens, w.row0, c.batch_tokens, c.batch_rows)
        if isinstance(plans, PlanFile):  # before its batches go: the ledger checks each part against its batch
            plans.add(wplan)
        for msg in window_messages(
            w,
            wplan,
            n_batches,
            job=ctx.job_id,
            out=str(out),
            model=meta.fingerprint,
            dim=meta.dim,
            id_type=corpus.id_type,
            skip=skip,
        ):
            send(msg)
        n_batches, n_rows = n_batches + wplan.n_batches, n_rows + wplan.n_rows
        if on_window:
            on_window(n_batches, n_rows)
        scanned.add(w)  # sent: the job's files need only the lengths and the quarantine
        if not isinstance(plans, PlanFile):
            wplan.order = narrow_rows(wplan.order)  # kept to the end, its row ids in 4 bytes where they fit
            plans.append(wplan)
