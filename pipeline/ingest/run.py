"""`fbas-pipeline ingest`: ids -> scan + plan + enqueue, window by window, with backpressure -> wait
(progress bar) -> finalize.

    result = ingest("corpus.parquet", cfg)          # local mode when cfg.queue.broker is None

A new job first checks every id (id column only: null or duplicate ids stop it before anything
starts). Then the corpus is read once in windows (``plan_window`` rows; for the gpu target the
first is 4,096 rows and they double up to ``plan_window``): each window's token lengths are
learned (``--lengths``: tokenized exactly, or, for the gpu target, estimated from character
counts, so the host's cores tokenize each text once, in the workers), the window is planned on
its own, and its batches are queued at once, so the workers embed while
later windows are still being scanned, one window ahead on a thread (in local mode, the first
window's scan overlaps Triton's start). Meanwhile another thread checks each committed part for
finalize (``PartLedger``), which then reads only the last ones. ``scan.npz``, ``plan.npz`` and,
last, ``job.json`` are written after the last window; until then ``job.pending`` names the job,
so no other job is started on its parts.

The job id is a fingerprint of the corpus (file names, sizes, row counts, columns), the
model (its engine fingerprint) and the batch settings. ``OUT/.fbas/`` holds what a rerun
needs: ``job.json``, ``scan.npz``, ``plan.npz``, the scan's quarantine, the built model.
Rerunning the same command resumes: the scan is reused, parts already committed are kept
(Redis is told so), only missing batches are enqueued, then the job is finalized. A run that
stopped before ``job.json`` was written scans again; the plan is the same on every run, so
its committed parts are found and kept. An output folder that holds another job is refused.

While waiting, the producer watches for a Redis that lost the job (restarted without
persistence: the job is written again and missing batches re-enqueued), for a job that
stopped moving with an empty queue (missing batches re-enqueued after ``visibility_timeout``),
for errors workers report, and, in local mode, for a child process that died.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.config import FbasConfig
from core.errors import ConfigError, FbasError, InputError
from core.formats import PlanFile
from core.layout import LOCAL_SUBDIR, PLAN_FILE, SCAN_FILE, OutputDir, rows_file
from output.check import committed_parts
from output.finalize import finalize
from output.index import check_index_kind
from output.ledger import LedgerFeeder, PartLedger
from pipeline.ingest.job import IngestResult, Job, JobContext, chunk_spec, forget_scan, register_job, resume_job
from pipeline.ingest.model_cache import built_folder, ensure_model
from pipeline.ingest.plan import Window, check_unique_ids, corpus_id_hashes
from pipeline.ingest.produce import Sender, batch_messages
from pipeline.ingest.progress import IngestProgress, Steps
from pipeline.ingest.read import Corpus, ReadAhead, open_corpus
from pipeline.ingest.stream import chunk_messages, scan_and_send, start_scan
from pipeline.ingest.watch import POLL_S, BrokerOutage, ReadyOnce, Watch, sigterm_as_interrupt
from workers.jobstate import connect, queued_batches

if TYPE_CHECKING:
    import redis

    from services.local import LocalCluster

logger = logging.getLogger(__name__)

__all__ = ["ingest", "IngestResult"]


@dataclass
class _NewScan:
    """A new job's checked ids and its scan, started as soon as the ids were checked."""

    id_hash: np.ndarray  # mapped from scan.id_hash.bin (``core.rowfile``)
    windows: ReadAhead[Window]
    plan: PlanFile | None  # where the plan goes as it is made (None: a chunked job's, kept in memory)


@dataclass
class _Running:
    """A job whose batches are being sent: its context, its broker and, in local mode, its cluster."""

    ctx: JobContext
    model_dir: Path
    client: redis.Redis
    broker: str
    cluster: LocalCluster | None
    progress: str  # bar | lines | off (IngestProgress)
    ready: ReadyOnce
    task_key: str  # signs every task message (the local cluster's, or the fleet's FBAS_TASK_KEY)

    def messages(self, plan: Any, skip: set[int]) -> Any:
        """The task messages of ``plan``'s batches not in ``skip`` (their texts read again from the corpus; a
        chunked job's chunks cut again)."""
        ctx = self.ctx
        if chunk_spec(ctx.cfg) is not None:
            from engine.model_dir import load_tokenizer

            return chunk_messages(ctx, load_tokenizer(self.model_dir, ctx.meta), plan.n_batches, skip)
        return batch_messages(
            ctx.corpus, plan, job=ctx.job_id, out=str(ctx.out), model=ctx.meta.fingerprint, dim=ctx.meta.dim, skip=skip
        )


