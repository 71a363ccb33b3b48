"""The batch task: tokenize, embed through Triton, write the part, record it done.

Message (msgpack, one per planned batch; ``pipeline.ingest.produce`` builds it):

    {"v": 2, "job": str, "batch": int, "out": str, "model": str (model fingerprint), "dim": int,
     "id_type": "int64" | "string", "row_ids": [int], "ids": [int | str], "texts": [str],
     "repaired": [positions in the batch whose invalid UTF-8 was replaced]}

A chunked job's message is version 3 (``CHUNKED_VERSION``): its rows are chunks (``texts``: each chunk's text,
with its title) and ``"chunks": {"doc_row": [int], "chunk": [int], "tok_start": [int], ...}``
(``core.formats.CHUNK_FIELDS``) gives the columns its vectors part adds. A worker that reads only version 2
refuses it, naming the upgrade.

What makes it idempotent and bounded (docs/reliability.md):

* a batch whose vectors part is already committed for this job is only recorded done again;
* every delivery is counted in Redis (``attempts``), and each one found to have died unfinished
  (``crashes``: its worker process is gone); a batch whose deliveries died without
  finishing (worker killed, OOM, hard time limit) more than ``max_retries`` times is
  quarantined whole with that reason, so a poison batch never loops;
* transient faults (Triton or Redis unreachable, the soft time limit) are retried by Celery
  with exponential backoff at most ``max_retries`` times, then the batch is quarantined with
  the error as its reason: the job always finishes;
* the Triton model must be the job's (fingerprint); if not, the worker reports a job error
  and writes nothing (the producer stops with the message).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_init, worker_process_init

from core.envs import read_env
from core.errors import InputError, PermanentError, ServerUnavailableError, TransientError
from core.formats import ChunkCols
from core.layout import OutputDir
from workers import metrics
from workers.app import TASK_NAME, app, current_config
from workers.infer import embed_checked, encoder_for, subset
from workers.jobstate import JobState, connect, heartbeat
from workers.signing import CHUNKED_VERSION, MESSAGE_VERSION, verify
from workers.write import BatchOutput, write_batch

logger = logging.getLogger(__name__)

__all__ = ["embed_batch", "BatchMessage", "run_batch", "MESSAGE_VERSION"]

MESSAGE_VERSIONS = (MESSAGE_VERSION, CHUNKED_VERSION)
READS = ", ".join(map(str, MESSAGE_VERSIONS))  # for the errors that name them
_REDIS: dict[tuple[int, str], Any] = {}
_TOKENIZERS: dict[str, Any] = {}


@dataclass
class BatchMessage:
    """A decoded, checked task message."""

    job: str
    batch: int
    out: str
    model: str
    id_type: str
    dim: int
    row_ids: np.ndarray
    ids: list
    texts: list[str]
    repaired: np.ndarray  # bool [n]
    chunks: ChunkCols | None = None  # version 3 (CHUNKED_VERSION): a chunked job's per-row columns

    @classmethod
    def parse(cls, msg: dict) -> BatchMessage:
        try:
            if msg.get("v") not in MESSAGE_VERSIONS:
                raise InputError(
                    f"message version {msg.get('v')!r}, this worker reads {READS}: "
                    "upgrade the worker or the producer so that both run the same fbas"
                )
            n = len(msg["row_ids"])
            if len(msg["ids"]) != n or len(msg["texts"]) != n:
                raise InputError(f"batch {msg['batch']}: row_ids, ids and texts differ in length")
            rep = np.zeros(n, dtype=bool)
            rep[np.asarray(msg.get("repaired") or [], dtype=np.int64)] = True
            chunks = ChunkCols.from_lists(msg["chunks"]) if msg["v"] == CHUNKED_VERSION else None
            if chunks is not None and any(len(a) != n for a in chunks.arrays()):
                raise InputError(f"batch {msg['batch']}: chunk columns and row_ids differ in length")
            return cls(
                str(msg["job"]),
                int(msg["batch"]),
                str(msg["out"]),
                str(msg["model"]),
                str(msg["id_type"]),
                int(msg["dim"]),
                np.asarray(msg["row_ids"], dtype=np.int64),
                list(msg["ids"]),
                list(msg["texts"]),
                rep,
                chunks,
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise InputError(f"malformed batch message ({type(e).__name__}: {e})") from None


HEARTBEAT_S, HEARTBEAT_TTL_S = 3.0, 10.0  # a process that misses three beats counts as gone


def _beat() -> None:
    """Renew this pool process's heartbeat (``workers.jobstate.heartbeat``) while it lives."""
    url = current_config().queue.broker
    if not url:
        return
    where = f"{socket.gethostname()}:{os.getpid()}"
    while True:
        try:
            heartbeat(_redis(url), where, HEARTBEAT_TTL_S)
        except ServerUnavailableError as e:  # the broker is away: the watchdog and the producer handle that
            logger.debug("heartbeat not sent: %s", e)
        time.sleep(HEARTBEAT_S)


