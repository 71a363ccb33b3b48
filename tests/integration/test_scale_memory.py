"""Memory stays flat as the corpus grows: the producer's and finalize's peak resident memory at 1,000,000 and at
4,000,000 rows (real STS-B sentences, distinct ids), each step in a fresh process (``tests/scale_probe.py``).

Nothing a job holds may grow with its rows (README, "Memory"): texts, messages and vectors are held one window
(65,536 rows) or one part at a time, and the per-row state (id keys, lengths, the plan's row order, the oracle's
counts, the index's ids) lives in files whose pages are handed back as the job moves on (``core.rowfile``).
Below about a million rows, buffers sized by the job still grow a few MB (6-8 MB from 100,000 rows); from there
on the peak stays. The bound allows 4 bytes a row (12 MB over the 3 M rows); before the per-row state went to
files the producer grew 17.5 bytes a row, finalize 19 and a resumed job's sending 11.6 (this probe).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL, LARGE = 1_000_000, 4_000_000
BYTES_PER_ROW = 4  # measured 0.0 (producer), 1.5 (its re-send) and 0.5 (finalize) from 1 M to 4 M rows


# glibc's mmap threshold fixed as the ingest command fixes it, and Arrow on the system allocator rather than
# mimalloc, which keeps freed pages for a while: a peak then varies by under 1 MB between runs (by up to 40 MB
# with mimalloc), so it measures what the step holds, not when an allocator gave memory back
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "ARROW_DEFAULT_MEMORY_POOL": "system"}


def _probe(*args: str) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "tests.scale_probe", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("scale")
    paths = {n: d / f"corpus-{n}.parquet" for n in (SMALL, LARGE)}
    for n, path in paths.items():
        _probe("corpus", str(n), str(path))
    return paths


def test_the_producers_peak_memory_does_not_grow_with_the_rows(corpora):
    small, large = _probe("produce", str(corpora[SMALL])), _probe("produce", str(corpora[LARGE]))
    assert (small["rows"], large["rows"]) == (SMALL, LARGE), "every row scanned, planned and put in a message"
    grew = (large["peak_mb"] - small["peak_mb"]) * 2**20 / (LARGE - SMALL)
    assert grew <= BYTES_PER_ROW, f"the producer's peak grew {grew:.1f} bytes a row: {small} -> {large}"
    assert (small["resent"], large["resent"]) == (SMALL, LARGE), "a resumed job sends every row again"
    grew = (large["resend_peak_mb"] - small["resend_peak_mb"]) * 2**20 / (LARGE - SMALL)
    assert grew <= BYTES_PER_ROW, f"a resumed job's sending grew {grew:.1f} bytes a row: {small} -> {large}"


def test_finalizes_peak_memory_does_not_grow_with_the_rows(corpora, tmp_path):
    for n in (SMALL, LARGE):
        _probe("parts", str(corpora[n]), str(tmp_path / str(n)))
    small, large = _probe("finalize", str(tmp_path / str(SMALL))), _probe("finalize", str(tmp_path / str(LARGE)))
    assert (small["rows"], large["rows"]) == (SMALL, LARGE), "the oracle found every row once"
    grew = (large["peak_mb"] - small["peak_mb"]) * 2**20 / (LARGE - SMALL)
    assert grew <= BYTES_PER_ROW, f"finalize's peak grew {grew:.1f} bytes a row: {small} -> {large}"
