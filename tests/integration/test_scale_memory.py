"""Memory stays flat as the corpus grows: the producer's and finalize's peak resident memory at 100,000 and at
1,000,000 rows (real STS-B sentences, distinct ids), each step in a fresh process (``tests/scale_probe.py``).

What may grow with the rows is the per-row state the job keeps on purpose (README, "Memory"): the producer's
id keys and lengths, finalize's id keys, counts, row lists and plan. Texts, messages and vectors must not: they
are held one window (65,536 rows) or one part at a time. The bounds below allow that per-row state with room
for the allocator, and fail if texts or vectors were kept per row (texts are 60-100 bytes a row, the probe's
8-d vectors 32).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL, LARGE = 100_000, 1_000_000
PRODUCER_BYTES_PER_ROW = 32
FINALIZE_BYTES_PER_ROW = 100  # measured 61-67 (the probe frees its own columns and resets the peak first)


def _probe(*args: str) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "tests.scale_probe", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
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


def test_the_producers_peak_memory_grows_by_at_most_its_per_row_state(corpora):
    small, large = _probe("produce", str(corpora[SMALL])), _probe("produce", str(corpora[LARGE]))
    assert (small["rows"], large["rows"]) == (SMALL, LARGE), "every row scanned, planned and put in a message"
    grew = (large["peak_mb"] - small["peak_mb"]) * 2**20 / (LARGE - SMALL)
    assert grew <= PRODUCER_BYTES_PER_ROW, f"the producer's peak grew {grew:.0f} bytes a row: {small} -> {large}"


def test_finalizes_peak_memory_grows_by_at_most_its_per_row_state(corpora, tmp_path):
    small = _probe("finalize", str(corpora[SMALL]), str(tmp_path / "small"))
    large = _probe("finalize", str(corpora[LARGE]), str(tmp_path / "large"))
    assert (small["rows"], large["rows"]) == (SMALL, LARGE), "the oracle found every row once"
    grew = (large["peak_mb"] - small["peak_mb"]) * 2**20 / (LARGE - SMALL)
    assert grew <= FINALIZE_BYTES_PER_ROW, f"finalize's peak grew {grew:.0f} bytes a row: {small} -> {large}"