def ingest(
    corpus_uri: str,
    cfg: FbasConfig,
    *,
    progress: bool | None = None,
    worker_env: dict[str, str] | None = None,
    on_cluster: Callable[[LocalCluster], None] | None = None,
    model_dir: str | Path | None = None,
) -> IngestResult:
    """Run (or resume) an ingest; local mode when ``cfg.queue.broker`` is None. See the module docstring.

    ``model_dir``: a model folder built already (``fbas-pipeline build``), used as it is. ``worker_env`` adds
    environment variables for local-mode workers (tests use it for hooks); ``on_cluster(cluster)`` is called
    once the local cluster has started (tests use it to kill parts).
    """
    from engine.model_dir import load_tokenizer, read_meta

    if cfg.output.update:
        from pipeline.ingest.update import update

        return update(corpus_uri, cfg, ingest, progress=progress, model_dir=model_dir)
    t0 = time.perf_counter()
    out = OutputDir(cfg.output.out)
    corpus = open_corpus(corpus_uri, cfg.corpus)
    built = Path(model_dir) if model_dir else built_folder(cfg.engine.model) if cfg.engine.model else None
    cfg = _preflight(corpus, cfg, built)
    steps = Steps(enabled=progress is not False)
    out.state("").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    sent = resumed = redelivered = docs = 0
    manifest: dict | None = None
    # one job per folder, for the job's life (a second one is refused, naming this process)
    with out.lock(), ExitStack() as stack, sigterm_as_interrupt():
        model = ensure_model(cfg, out, steps=steps, built=built)
        timings["model_s"] = round(time.perf_counter() - t0, 3)  # a first build is reported apart from the rates
        ctx = JobContext(corpus, cfg, out, read_meta(model))
        spec = chunk_spec(cfg)
        if spec is not None:  # a window the model cannot take whole is refused before anything starts
            spec.window(ctx.meta.max_seq_len)
        job = resume_job(ctx)
        logger.info("model and job folder ready after %.2fs", time.perf_counter() - t0)
        if job is not None and len(committed_parts(out, job.id, job.plan.n_batches)) == job.plan.n_batches:
            logger.info("job %s: every batch is committed already; finalizing", job.id)
            resumed = job.plan.n_batches
        else:
            new = None
            if job is None:  # a new job: null or duplicate ids stop it before anything starts or is read
                scan_file = out.state(SCAN_FILE)
                forget_scan(out)
                id_hash = corpus_id_hashes(corpus, rows_file(scan_file, "id_hash"))
                check_unique_ids(corpus, id_hash, spill=scan_file.parent)
                windows = stack.enter_context(start_scan(ctx, load_tokenizer(model, ctx.meta)))
                plan = PlanFile(out.state(PLAN_FILE), corpus.n_rows) if spec is None else None
                new = _NewScan(id_hash, windows, plan)
                logger.info("%d ids checked, scan started after %.2fs", corpus.n_rows, time.perf_counter() - t0)
            run = _start_services(stack, ctx, model, progress, t0, worker_env, on_cluster, steps)
            # a new chunked job learns its chunks (the ledger's rows) only as it scans: finalize reads its parts
            feeder = _start_ledger(stack, ctx, job, new) if job is not None or chunk_spec(cfg) is None else None
            q = _run_queue(run, job, new)
            job, sent, resumed, redelivered, docs = q.job, q.sent, q.resumed, q.redelivered, q.docs
            run.ready()  # nothing needed sending: Triton still serves the statistics below
            timings.update(_timings(run, job, t0))
            t_stop = time.perf_counter()
            ledger = feeder.stop() if feeder else None  # the ledger's part in progress ends first
            timings["ledger_stop_s"] = round(time.perf_counter() - t_stop, 3)
            manifest = _finalize(out, cfg, timings, redelivered, ledger, steps, job)
        if manifest is None:  # every batch was committed already: nothing was started
            manifest = _finalize(out, cfg, timings, redelivered, None, steps, job)
    return IngestResult(out.root, job.id, manifest, time.perf_counter() - t0, resumed, sent, docs)


