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

import json
import logging
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import FbasConfig, fingerprint
from pipeline.errors import ConfigError, FbasError, InputError, ServerUnavailableError
from pipeline.finalize import (JOB_FILE, PENDING_FILE, SCAN_QUARANTINE, LedgerFeeder, PartLedger, committed_parts,
                               finalize)
from pipeline.jobstate import JobState, connect
from pipeline.plan import (FIRST_WINDOW, PLAN_VERSION, Plan, Scan, Window, assemble_scan, check_unique_ids,
                           corpus_id_hashes, plan_window, scan_windows)
from pipeline.produce import Sender, batch_messages, queue_length, window_messages
from pipeline.read import Corpus, ReadAhead, open_corpus
from workers.write import OutputDir

logger = logging.getLogger(__name__)

__all__ = ["ingest", "IngestResult", "ensure_model", "scan_and_send", "save_job", "Job"]

MODEL_SUBDIR = "model"
MODEL_CACHE = Path.home() / ".cache" / "fbas" / "models"  # built engines, by model_key


@dataclass
class IngestResult:
    """What an ingest did (the manifest has the details)."""

    out: Path
    job: str
    manifest: dict
    seconds: float
    resumed_batches: int
    sent_batches: int


@dataclass
class Job:
    """A planned job: identity, scan and plan."""

    id: str
    info: dict
    scan: Scan
    plan: Plan
    resumed_scan: bool


def model_key(cfg: FbasConfig) -> str:
    """Identity of a model build: every engine setting plus the checkpoint files' names, sizes and mtimes."""
    from engine.checkpoint import default_model_path

    src = Path(cfg.engine.model) if cfg.engine.model else default_model_path()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in src.glob("*") if p.is_file()) \
        if src.is_dir() else []
    return fingerprint({"engine": asdict(cfg.engine), "source": str(src.resolve()), "files": files})


def _valid_model(folder: Path, stamp: Path, key: str) -> bool:
    from engine.model_dir import read_meta

    if not (folder.is_dir() and stamp.exists() and stamp.read_text(encoding="utf-8").strip() == key):
        return False
    try:
        read_meta(folder)
        return True
    except FbasError:
        logger.warning("model in %s is damaged: rebuilding", folder)
        return False


def ensure_model(cfg: FbasConfig, out: OutputDir, cache: Path | None = MODEL_CACHE) -> Path:
    """The built model for ``cfg.engine`` in ``OUT/.fbas/model``: reused while its key matches, else taken from
    the per-user build cache (``~/.cache/fbas/models/<key>``, hard links), else built (and cached)."""
    from engine.build import build_model

    key = model_key(cfg)
    target, stamp = out.state(MODEL_SUBDIR), out.state("model.spec")
    if _valid_model(target, stamp, key):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    cached = cache / key if cache else None
    if cached is not None:
        try:
            if not _valid_model(cached, cached.with_suffix(".key"), key):
                logger.info("building the model (%s, %s) into the cache %s", cfg.engine.model or "default",
                            cfg.engine.precision, cached)
                build_model(cfg.engine, cached, threads=cfg.runtime.threads)
                cached.with_suffix(".key").write_text(key, encoding="utf-8")
            tmp = target.with_name(target.name + ".copying")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(cached, tmp, copy_function=_link_or_copy)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            stamp.write_text(key, encoding="utf-8")
            return target
        except OSError as e:  # a read-only or full home folder: build in place instead
            logger.warning("model cache %s unusable (%s): building into %s", cache, e, target)
    logger.info("building the model (%s, %s) into %s", cfg.engine.model or "default", cfg.engine.precision, target)
    build_model(cfg.engine, target, threads=cfg.runtime.threads)
    stamp.write_text(key, encoding="utf-8")
    return target


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def job_id_for(corpus: Corpus, cfg: FbasConfig, model_meta: Any) -> str:
    """The job's identity: corpus fingerprint + model fingerprint + batch settings."""
    return fingerprint({"corpus": corpus.fingerprint, "model": model_meta.fingerprint,
                        "settings": _batch_settings(cfg)})


