"""Watching a running job: progress polls, worker errors, dead local children, lost or stalled batches, and
a broker that stops answering for a while."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, TypeVar

from core.config import FbasConfig, visibility_seconds
from core.errors import ConfigError, ServerUnavailableError
from core.redact import redact_url
from pipeline.ingest.produce import queue_length
from pipeline.ingest.progress import IngestProgress, Steps
from workers.jobstate import JobState, ping

logger = logging.getLogger(__name__)

T = TypeVar("T")

ORPHAN_CHECK_S = 2.0  # how often a producer looks for batches whose worker vanished
RELAY_S = 1.0  # how often it relays what workers reported
NO_WORKER_S = 10.0  # after this long with no batch taken, it says that nothing consumes

__all__ = ["Watch", "ReadyOnce", "BrokerOutage", "sigterm_as_interrupt", "POLL_S"]


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

    def __init__(self, cluster: Any, t0: float, steps: Steps | None = None) -> None:
        self.cluster, self.t0, self.steps = cluster, t0, steps or Steps(enabled=False)
        self.seconds: float | None = None

    def __call__(self) -> None:
        if self.seconds is None:
            if self.cluster is not None:
                what = "waiting for tritonserver to load the model"
                self.steps.begin(what)
                self.cluster.wait_ready()
                self.steps.end(what)
            self.seconds = round(time.perf_counter() - self.t0, 3)
            logger.info("cluster ready, first batch going out after %.2fs", self.seconds)


# how often the producer looks at the job's progress in Redis (a few small reads): the end of a job is seen
# within this, so it is short: finalize follows the last part's commit without a noticeable wait
POLL_S = 0.05


class BrokerOutage:
    """Rides out a broker that stops answering (restarted, a network blip): ``wait(error)`` pings it with
    growing pauses (0.5 s doubling up to 5 s, a log line per try) until it answers, or raises past ``budget``
    seconds, saying that a rerun resumes. Afterwards ``recovered`` is set: the producer then registers the job
    again and re-sends the batches the outage lost (``workers.jobstate.queued_batches``)."""

    def __init__(self, client: Any, url: str, budget: float, check: Callable[[], None] | None = None) -> None:
        self.client, self.url, self.budget, self.check = client, url, budget, check
        self.recovered = False
        self.outages = 0

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, again after each outage it runs into."""
        while True:
            try:
                return fn()
            except ServerUnavailableError as e:
                self.wait(e)

    def wait(self, error: ServerUnavailableError) -> None:
        if self.check is not None:
            self.check()  # local mode: a dead child (redis-server) is named as such, not waited for
        if ping(self.client):
            raise error  # the broker answers: this error is not an outage
        t0, pause, tries = time.monotonic(), 0.5, 0
        logger.warning(
            "the broker at %s stopped answering (%s): waiting up to %.0fs for it (--broker-wait)",
            redact_url(self.url),
            error,
            self.budget,
        )
        while True:
            left = self.budget - (time.monotonic() - t0)
            if left <= 0:
                raise ServerUnavailableError(
                    f"the broker at {redact_url(self.url)} did not answer for {self.budget:.0f}s (--broker-wait): "
                    "bring it back and rerun the same command; it resumes where this run stopped"
                )
            time.sleep(min(pause, left))
            pause, tries = min(5.0, pause * 2), tries + 1
            if ping(self.client):
                logger.warning(
                    "the broker answers again after %.1fs (%d tries): re-sending what the outage lost",
                    time.monotonic() - t0,
                    tries,
                )
                self.recovered, self.outages = True, self.outages + 1
                return
            logger.warning(
                "broker still unreachable after %.0fs (try %d; %.0fs left)",
                time.monotonic() - t0,
                tries,
                max(0.0, left - pause),
            )