@worker_process_init.connect
def _start_heartbeat(**_: Any) -> None:
    threading.Thread(target=_beat, name="heartbeat", daemon=True).start()


@worker_process_init.connect
def _preload(**_: Any) -> None:
    """Import the heavy modules in each pool process as it starts, not inside its first batch."""
    import importlib

    for name in ("faiss", "pyarrow.parquet", "tokenizers", "dll.wordpiece", "workers.triton_client"):
        importlib.import_module(name)
    # pyarrow imports pandas, where it is installed, on its first pa.array (a slow import): now, not
    # inside the first batch's write
    importlib.import_module("pyarrow").array([0])


@worker_init.connect
def _warm_tokenizer_tables(**_: Any) -> None:
    """Load the C tokenizer's tables for uncased BERT's normalizer (all-MiniLM-L6-v2's, the default model's) in
    the worker's main process, before its pool forks, so that each pool process starts with them. On a host
    that has never built them (per ``tokenizers`` version) this builds them once, here: seconds of one core,
    which the pool's 20 processes otherwise spent each at once on their first batch (NOTES 4l). Other
    normalizers are built on first use, by one process per host (``dll.wordpiece_tables``)."""
    try:
        from dll.wordpiece_tables import NormalizerFlags, tables_for

        tables_for(NormalizerFlags(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True))
    except Exception as e:  # noqa: BLE001 - a warm cache only: the first batch loads or builds what it needs
        logger.warning("the tokenizer's tables were not loaded ahead (%s): the first batch will", e)


def _redis(url: str) -> Any:
    key = (os.getpid(), url)
    if key not in _REDIS:
        _REDIS.clear()
        _REDIS[key] = connect(url)
    return _REDIS[key]


class JobNotReady(TransientError):
    """The job's keys are not in Redis (yet, or again after a broker lost them): its producer writes them. Such
    a batch waits for them (``NOT_READY_RETRIES`` x 5 s) rather than spending its retries for real faults."""


NOT_READY_RETRIES = 120


def _tokenizer(state: JobState, job: str, max_seq_len: int) -> Any:
    from dll.wordpiece import make_tokenizer

    tok = _TOKENIZERS.get(job)
    if tok is None:
        text = state.tokenizer_json()
        if text is None:
            raise JobNotReady(f"job {job} has no tokenizer in Redis yet (the producer writes it first)")
        tok = make_tokenizer(text, max_seq_len)  # the C tokenizer where it applies, else HF's
        if len(_TOKENIZERS) > 8:
            _TOKENIZERS.clear()
        _TOKENIZERS[job] = tok
    return tok


