"""Watching a running job: progress polls, worker errors, dead local children, lost or stalled batches."""

from __future__ import annotations

import logging
import signal
import time
from contextlib import contextmanager
from typing import Any

from core.config import FbasConfig
from core.errors import ConfigError, ServerUnavailableError
from pipeline.ingest.produce import queue_length
from pipeline.ingest.progress import IngestProgress
from workers.jobstate import JobState

logger = logging.getLogger(__name__)

__all__ = ["Watch", "ReadyOnce", "sigterm_as_interrupt", "POLL_S"]


@contextmanager
def sigterm_as_interrupt():
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


class ReadyOnce:
    """Waits, once, for the local cluster's Triton to serve the model (called before the first batch is
    queued, so the scan of the first window overlaps Triton's start); ``seconds``: when it was ready."""

    def __init__(self, cluster: Any, t0: float) -> None:
        self.cluster, self.t0 = cluster, t0
        self.seconds: float | None = None

    def __call__(self) -> None:
        if self.seconds is None:
            if self.cluster is not None:
                self.cluster.wait_ready()
            self.seconds = round(time.perf_counter() - self.t0, 3)
            logger.info("cluster ready, first batch going out after %.2fs", self.seconds)


# how often the producer looks at the job's progress in Redis (a few small reads): the end of a job is seen
# within this, so it is short: finalize follows the last part's commit without a noticeable wait
POLL_S = 0.05


class Watch:
    """Polls job progress for the bar and notices trouble (worker errors, dead children, lost or stuck jobs)."""

    def __init__(self, state: JobState, cluster: Any, cfg: FbasConfig, bar: IngestProgress, client: Any) -> None:
        self.state, self.cluster, self.cfg, self.bar, self.client = state, cluster, cfg, bar, client
        self.last_n, self.last_change, self.last_poll, self.n_done = -1, time.monotonic(), 0.0, 0

    def tick(self, force: bool = False) -> int:
        """Poll (at most every ``POLL_S`` unless forced); return the number of done batches."""
        now = time.monotonic()
        if not force and now - self.last_poll < POLL_S:
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
