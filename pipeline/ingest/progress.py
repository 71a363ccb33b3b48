"""Progress bars for long work (tqdm on a terminal, quiet otherwise)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
import time


@contextmanager
def progress_bar(total: int | None, desc: str, unit: str = "it", disable: bool = False):
    """A tqdm bar on stderr; disabled when asked or when stderr is not a terminal and total is unknown."""
    from tqdm import tqdm

    bar = tqdm(total=total or None, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True,
               smoothing=0.1)
    try:
        yield bar
    finally:
        bar.close()


class IngestProgress:
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