def _test_hooks(m: BatchMessage, attempt: int) -> None:
    """Test hooks (FAISS's ``crash_at`` idea), read from the worker's environment, mid-batch (after tokenizing):

    * ``FBAS_TEST_PAUSE=BATCH:SECONDS[:OUT_SUBSTRING]`` sleeps on the first delivery of that batch, so a test
      can kill the worker while it runs;
    * ``FBAS_TEST_CRASH=BATCH[:OUT_SUBSTRING]`` kills the worker process on every delivery (a poison batch).

    OUT_SUBSTRING limits a hook to jobs whose output path contains it."""
    env = read_env()
    spec = env.get("test_pause")
    if spec and attempt == 1:
        parts = spec.split(":", 2)
        if parts[0].strip() == str(m.batch) and (len(parts) < 3 or parts[2] in m.out):
            secs = float(parts[1]) if len(parts) > 1 and parts[1] else 5.0
            logger.warning("test hook: pausing batch %d for %.1fs", m.batch, secs)
            time.sleep(secs)
    spec = env.get("test_crash")
    if spec:
        b, _, tag = spec.partition(":")
        if b.strip() == str(m.batch) and (not tag or tag in m.out):
            logger.warning("test hook: killing this worker process in batch %d", m.batch)
            os.kill(os.getpid(), 9)


def _all_quarantined(m: BatchMessage, dim: int, reason: str) -> BatchOutput:
    n = len(m.row_ids)
    return BatchOutput(
        m.job,
        m.batch,
        m.model,
        dim,
        m.id_type,
        m.row_ids[:0],
        [],
        np.zeros((0, dim), np.float32),
        np.zeros(0, np.int32),
        np.zeros(0, bool),
        np.zeros(0, bool),
        m.row_ids,
        m.ids,
        [reason] * n,
        m.chunks.take(np.zeros(0, np.int64)) if m.chunks is not None else None,
    )


def run_batch(m: BatchMessage, engine: Any, tokenizer: Any, dim: int, attempt: int = 1) -> BatchOutput:
    """Tokenize and embed one batch; rows the engine cannot embed go to the batch's quarantine, as do texts
    with no tokens ([CLS] [SEP] only: control characters), which a producer that estimated lengths could
    not see (``--lengths estimate``); an exact scan quarantines them before they are sent."""
    with metrics.stage(m.job, "tokenize"):
        enc = tokenizer.encode(m.texts)
    _test_hooks(m, attempt)
    has_tokens = enc.lengths > 2
    failed: dict[int, str] = {int(r): "no_tokens" for r in np.flatnonzero(~has_tokens)}
    vectors = np.zeros((len(m.row_ids), dim), dtype=np.float32)
    send = np.flatnonzero(has_tokens)
    if len(send):
        with metrics.stage(m.job, "infer"):
            res = embed_checked(engine, *subset(enc.token_ids, enc.lengths, send), dim)
        vectors[send] = res.vectors
        failed.update((int(send[r]), why) for r, why in res.failed.items())
    ok = np.ones(len(m.row_ids), dtype=bool)
    ok[list(failed)] = False
    q = np.flatnonzero(~ok)
    return BatchOutput(
        m.job,
        m.batch,
        m.model,
        dim,
        m.id_type,
        m.row_ids[ok],
        [i for i, k in zip(m.ids, ok) if k],
        np.ascontiguousarray(vectors[ok]),
        enc.lengths[ok].astype(np.int32),
        enc.truncated[ok],
        m.repaired[ok],
        m.row_ids[q],
        [m.ids[i] for i in q],
        [failed[int(i)] for i in q],
        m.chunks.take(np.flatnonzero(ok)) if m.chunks is not None else None,
    )