def _batch_settings(cfg: FbasConfig) -> dict[str, int | str]:
    c = cfg.corpus
    settings = {"batch_tokens": c.batch_tokens, "batch_rows": c.batch_rows, "plan_window": c.plan_window,
                "first_window": first_window(cfg), "plan_version": PLAN_VERSION}
    if length_mode(cfg) == "estimate":   # named only then: jobs planned on exact lengths keep their ids
        settings["lengths"] = "estimate"
    return settings


def first_window(cfg: FbasConfig) -> int:
    """Rows of a job's first plan window (``corpus.first_window``; 0 = by target, see its help)."""
    c = cfg.corpus
    if c.first_window:
        return min(c.first_window, c.plan_window)
    return min(FIRST_WINDOW, c.plan_window) if cfg.engine.target == "gpu" else c.plan_window


def length_mode(cfg: FbasConfig) -> str:
    """``exact`` or ``estimate`` (``corpus.lengths``; auto = estimate where the engine does not pad: gpu)."""
    mode = cfg.corpus.lengths
    if mode == "auto":
        return "estimate" if cfg.engine.target == "gpu" else "exact"
    return mode


def resume_job(corpus: Corpus, cfg: FbasConfig, out: OutputDir, model_meta: Any) -> Job | None:
    """The same job's saved scan and plan from ``OUT/.fbas/`` (None if there are none yet); refuse a folder
    that holds another job."""
    job_id = job_id_for(corpus, cfg, model_meta)
    job_path = out.state(JOB_FILE)
    if not job_path.exists():
        pending = out.state(PENDING_FILE)
        if pending.exists():
            other = json.loads(pending.read_text(encoding="utf-8"))
            if other.get("job") != job_id:
                raise InputError(f"{out} holds the parts of job {other.get('job')} (corpus {other.get('corpus')}), "
                                 f"stopped before its scan finished, not this one ({job_id}): rerun that job to "
                                 "finish it, use another --out, or delete the folder to start over")
        return None
    old = json.loads(job_path.read_text(encoding="utf-8"))
    if old.get("job") != job_id:
        raise InputError(f"{out} holds job {old.get('job')} (corpus {old.get('corpus', {}).get('uri')}, model "
                         f"{old.get('model', {}).get('fingerprint')}), not this one ({job_id}): use another --out, "
                         "or delete the folder to start over")
    if out.state("scan.npz").exists() and out.state("plan.npz").exists():
        scan, plan = Scan.load(out.state("scan.npz")), Plan.load(out.state("plan.npz"))
        if plan.n_batches == old.get("n_batches") and scan.n_rows == corpus.n_rows:
            logger.info("resuming job %s: reusing its scan and plan", job_id)
            return Job(job_id, old, scan, plan, True)
    return None


def start_scan(corpus: Corpus, cfg: FbasConfig, tokenizer: Any) -> ReadAhead[Window]:
    """The corpus's windows (lengths by ``--lengths``), scanned on a thread from now on, one window ahead of
    the consumer: ``ingest`` starts it as soon as the ids are checked, so the first window is read while
    Celery and Redis are set up; close it (``with``) when done."""
    return ReadAhead(scan_windows(corpus, tokenizer, cfg.corpus.plan_window, first_rows=first_window(cfg),
                                  estimate=length_mode(cfg) == "estimate"), name="scan-ahead")