class Watch:
    """Polls job progress for the bar and notices trouble (worker errors, dead children, lost or stuck jobs)."""

    def __init__(
        self,
        state: JobState,
        cluster: Any,
        cfg: FbasConfig,
        bar: IngestProgress,
        client: Any,
        outage: BrokerOutage | None = None,
    ) -> None:
        self.state, self.cluster, self.cfg, self.bar, self.client = state, cluster, cfg, bar, client
        self.outage = outage
        self.last_orphan_check = time.monotonic()
        self.last_relay, self.warned_idle = 0.0, False
        self.relayed: set[tuple[float, str]] | None = None
        self.last_n, self.last_change, self.last_poll, self.n_done = -1, time.monotonic(), 0.0, 0

    def tick(self, force: bool = False) -> int:
        """Poll (at most every ``POLL_S`` unless forced); return the number of done batches."""
        now = time.monotonic()
        if not force and now - self.last_poll < POLL_S:
            return self.n_done
        self.last_poll = now
        if self.cluster is not None:
            self.cluster.check()
        try:
            errors = self.state.errors()
            n_done, counters = self.state.n_done(), self.state.counters()
        except ServerUnavailableError as e:
            if self.outage is None:
                raise
            self.outage.wait(e)
            return self.n_done
        if errors:
            raise ConfigError(f"a worker reported: {errors[0]}")
        self.n_done = n_done
        self.bar.update(counters)
        self.relay()
        if self.n_done != self.last_n:
            self.last_n, self.last_change = self.n_done, now
        return self.n_done

    def relay(self) -> None:
        """Every ``RELAY_S``: say what workers reported meanwhile (Triton unreachable, retries), and, when no
        worker has taken a batch ``NO_WORKER_S`` after the first one went out, that nothing consumes."""
        now = time.monotonic()
        if now - self.last_relay < RELAY_S:
            return
        self.last_relay = now
        try:
            reports = self.state.warnings()
            if self.relayed is None:  # what was reported before this run started is not news (workers' clocks
                self.relayed = set(reports)  # may differ from ours, so entries are matched, not times compared)
            for report in reports:
                if report not in self.relayed:
                    self.relayed.add(report)
                    logger.warning("a worker reports: %s", report[1])
            first_sent = self.bar.t0
            idle = first_sent is not None and now - first_sent > NO_WORKER_S and not self.warned_idle
            if idle and first_sent is not None and self.n_done == 0 and not self.state.running():
                self.warned_idle = True
                logger.warning(
                    "no worker has taken a batch %.0fs after the first one was queued: is a worker running against "
                    "this broker with the same FBAS_TASK_KEY (a worker drops tasks signed with another key and says "
                    "so in its log)? `fbas-pipeline status --broker ...` shows the queue",
                    now - first_sent,
                )
        except ServerUnavailableError as e:
            if self.outage is None:
                raise
            self.outage.wait(e)

    def orphans(self) -> list[int]:
        """Batches whose worker process vanished (no heartbeat: killed, or its host lost), checked at most every
        ``ORPHAN_CHECK_S``. Each is taken off the running list, so one loss is answered once; its message would
        come back only after the visibility timeout, so the producer sends it again now."""
        now = time.monotonic()
        if now - self.last_orphan_check < ORPHAN_CHECK_S:
            return []
        self.last_orphan_check = now
        try:
            lost = self.state.orphans()
            for b, where in lost.items():
                self.state.forget_running(b)
                logger.warning("batch %d: its worker %s is gone (no heartbeat): sending it again", b, where)
        except ServerUnavailableError as e:
            if self.outage is None:
                raise
            self.outage.wait(e)
            return []
        return sorted(lost)

    def needs_reenqueue(self, queue: str) -> str | None:
        """'outage' after the broker came back from an outage, 'lost' when Redis forgot the job, 'stalled' when
        nothing moved for visibility_timeout + 30 s with an empty queue; else None."""
        if self.outage is not None and self.outage.recovered:
            self.outage.recovered = False
            return "outage"
        try:
            if not self.state.exists():
                return "lost"
            stall = visibility_seconds(self.cfg.queue) + 30
            if time.monotonic() - self.last_change > stall and queue_length(self.client, queue) == 0:
                self.last_change = time.monotonic()
                return "stalled"
        except ServerUnavailableError as e:
            if self.outage is None:
                return None
            self.outage.wait(e)
            return self.needs_reenqueue(queue)
        return None
