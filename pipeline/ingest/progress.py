"""Progress bars for long work (tqdm on a terminal, quiet otherwise)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from core.formatting import clock


@contextmanager
def progress_bar(total: int | None, desc: str, unit: str = "it", disable: bool = False):
    """A tqdm bar on stderr; disabled when asked or when stderr is not a terminal and total is unknown."""
    from tqdm import tqdm

    bar = tqdm(
        total=total or None, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True, smoothing=0.1
    )
    try:
        yield bar
    finally:
        bar.close()


class IngestProgress:
    """An ingest's progress from the job's Redis counters: a bar on a terminal, a plain line every ``interval``
    seconds elsewhere (logs, CI, nohup), nothing with ``mode="off"``.

    The counters cover every done batch (workers add theirs, ``reconcile`` adds committed ones), so docs +
    quarantined is the number of planned rows finished. What was finished before this run is where the bar
    starts, never part of a rate; rates are this run's work over this run's time since the first batch went
    out (``start``), so they are right from the first update and hold no one-off start-up time."""

    def __init__(self, total: int, mode: str = "bar", interval: float = 10.0) -> None:
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode {mode!r}")
        self.total, self.mode, self.interval = total, mode, interval
        self.done0: int | None = None
        self.tokens0 = 0
        self.done = self.tokens = 0
        self.t0: float | None = None
        self.last_line = 0.0
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="embedding", unit="doc", file=sys.stderr, dynamic_ncols=True)

    def start(self) -> None:
        """The first batch went out: rates count from now."""
        if self.t0 is None:
            self.t0 = time.monotonic()

    def set_total(self, total: int) -> None:
        """The planned rows, once the plan is complete (until then: every row of the corpus)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, counters: dict[str, int]) -> None:
        done = counters["docs"] + counters["quarantined"]
        if self.done0 is None:  # what was finished before this run is the start, not speed
            self.done0, self.tokens0 = done, counters["tokens"]
        self.done, self.tokens = done, counters["tokens"]
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(self.rates(), refresh=True)
        elif self.mode == "lines" and time.monotonic() - self.last_line >= self.interval:
            self.print_line()

    def rates(self) -> str:
        """This run's docs/s and tokens/s, and the ETA; empty until this run has finished some work."""
        new = self.done - (self.done0 or 0)
        if self.t0 is None or new <= 0:
            return ""
        el = max(1e-6, time.monotonic() - self.t0)
        eta = max(0, self.total - self.done) / (new / el)
        return f"{new / el:,.0f} docs/s, {(self.tokens - self.tokens0) / el:,.0f} tok/s, ETA {clock(eta)}"

    def print_line(self) -> None:
        self.last_line = time.monotonic()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rates = self.rates()
        print(
            f"embedding: {self.done:,}/{self.total:,} docs ({pct:.0f}%){', ' + rates if rates else ''}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines" and self.done0 is not None:
            self.print_line()

    @property
    def done_this_run(self) -> int:
        return self.done - (self.done0 or 0)


class Steps:
    """One line on stderr for each long one-off step of a job (model build, int8 calibration, Triton's start,
    finalize), and one when it is done with its time, so a first run never shows a blank screen; silent
    when ``enabled`` is false."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._started: dict[str, float] = {}
        self._last_tick = 0.0

    def begin(self, what: str) -> None:
        self._started[what] = time.monotonic()
        self.say(f"{what} ...")

    def end(self, what: str, detail: str = "") -> None:
        t0 = self._started.pop(what, None)
        took = f" in {time.monotonic() - t0:.1f}s" if t0 is not None else ""
        self.say(f"{what}: done{took}{', ' + detail if detail else ''}")

    def tick(self, what: str, done: int, total: int, every: float = 5.0) -> None:
        """A step's progress (``done`` of ``total``), at most every ``every`` seconds and at its end."""
        now = time.monotonic()
        if done >= total or now - self._last_tick >= every:
            self._last_tick = now
            self.say(f"{what}: {done}/{total}")

    def say(self, line: str) -> None:
        if self.enabled:
            print(f"fbas: {line}", file=sys.stderr, flush=True)