def scan_and_send(corpus: Corpus, cfg: FbasConfig, out: OutputDir, model_meta: Any, tokenizer: Any,
                  id_hash: np.ndarray, send: Callable[[dict], None], skip: set[int],
                  on_window: Callable[[int, int], None] | None = None,
                  windows: Iterator[Window] | None = None) -> Job:
    """Scan the corpus window by window (the next window is read on a thread while this one's batches are
    sent), plan each window, and ``send`` its batches (except ``skip``; workers embed them meanwhile); then
    save the scan, the plan and ``job.json`` (the caller checked ``resume_job`` first and the ids with
    ``check_unique_ids``). The plan is the same on every run, so an ingest stopped midway finds its
    committed batches again. ``on_window(batches, rows)``: planned so far. ``windows``: a scan the caller
    started (``start_scan``; ``tokenizer`` is then unused); None = start one here with ``tokenizer``."""
    if windows is None:
        with start_scan(corpus, cfg, tokenizer) as started:
            return scan_and_send(corpus, cfg, out, model_meta, tokenizer, id_hash, send, skip, on_window, started)
    c = cfg.corpus
    job_id = job_id_for(corpus, cfg, model_meta)
    out.make_dirs()
    # whose parts these will be, before the first one exists (job.json comes after the last window)
    OutputDir.write_atomic(out.state(PENDING_FILE), lambda p: p.write_text(
        json.dumps({"job": job_id, "corpus": corpus.uri}), encoding="utf-8"))
    scanned, plans, n_batches, n_rows = [], [], 0, 0
    for w in windows:    # the next window is read while this one's batches wait for room in the queue
        wplan = plan_window(w.n_tokens, w.row0, c.batch_tokens, c.batch_rows)
        for msg in window_messages(w, wplan, n_batches, job=job_id, out=str(out), model=model_meta.fingerprint,
                                   dim=model_meta.dim, id_type=corpus.id_type, skip=skip):
            send(msg)
        n_batches, n_rows = n_batches + wplan.n_batches, n_rows + wplan.n_rows
        if on_window:
            on_window(n_batches, n_rows)
        w.ids, w.texts = [], []            # sent: the job's files need only the lengths and the quarantine
        scanned.append(w)
        plans.append(wplan)
    scan = assemble_scan(corpus, id_hash, scanned, estimated=length_mode(cfg) == "estimate")
    return save_job(corpus, cfg, out, model_meta, job_id, scan, Plan.concat(plans))


