"""Prometheus metrics of a worker: what it embedded, how its batches ended, and where the time went.

    fbas-pipeline worker --metrics-port 9108      # http://127.0.0.1:9108/metrics (--metrics-host to widen)

Every metric is labelled ``job_id`` (the ingest job), not ``job``: Prometheus attaches its own ``job`` label to
every target it scrapes and would rename ours to ``exported_job``.

* ``fbas_docs_total``: rows embedded (committed batches only, so it matches the manifest's ``embedded``);
* ``fbas_tokens_total{kind}``: ``real``, the tokens of those rows (the manifest's ``tokens``), and ``padded``,
  rows x the batch's longest row;
* ``fbas_batches_total{outcome}``: ``committed``, ``quarantined`` (committed with every row quarantined),
  ``duplicate`` (already committed: recorded done again), ``retried``, ``refused`` (unsigned or malformed
  message) and ``error`` (a job error: model mismatch, output folder not allowed or not writable);
* ``fbas_quarantined_rows_total``, ``fbas_redeliveries_total`` (deliveries after a crashed one);
* ``fbas_stage_seconds{stage}``: histograms of ``read`` (check and decode the message), ``tokenize``,
  ``infer`` (the Triton calls) and ``write`` (vectors and quarantine parts), and ``task``: a computed batch's
  whole time in the task (what the four stages leave of it is Redis and the checks around them).

Tasks run in Celery's prefork pool, so the metrics use prometheus_client's multiprocess mode: each pool process
writes its own files into ``PROMETHEUS_MULTIPROC_DIR`` (a fresh private folder that
``services.worker.CeleryWorker`` makes for each worker), and the worker's main process serves their sum
(``install``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server

logger = logging.getLogger(__name__)

__all__ = ["MULTIPROC_ENV", "batch", "committed", "install", "observe", "redelivered", "stage"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
JOB = "job_id"

DOCS = Counter("fbas_docs", "rows embedded (in committed batches)", [JOB])
TOKENS = Counter(
    "fbas_tokens",
    "tokens of the rows embedded: kind=real, their own lengths; kind=padded, rows x the batch's longest row, "
    "what an engine that pads each batch computes (the gpu target does not pad: it computes the real ones)",
    [JOB, "kind"],
)
BATCHES = Counter(
    "fbas_batches",
    "batch deliveries by how they ended: committed, quarantined (committed, every row quarantined), duplicate "
    "(committed before), retried, refused (unsigned or malformed message), error (job error, nothing written)",
    [JOB, "outcome"],
)
QUARANTINED = Counter("fbas_quarantined_rows", "rows quarantined by workers (in committed batches)", [JOB])
REDELIVERIES = Counter("fbas_redeliveries", "deliveries of a batch whose earlier delivery died unfinished", [JOB])
STAGE_SECONDS = Histogram(
    "fbas_stage_seconds",
    "seconds per batch in each stage: read (check and decode the message), tokenize, infer (Triton calls), "
    "write (quarantine and vectors parts); task: the whole task of a computed batch",
    [JOB, "stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)


def _safe(fn: Callable[..., None]) -> Callable[..., None]:
    """Metrics never fail a batch: an error writing them (a full or removed metrics folder) is logged once."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> None:
        try:
            fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the batch's own work goes on
            if not _FAILED:
                _FAILED.append(e)
                logger.warning("metrics not recorded (%s: %s); batches go on without them", type(e).__name__, e)

    return wrapper


_FAILED: list[BaseException] = []


@_safe
def observe(job: str, name: str, seconds: float) -> None:
    STAGE_SECONDS.labels(job, name).observe(seconds)


@contextmanager
def stage(job: str, name: str) -> Iterator[None]:
    """Time the block as stage ``name`` of a batch of ``job`` (also when it raises)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        observe(job, name, time.perf_counter() - t0)


@_safe
def batch(job: str, outcome: str) -> None:
    BATCHES.labels(job, outcome).inc()


@_safe
def redelivered(job: str) -> None:
    REDELIVERIES.labels(job).inc()


@_safe
def committed(job: str, n_tokens: np.ndarray, quarantined: int) -> None:
    """A batch this worker committed: its embedded rows' token counts, and how many rows it quarantined."""
    rows = len(n_tokens)
    DOCS.labels(job).inc(rows)
    TOKENS.labels(job, "real").inc(int(n_tokens.sum(dtype=np.int64)))
    TOKENS.labels(job, "padded").inc(rows * int(n_tokens.max()) if rows else 0)
    QUARANTINED.labels(job).inc(quarantined)
    batch(job, "committed" if rows else "quarantined")


def install(queue_settings: Callable[[], Any]) -> None:
    """In a worker's main process, once it is ready: serve the pool's metrics on the ``worker_metrics_host`` and
    ``worker_metrics_port`` of ``queue_settings()`` (a ``QueueConfig``; port 0: not at all). Pool processes that
    end are marked dead."""
    from celery.signals import worker_process_shutdown, worker_ready, worker_shutdown

    servers: list[Any] = []

    @worker_ready.connect(weak=False)
    def _serve(**_kw: Any) -> None:
        q = queue_settings()
        if not q.worker_metrics_port:
            return
        if not os.environ.get(MULTIPROC_ENV):
            logger.warning(
                "no metrics endpoint: %s is not set, so the pool processes' metrics cannot be collected (a "
                "worker started by `fbas-pipeline worker` has it; set it to an empty folder of its own)",
                MULTIPROC_ENV,
            )
            return
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        try:
            server, _thread = start_http_server(q.worker_metrics_port, addr=q.worker_metrics_host, registry=registry)
        except OSError as e:  # the port is taken (another worker on this host): embedding goes on without it
            logger.warning(
                "no metrics endpoint on %s:%d: %s", q.worker_metrics_host, q.worker_metrics_port, e.strerror or e
            )
            return
        servers.append(server)
        logger.info("metrics on http://%s:%d/metrics", q.worker_metrics_host, q.worker_metrics_port)

    @worker_shutdown.connect(weak=False)
    def _stop(**_kw: Any) -> None:
        for server in servers:
            server.shutdown()
            server.server_close()

    @worker_process_shutdown.connect(weak=False)
    def _mark_dead(pid: int | None = None, **_kw: Any) -> None:
        if os.environ.get(MULTIPROC_ENV):
            multiprocess.mark_process_dead(pid or os.getpid())