def _trusted(msg: Any, cfg: Any) -> bool:
    """Whether a task message carries this fleet's signature; a message that does not is logged and dropped,
    touching nothing (not even its job's state: the job named in it may be made up)."""
    key = cfg.queue.task_key
    if key and verify(msg, key):
        return True
    claimed = {k: msg.get(k) for k in ("job", "batch", "out")} if isinstance(msg, dict) else {}
    version = msg.get("v") if isinstance(msg, dict) else None
    if not key:
        why = "this worker has no FBAS_TASK_KEY to check it with"
    elif version not in MESSAGE_VERSIONS:
        why = (
            f"it is a version {version!r} message and this worker reads versions {READS}, whose signature "
            "differs: run the same fbas release on producers and workers"
        )
    else:
        why = "it is not signed with this fleet's FBAS_TASK_KEY (forged, or from a producer with another key)"
    logger.error("refused a task message %s: %s; nothing of it was embedded or written", claimed, why)
    return False


def out_roots(cfg: Any) -> list[Path]:
    """The folders this worker may write job outputs into (``queue.out_root``; default: its working folder)."""
    raw = cfg.queue.out_root or os.getcwd()
    return [Path(r.strip()).expanduser().resolve() for r in raw.split(",") if r.strip()]


def _allowed(out: OutputDir, cfg: Any) -> bool:
    return any(out.root == r or out.root.is_relative_to(r) for r in out_roots(cfg))


def _backoff(retries: int) -> float:
    """Seconds before retry ``retries + 1``: 1, 2, 4, ... capped at 30, with jitter."""
    import random

    return min(30.0, 2.0**retries) * random.uniform(0.75, 1.0)


class _JobProblem(Exception):
    """Something about the job, not the batch, that this worker cannot get past (a wrong model behind Triton,
    an output folder it may not write to, a failed write): reported to the job, the batch left undone."""


def _job_problem(state: JobState, m: BatchMessage, problem: str, code: str) -> dict:
    logger.error(problem)
    state.report_error(problem)
    metrics.batch(m.job, "error")
    return {"batch": m.batch, "error": code}


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True, max_retries=None)
def embed_batch(self, msg: dict) -> dict:
    """Celery entry point: one planned batch (see the module docstring). Returns a small summary dict."""
    cfg = current_config()
    t_read = time.perf_counter()
    if not _trusted(msg, cfg):
        metrics.batch("", "refused")  # no job label: the job named in it may be made up
        return {"error": "refused"}
    try:
        m = BatchMessage.parse(msg)
    except InputError:
        metrics.batch("", "refused")
        raise
    metrics.observe(m.job, "read", time.perf_counter() - t_read)
    assert cfg.queue.broker is not None, "a worker gets its tasks from the broker, so one is configured"
    state = JobState(_redis(cfg.queue.broker), m.job)
    out = OutputDir(m.out)
    if not _allowed(out, cfg):
        problem = (
            f"worker {socket.gethostname()} does not write to {out}: it is outside the folders it may write to "
            f"({', '.join(map(str, out_roots(cfg)))}); start the worker with FBAS_OUT_ROOT (or --out-root) naming "
            "a folder that holds it"
        )
        return _job_problem(state, m, problem, "output folder not allowed")
    attempt, crashed = state.begin(m.batch, f"{socket.gethostname()}:{os.getpid()}")
    retries = int(self.request.retries or 0)
    if crashed and attempt > 1:  # this delivery follows one that died (a later one counts it again: no matter)
        state.count("redelivered")
        metrics.redelivered(m.job)
    committed = out.read_part_meta(m.batch)
    if committed and committed.get("job") == m.job and committed.get("batch") == m.batch:
        state.mark_done(m.batch, committed["rows"], committed["tokens"], committed["quarantined"])
        metrics.batch(m.job, "duplicate")
        return {"batch": m.batch, "already": True}
    t0 = time.perf_counter()
    try:
        result = _compute(self, cfg, m, state, attempt, crashed, retries)
    except _JobProblem as e:
        return _job_problem(state, m, str(e), "model mismatch")
    done = _commit(out, m, result, state, t0)
    metrics.observe(m.job, "task", time.perf_counter() - t_read)
    return done