def save_job(corpus: Corpus, cfg: FbasConfig, out: OutputDir, model_meta: Any, job_id: str, scan: Scan,
             plan: Plan) -> Job:
    """Write ``scan.npz``, ``plan.npz``, the scan's quarantine and, last, ``job.json`` (what a rerun resumes)."""
    out.make_dirs()
    scan.save(out.state("scan.npz"))
    plan.save(out.state("plan.npz"))
    q_path = out.state(SCAN_QUARANTINE)
    if len(scan.q_rows):
        id_type = pa.int64() if corpus.id_type == "int64" else pa.string()
        qt = pa.table({"row_id": pa.array(scan.q_rows, pa.int64()), "id": pa.array(scan.q_ids, id_type),
                       "reason": pa.array(scan.q_reasons, pa.string())})
        OutputDir.write_atomic(q_path, lambda p: pq.write_table(qt, p))
    else:
        q_path.unlink(missing_ok=True)
    m, lengths = model_meta, length_mode(cfg)
    info = {
        "job": job_id, "n_batches": plan.n_batches, "planned_rows": plan.n_rows,
        "corpus": {"uri": corpus.uri, "fingerprint": corpus.fingerprint, "rows": corpus.n_rows,
                   "text_column": corpus.text_column, "id_column": corpus.id_column,
                   "title_column": corpus.title_column, "id_type": corpus.id_type, "files": len(corpus.files)},
        "model": {"name": m.name, "fingerprint": m.fingerprint, "dim": m.dim, "pooling": m.pooling,
                  "normalize": m.normalize, "max_seq_len": m.max_seq_len, "precision": m.precision,
                  "target": m.target, "dir": f".fbas/{MODEL_SUBDIR}"},
        # padding follows exact lengths only (the gpu engine, which estimates them, does not pad)
        "settings": {**_batch_settings(cfg),
                     "padding_ratio": round(plan.padding_ratio(), 4) if lengths == "exact" else None},
        "scan": {"seconds": round(scan.seconds, 3), "quarantined": len(scan.q_rows), "repaired": scan.n_repaired,
                 "lengths": lengths,
                 # estimated lengths cannot tell truncation; the manifest counts it from the parts either way
                 "truncated": scan.n_truncated if lengths == "exact" else None},
    }
    OutputDir.write_atomic(out.state(JOB_FILE), lambda p: p.write_text(json.dumps(info, indent=2, sort_keys=True),
                                                                        encoding="utf-8"))
    return Job(job_id, info, scan, plan, False)


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM behaves like Ctrl-C in the main thread, so the local cluster is stopped either way."""
    if threading_main():
        def handler(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
    else:
        yield


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _Progress:
    """The progress bar: docs/s (tqdm's rate), tokens/s and ETA, fed from the job's Redis counters.

    The counters cover every done batch (workers add theirs, ``reconcile`` adds committed ones),
    so docs + quarantined is the number of planned rows finished."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="embedding", unit="doc", disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True, smoothing=0.1)
        self.t0, self.tokens0, self.started = time.monotonic(), 0, False

    def set_total(self, total: int) -> None:
        """The planned rows, once the plan is complete (until then: every row of the corpus)."""
        self.bar.total = total
        self.bar.refresh()

    def update(self, counters: dict[str, int]) -> None:
        done = counters["docs"] + counters["quarantined"]
        if not self.started:  # what was finished before this run is the bar's start, not its speed
            self.started, self.tokens0 = True, counters["tokens"]
            self.bar.reset(total=self.bar.total)
            self.bar.n = self.bar.initial = self.bar.last_print_n = done
            self.bar.refresh()
            self.t0 = time.monotonic()
            return
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        el = max(1e-6, time.monotonic() - self.t0)
        self.bar.set_postfix_str(f"{(counters['tokens'] - self.tokens0) / el:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def ingest(corpus_uri: str, cfg: FbasConfig, *, progress: bool | None = None,
           worker_env: dict[str, str] | None = None, on_cluster: Any = None) -> IngestResult:
    """Run (or resume) an ingest; local mode when ``cfg.queue.broker`` is None. See the module docstring.

    ``worker_env`` adds environment variables for local-mode workers (tests use it for hooks);
    ``on_cluster(cluster)`` is called once the local cluster has started (tests use it to kill parts).
    """
    from engine.model_dir import load_tokenizer, read_meta
    from pipeline.local import LocalCluster

    t0 = time.perf_counter()
    if progress is None:
        progress = sys.stderr.isatty()
    out = OutputDir(cfg.output.out)
    corpus = open_corpus(corpus_uri, cfg.corpus)
    out.root.mkdir(parents=True, exist_ok=True)
    out.state("").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    sent = resumed = redelivered = 0
    manifest: dict | None = None
    with ExitStack() as stack, _sigterm_as_interrupt():
        model_dir = ensure_model(cfg, out)
        meta = read_meta(model_dir)
        job = resume_job(corpus, cfg, out, meta)
        logger.info("model and job folder ready after %.2fs", time.perf_counter() - t0)
        if job is not None and len(committed_parts(out, job.id, job.plan.n_batches)) == job.plan.n_batches:
            logger.info("job %s: every batch is committed already; finalizing", job.id)
            resumed = job.plan.n_batches
        else:
            id_hash = windows = None
            if job is None:  # a new job: null or duplicate ids stop it before anything starts or is read
                id_hash = corpus_id_hashes(corpus)
                check_unique_ids(corpus, id_hash)
                windows = stack.enter_context(start_scan(corpus, cfg, load_tokenizer(model_dir, meta)))
                logger.info("%d ids checked, scan started after %.2fs", corpus.n_rows, time.perf_counter() - t0)
            cluster = None
            if cfg.queue.broker is None:
                cluster = LocalCluster(model_dir, out.state("local"), cfg, worker_env=worker_env)
                stack.callback(cluster.stop)
                cluster.start()
                broker = cluster.broker_url
                if on_cluster:
                    on_cluster(cluster)
            else:
                broker = cfg.queue.broker
            client = connect(broker)
            stack.callback(client.close)
            # finalize's reading and checking of each part, done while later batches are still embedding
            ledger = PartLedger(out, job_id_for(corpus, cfg, meta), meta.dim, cfg.output.index,
                                job.scan.id_hash if job is not None else id_hash,
                                job.plan.n_rows if job is not None else None)
            stack.callback(ledger.close)   # an index file not committed is removed, after the feeder stops
            feeder = LedgerFeeder(ledger)
            stack.callback(feeder.stop)
            if windows is not None:   # on an error the scan stops first (the stack closes it last, after the rest)
                stack.callback(windows.cancel)
            ready = _ReadyOnce(cluster, t0)
            job, sent, resumed, redelivered = _run_queue(corpus, cfg, out, job, id_hash, meta, model_dir, client,
                                                         broker, cluster, progress, ready, windows)
            ready()  # nothing needed sending: Triton still serves the statistics below
            timings["scan_s"] = round(job.scan.seconds, 3)
            timings["ready_s"] = ready.seconds
            timings["embed_s"] = round(time.perf_counter() - t0 - ready.seconds, 3)
            if cluster is not None:
                try:
                    timings.update(cluster.engine_stats())
                except FbasError as e:
                    logger.info("no Triton statistics: %s", e)
                cluster.stop_in_background()  # shut down while finalizing; the exit stack waits for it
            manifest = finalize(out, cfg.output.index, timings=timings, redelivered=redelivered,
                                ledger=feeder.stop())
    if manifest is None:  # every batch was committed already: nothing was started
        manifest = finalize(out, cfg.output.index, timings=timings, redelivered=redelivered)
    return IngestResult(out.root, job.id, manifest, time.perf_counter() - t0, resumed, sent)


class _ReadyOnce:
    """Waits, once, for the local cluster's Triton to serve the model (called before the first batch is
    queued, so the scan of the first window overlaps Triton's start); ``seconds``: when it was ready."""

    def __init__(self, cluster: Any, t0: float) -> None:
        self.cluster, self.t0, self.seconds = cluster, t0, None

    def __call__(self) -> None:
        if self.seconds is None:
            if self.cluster is not None:
                self.cluster.wait_ready()
            self.seconds = round(time.perf_counter() - self.t0, 3)
            logger.info("cluster ready, first batch going out after %.2fs", self.seconds)


def _job_state(client: Any, job_id: str, plan: Plan | None, corpus: Corpus, meta: Any, tokenizer_json: str,
               out: OutputDir) -> tuple[JobState, dict]:
    """The job's Redis state, with the batches already committed in the folder marked done (``plan`` None:
    still being planned; every committed part of this job counts)."""
    state = JobState(client, job_id)
    before, done_before = state.meta(), state.done()   # read before the folder: a part commits before its mark
    committed = committed_parts(out, job_id, plan.n_batches if plan is not None else None)
    stale = done_before - set(committed)
    other = before.get("out")
    if stale and other and other != str(out) and state.running():
        raise InputError(f"job {job_id} (the same corpus, model and batch settings) is being embedded into "
                         f"{other} through this broker right now: wait until it finishes, or change a batch "
                         "setting (e.g. --batch-tokens) to make this a separate job")
    state.create({"n_batches": plan.n_batches if plan is not None else 0,
                  "planned_rows": plan.n_rows if plan is not None else 0, "out": str(out),
                  "model": meta.fingerprint, "max_seq_len": meta.max_seq_len, "corpus": corpus.uri}, tokenizer_json)
    if stale:
        logger.warning("job %s: Redis held %d batches as done that %s does not hold (the same job sent to another "
                       "folder, or parts deleted): they are embedded again", job_id, len(stale), out)
        state.forget_progress()
    new = state.reconcile(committed)
    if new:
        logger.info("job %s: %d batches already committed in %s", job_id, new, out)
    return state, committed


def _run_queue(corpus: Corpus, cfg: FbasConfig, out: OutputDir, job: Job | None, id_hash: np.ndarray | None,
               meta: Any, model_dir: Path, client: Any, broker: str, cluster: Any, progress: bool,
               ready: Callable[[], None], windows: Iterator[Window] | None) -> tuple[Job, int, int, int]:
    """Enqueue the missing batches and wait for all of them; returns (job, sent, resumed, redelivered).

    A new job (``job`` None) is planned here from its scan (``windows``, started by ``ingest``), window by
    window, its batches queued as each window is planned; a resumed one re-reads the corpus for its missing
    batches."""
    from dataclasses import replace

    from workers.app import QUEUE, TASK_NAME, producer_app

    app = producer_app(FbasConfig(queue=replace(cfg.queue, broker=broker), serve=cfg.serve))
    tok_json = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
    job_id = job.id if job is not None else job_id_for(corpus, cfg, meta)
    state, committed = _job_state(client, job_id, job.plan if job is not None else None, corpus, meta, tok_json, out)
    logger.info("job %s registered in Redis (%d batches committed already)", job_id, len(committed))
    bar = _Progress(job.plan.n_rows if job is not None else corpus.n_rows, progress)
    watch = _Watch(state, cluster, cfg, bar, client)
    sender = Sender(app, client, QUEUE, cfg.queue.queue_depth, TASK_NAME, on_wait=watch.tick)

    def send(msg: dict) -> None:
        ready()
        sender.send(msg)

    try:
        watch.tick(force=True)
        if job is None:
            def on_window(n_batches: int, n_rows: int) -> None:
                state.set_planned(n_batches, n_rows)   # status shows the plan as it grows
                watch.tick()                           # checks children and worker errors between sends too

            job = scan_and_send(corpus, cfg, out, meta, None, id_hash, send, state.done(), on_window=on_window,
                                windows=windows)
            bar.set_total(job.plan.n_rows)
        else:
            for msg in batch_messages(corpus, job.plan, job=job.id, out=str(out), model=meta.fingerprint,
                                      dim=meta.dim, skip=state.done()):
                send(msg)
        plan, n_batches = job.plan, job.plan.n_batches
        while True:
            if watch.tick() >= n_batches:
                break
            action = watch.needs_reenqueue(QUEUE)
            if action:
                if action == "lost":
                    state, _ = _job_state(client, job.id, plan, corpus, meta, tok_json, out)
                    watch.state = state
                done = state.done()
                logger.warning("re-enqueueing %d batches (%s)", n_batches - len(done), action)
                for msg in batch_messages(corpus, plan, job=job.id, out=str(out), model=meta.fingerprint,
                                          dim=meta.dim, skip=done):
                    sender.send(msg)
            time.sleep(_POLL_S)
        watch.tick(force=True)
    finally:
        bar.close()
        app.close()
    return job, sender.sent, len(committed), state.counters()["redelivered"]


# how often the producer looks at the job's progress in Redis (a few small reads): the end of a job is seen
# within this, so it is short (0.2 s before: up to 0.2 s between the last part's commit and finalize)
_POLL_S = 0.05


class _Watch:
    """Polls job progress for the bar and notices trouble (worker errors, dead children, lost or stuck jobs)."""

    def __init__(self, state: JobState, cluster: Any, cfg: FbasConfig, bar: _Progress, client: Any) -> None:
        self.state, self.cluster, self.cfg, self.bar, self.client = state, cluster, cfg, bar, client
        self.last_n, self.last_change, self.last_poll, self.n_done = -1, time.monotonic(), 0.0, 0

    def tick(self, force: bool = False) -> int:
        """Poll (at most every ``_POLL_S`` unless forced); return the number of done batches."""
        now = time.monotonic()
        if not force and now - self.last_poll < _POLL_S:
            return self.n_done
        self.last_poll = now
        if self.cluster is not None:
            self.cluster.check()
        errors = self.state.errors()
        if errors:
            raise ConfigError(f"a worker reported: {errors[0]}")
        self.n_done = self.state.n_done()
        self.bar.update(self.state.counters())
        if self.n_done != self.last_n:
            self.last_n, self.last_change = self.n_done, now
        return self.n_done

    def needs_reenqueue(self, queue: str) -> str | None:
        """'lost' when Redis forgot the job, 'stalled' when nothing moved for visibility_timeout + 30 s."""
        try:
            if not self.state.exists():
                return "lost"
        except ServerUnavailableError:
            return None
        stall = self.cfg.queue.visibility_timeout + 30
        if time.monotonic() - self.last_change > stall and queue_length(self.client, queue) == 0:
            self.last_change = time.monotonic()
            return "stalled"
        return None
