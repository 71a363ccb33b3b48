"""Progress bars for long work (tqdm on a terminal, quiet otherwise)."""

from __future__ import annotations

import sys
from contextlib import contextmanager


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