def _compute(task: Any, cfg: Any, m: BatchMessage, state: JobState, attempt: int, crashed: int, retries: int):
    """The batch's results: embedded, or quarantined whole when it keeps killing its workers or keeps failing;
    a transient fault is retried (Celery's ``retry`` raises) while retries are left."""
    try:
        enc_model = encoder_for(cfg)
        info = enc_model.info
        if info.fingerprint and m.model and info.fingerprint != m.model:
            raise _JobProblem(
                f"Triton at {cfg.serve.triton} serves model {cfg.serve.model_name!r} with fingerprint "
                f"{info.fingerprint}, but job {m.job} was planned for {m.model}: serve the job's model "
                "(the same `fbas-pipeline build` settings) or rerun ingest with this one"
            )
        if crashed > cfg.queue.max_retries:
            logger.error("batch %d of job %s quarantined after %d crashed deliveries", m.batch, m.job, crashed)
            return _all_quarantined(
                m,
                m.dim,
                f"poison: {crashed} deliveries of this batch died without "
                "finishing (worker killed, out of memory or over the time limit)",
            )
        return run_batch(m, enc_model, _tokenizer(state, m.job, info.max_seq_len), info.dim, attempt)
    except JobNotReady as e:
        if retries < NOT_READY_RETRIES:
            raise task.retry(exc=e, countdown=5.0) from None
        return _all_quarantined(m, m.dim, f"transient error after {retries} retries: {str(e)[:300]}")
    except (TransientError, SoftTimeLimitExceeded) as e:
        if retries < cfg.queue.max_retries:
            delay = _backoff(retries)
            logger.warning("batch %d: %s; retry %d/%d in %.1fs", m.batch, e, retries + 1, cfg.queue.max_retries, delay)
            state.count("retries")
            state.report_warning(f"worker {socket.gethostname()}: batch {m.batch}: {str(e)[:300]}; retrying")
            metrics.batch(m.job, "retried")
            raise task.retry(exc=e, countdown=delay) from None
        return _all_quarantined(m, m.dim, f"transient error after {retries} retries: {str(e)[:300]}")
    except PermanentError as e:
        return _all_quarantined(m, m.dim, f"permanent error: {str(e)[:300]}")
    except _JobProblem:
        raise
    except Exception as e:  # noqa: BLE001 - task boundary: an unexpected error must not lose the batch
        logger.exception("batch %d: unexpected error", m.batch)
        if retries < cfg.queue.max_retries:
            state.count("retries")
            metrics.batch(m.job, "retried")
            raise task.retry(exc=e, countdown=_backoff(retries)) from None
        return _all_quarantined(m, m.dim, f"error after {retries} retries: {type(e).__name__}: {str(e)[:300]}")


def _commit(out: OutputDir, m: BatchMessage, result: BatchOutput, state: JobState, t0: float) -> dict:
    """Write the batch's files (the vectors part last: the commit) and mark it done; a duplicate delivery
    whose twin committed first writes nothing."""
    try:
        with metrics.stage(m.job, "write"):
            written = write_batch(out, result)
    except OSError as e:  # disk full, permissions: a job error, not the rows' fault; a rerun redoes the batch
        return _job_problem(state, m, f"batch {m.batch}: cannot write to {out}: {e.strerror or e}", "write failed")
    if not written:
        committed = out.read_part_meta(m.batch) or result.meta()
        state.mark_done(m.batch, committed["rows"], committed["tokens"], committed["quarantined"])
        metrics.batch(m.job, "duplicate")
        return {"batch": m.batch, "already": True}
    state.mark_done(m.batch, len(result.row_ids), int(result.n_tokens.sum(dtype=np.int64)), len(result.q_row_ids))
    metrics.committed(m.job, result.n_tokens, len(result.q_row_ids))
    logger.info(
        "batch %d: %d docs, %d quarantined in %.2fs",
        m.batch,
        len(result.row_ids),
        len(result.q_row_ids),
        time.perf_counter() - t0,
    )
    return {"batch": m.batch, "docs": len(result.row_ids), "quarantined": len(result.q_row_ids)}
