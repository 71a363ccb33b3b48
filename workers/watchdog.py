"""A worker that keeps consuming after its broker comes back.

After a Redis restart a Celery worker can reconnect yet never take another message (Celery issues 8030, 9054
and 10205 report it; the integration test ``test_broker_outage`` reproduces it with Celery 5.7). So each
worker's main process runs ``BrokerWatchdog``: it pings the broker every few seconds and, once the broker
answers again after an outage, or answers as another start of the server (its ``run_id`` changed: a restart
quicker than the pings, which redis-py's reconnect on checkout hides from a ping), stops the worker warm
(running batches finish) with exit code ``EX_RESTART``; its supervisor (``services.worker.CeleryWorker``: local
mode and ``fbas-pipeline worker``) starts a fresh one.
"""

from __future__ import annotations

import logging
import threading
import time

from core.redact import redact_url
from workers.jobstate import connect_lazy, ping_error, server_id

logger = logging.getLogger(__name__)

__all__ = ["BrokerWatchdog", "EX_RESTART", "install"]

EX_RESTART = 75  # EX_TEMPFAIL: "try again"; the supervisor restarts a worker that exits with it
OUTAGE_PINGS = 3  # consecutive slow pings (every 2 s) that make an outage, not a broker busy for a moment


class BrokerWatchdog(threading.Thread):
    """Pings ``url`` every ``interval`` seconds; after an outage (a failed ping, then an answer), or when the
    broker answers as another start of itself, it calls ``on_recovered`` once and ends."""

    def __init__(self, url: str, interval: float = 2.0, on_recovered=None) -> None:
        super().__init__(name="broker-watchdog", daemon=True)
        self.url, self.interval = url, interval
        self.on_recovered = on_recovered or _restart_worker
        self.stopped = threading.Event()

    def run(self) -> None:
        client = connect_lazy(self.url, timeout=max(1.0, self.interval))
        down_since: float | None = None
        misses = 0
        first_id: str | None = None  # the server's run id when this worker first reached it
        while not self.stopped.wait(self.interval):
            error = ping_error(client)
            if error is None:
                now_id = server_id(client)
                first_id = first_id or now_id
                restarted = now_id is not None and now_id != first_id
                if restarted or (misses >= OUTAGE_PINGS and down_since is not None):
                    logger.warning(
                        "the broker %s answers again %s: restarting this worker so that it consumes again",
                        redact_url(self.url),
                        "as a new start of the server"
                        if restarted
                        else f"after {time.monotonic() - (down_since or time.monotonic()):.0f}s",
                    )
                    self.on_recovered()
                    return
                down_since, misses = None, 0  # a missed ping or two (a busy broker) is no outage
                continue
            # a refused or dropped connection is an outage at once (the broker went away or restarted, and
            # the consumer's connection with it); a slow answer only when it keeps happening
            before, misses = misses, max(misses + 1, OUTAGE_PINGS if error == "connection" else 0)
            if down_since is None:
                down_since = time.monotonic()
            if before < OUTAGE_PINGS <= misses:
                logger.warning("the broker %s stopped answering: waiting for it", redact_url(self.url))


def _restart_worker() -> None:
    """Ask Celery's main loop for a warm shutdown with ``EX_RESTART`` (what its SIGTERM handler does, with
    another exit code)."""
    from celery.worker import state

    state.should_stop = EX_RESTART


def install() -> None:
    """Start a watchdog in each worker's main process when it is ready, stop it at shutdown."""
    from celery.signals import worker_ready, worker_shutdown

    watchdogs: list[BrokerWatchdog] = []

    @worker_ready.connect(weak=False)
    def _start(sender=None, **_kw) -> None:
        url = sender.app.conf.broker_url if sender is not None else None
        if url:
            watchdogs.append(BrokerWatchdog(url))
            watchdogs[-1].start()

    @worker_shutdown.connect(weak=False)
    def _stop(**_kw) -> None:
        for w in watchdogs:
            w.stopped.set()