def _preflight(corpus: Corpus, cfg: FbasConfig, built: Path | None) -> FbasConfig:
    """Refuse, before anything is built or started, what cannot work; returns the config to run with (a
    built model's own engine settings replace the flags')."""
    if corpus.n_rows == 0:
        raise InputError(f"{corpus.uri} holds no rows: nothing to embed (check the path or glob)")
    check_index_kind(cfg.output.index, corpus.n_rows)
    if cfg.queue.broker is not None and not cfg.queue.task_key:
        raise ConfigError(
            "a fleet job needs the fleet's task key: set FBAS_TASK_KEY (the same secret as on the workers) in the "
            "environment; workers refuse unsigned tasks"
        )
    if built is not None:
        from engine.model_dir import read_meta

        m = read_meta(built)
        engine = replace(cfg.engine, target=m.target, precision=m.precision, max_seq_len=m.max_seq_len)
        cfg = replace(cfg, engine=engine)
        logger.info("using the built model %s (%s %s, %s) as it is", built, m.target, m.precision, m.fingerprint)
    if cfg.engine.target == "gpu" and cfg.queue.broker is None:  # local mode serves the engine here
        from services.gpus import require_gpus

        require_gpus("--target gpu in local mode")
    return cfg


def _finalize(
    out: OutputDir,
    cfg: FbasConfig,
    timings: dict[str, float],
    redelivered: int,
    ledger: PartLedger | None,
    steps: Steps,
    job: Job | None,
) -> dict[str, Any]:
    what = "finalizing (checking every part, writing the index and manifest)"
    steps.begin(what)
    state = (job.scan, job.plan) if job is not None else None  # as saved in .fbas/: not read a second time
    manifest = finalize(out, cfg.output.index, timings=timings, redelivered=redelivered, ledger=ledger, state=state)
    steps.end(what)
    return manifest


def _start_services(
    stack: ExitStack,
    ctx: JobContext,
    model_dir: Path,
    progress: bool | None,
    t0: float,
    worker_env: dict[str, str] | None,
    on_cluster: Callable[[LocalCluster], None] | None,
    steps: Steps,
) -> _Running:
    """Connect to the broker; in local mode, start the local cluster first (stopped by ``stack``)."""
    cluster = None
    key = ctx.cfg.queue.task_key or ""
    if ctx.cfg.queue.broker is None:
        from services.local import LocalCluster

        cluster = LocalCluster(model_dir, ctx.out.state(LOCAL_SUBDIR), ctx.cfg, worker_env=worker_env)
        stack.callback(cluster.stop)
        what = "starting the local services (redis-server, tritonserver, workers)"
        steps.begin(what)
        cluster.start()
        steps.end(what)
        broker, key = cluster.broker_url, cluster.task_key
        if on_cluster:
            on_cluster(cluster)
    else:
        broker = ctx.cfg.queue.broker
    client = connect(broker)
    stack.callback(client.close)
    return _Running(
        ctx,
        model_dir,
        client,
        broker,
        cluster,
        "off" if progress is False else "bar" if progress or sys.stderr.isatty() else "lines",
        ReadyOnce(cluster, t0, steps),
        key,
    )


def _start_ledger(stack: ExitStack, ctx: JobContext, job: Job | None, new: _NewScan | None) -> LedgerFeeder:
    """Finalize's reading and checking of each part, done while later batches are still embedding."""
    id_hash = job.scan.id_hash if job is not None else new.id_hash if new is not None else None
    assert id_hash is not None, "the job is either resumed (job) or new (new)"
    plan = job.plan if job is not None else new.plan if new is not None else None
    ledger = PartLedger(
        ctx.out,
        ctx.job_id,
        ctx.meta.dim,
        ctx.cfg.output.index,
        id_hash,
        job.plan.n_rows if job is not None else None,
        plan=plan,
    )
    stack.callback(ledger.close)  # an index file not committed is removed, after the feeder stops
    feeder = LedgerFeeder(ledger)
    stack.callback(feeder.stop)
    if new is not None:  # on an error the scan stops first (the stack closes it last, after the rest)
        stack.callback(new.windows.cancel)
    return feeder


def _timings(run: _Running, job: Job, t0: float) -> dict[str, float]:
    """The run's timings for the manifest; in local mode also Triton's, then the cluster stops in the
    background while finalize runs (the exit stack waits for it)."""
    ready_s = run.ready.seconds or 0.0
    timings = {
        "scan_s": round(job.scan.seconds, 3),
        "ready_s": ready_s,
        "embed_s": round(time.perf_counter() - t0 - ready_s, 3),
    }
    if run.cluster is not None:
        try:
            timings.update(run.cluster.engine_stats())
        except FbasError as e:
            logger.info("no Triton statistics: %s", e)
        run.cluster.stop_in_background()
    return timings


@dataclass
class _Queued:
    """What sending and waiting did."""

    job: Job
    sent: int
    resumed: int
    redelivered: int
    docs: int  # rows finished by this run


def _run_queue(run: _Running, job: Job | None, new: _NewScan | None) -> _Queued:
    """Enqueue the missing batches and wait for all of them.

    A new job (``job`` None) is planned here from its scan (``new``, started by ``ingest``), window by
    window, its batches queued as each window is planned; a resumed one re-reads the corpus for its missing
    batches. A broker that stops answering is waited for (``BrokerOutage``), and what it lost is sent again."""
    from workers.app import QUEUE, TASK_NAME, producer_app

    ctx, cfg = run.ctx, run.ctx.cfg
    app = producer_app(FbasConfig(queue=replace(cfg.queue, broker=run.broker), serve=cfg.serve))
    tok_json = (run.model_dir / "tokenizer.json").read_text(encoding="utf-8")
    # local mode: a dead redis-server is the cluster's failure, named by its check, not an outage to wait out
    check = run.cluster.check if run.cluster is not None else None
    outage = BrokerOutage(run.client, run.broker, cfg.queue.broker_wait, check=check)
    plan0 = job.plan if job is not None else None
    state, committed = outage.call(lambda: register_job(ctx, run.client, plan0, tok_json))
    logger.info("job %s registered in Redis (%d batches committed already)", ctx.job_id, len(committed))
    bar = IngestProgress(job.plan.n_rows if job is not None else ctx.corpus.n_rows, run.progress)
    watch = Watch(state, run.cluster, cfg, bar, run.client, outage)
    sender = Sender(app, run.client, QUEUE, cfg.queue.queue_depth, TASK_NAME, on_wait=watch.tick, key=run.task_key)
    seen_outages = [0]

    def after_outage() -> None:
        """A broker that came back may have lost the job's keys (tokenizer, meta) while batches are still being
        sent: write them again at once, so workers do not wait for them (the re-send of lost batches follows
        in the wait loop)."""
        if outage.outages != seen_outages[0]:
            seen_outages[0] = outage.outages
            watch.state, _ = outage.call(lambda: register_job(ctx, run.client, job.plan if job else None, tok_json))

    def send(msg: dict) -> None:
        run.ready()
        bar.start()
        outage.call(lambda: sender.send(msg))
        after_outage()

    def on_window(n_batches: int, n_rows: int) -> None:
        outage.call(lambda: watch.state.set_planned(n_batches, n_rows))  # status shows the plan as it grows
        watch.tick()  # checks children and worker errors between sends too
        after_outage()

    try:
        watch.tick(force=True)
        if job is None:
            assert new is not None
            job = scan_and_send(
                ctx, new.windows, new.id_hash, send, outage.call(state.done), on_window=on_window, plan_file=new.plan
            )
            bar.set_total(job.plan.n_rows)
        else:
            for msg in run.messages(job.plan, outage.call(state.done)):
                send(msg)
        while watch.tick() < job.plan.n_batches:
            action = watch.needs_reenqueue(QUEUE)
            if action:
                _send_again(run, job, action, watch, outage, send, tok_json)
            lost = set(watch.orphans())
            if lost:  # done ones, and ones already back in the queue (a lost pool child's), are not sent again
                lost -= outage.call(watch.state.done) | outage.call(
                    lambda: queued_batches(run.client, QUEUE, ctx.job_id, unacked=False)
                )
            for msg in run.messages(job.plan, set(range(job.plan.n_batches)) - lost) if lost else ():
                send(msg)
            time.sleep(POLL_S)
        watch.tick(force=True)
    finally:
        bar.close()
        app.close()
    return _Queued(
        job, sender.sent, len(committed), outage.call(watch.state.counters)["redelivered"], bar.done_this_run
    )


def _send_again(
    run: _Running,
    job: Job,
    action: str,
    watch: Watch,
    outage: BrokerOutage,
    send: Callable[[dict], None],
    tok_json: str,
) -> None:
    """Send again the batches a broker outage, a Redis that lost the job or a stall left undone: after an
    outage or a loss the job is registered again (its committed parts marked done) and the batches neither
    done nor held by the broker are sent; after a stall, every batch not done."""
    from workers.app import QUEUE

    if action in ("outage", "lost"):
        watch.state, _ = outage.call(lambda: register_job(run.ctx, run.client, job.plan, tok_json))
    done = outage.call(watch.state.done)
    held = outage.call(lambda: queued_batches(run.client, QUEUE, run.ctx.job_id)) if action != "stalled" else set()
    missing = set(range(job.plan.n_batches)) - done - held
    logger.warning(
        "sending %d batches again (%s; %d done, %d held by the broker)", len(missing), action, len(done), len(held)
    )
    for msg in run.messages(job.plan, set(range(job.plan.n_batches)) - missing):
        send(msg)
