"""A fleet producer is never silent about why nothing happens: with no worker it says so within seconds, and
what a worker meets (its Triton unreachable) reaches the producer's output and `status`. Real redis-server,
real CLI producer and worker; the producer is stopped by the test once it has spoken."""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.triton import free_port
from tests.pipeline_support import ctrl_c_works

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fleet_env(tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not on PATH (apt install redis-server)")
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FBAS_")}
    env.update(
        PYTHONPATH=str(ROOT),
        FBAS_BROKER=f"redis://127.0.0.1:{port}/0",
        FBAS_TASK_KEY=secrets.token_hex(16),
        FBAS_OUT_ROOT=str(tmp_path),
    )
    time.sleep(0.3)
    yield env
    redis.kill()
    redis.wait()


def _producer(env: dict, tmp_path: Path) -> tuple[subprocess.Popen, queue.Queue]:
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": list(range(40)), "text": [f"a short text {i}" for i in range(40)]}), corpus)
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", str(corpus), "--out", str(tmp_path / "out"), "--no-progress"]
    # PYTHONFAULTHANDLER: a producer that does not stop is sent SIGABRT (``_stop``) and prints every thread's stack
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**env, "PYTHONFAULTHANDLER": "1"},
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_works,  # noqa: PLW1509 - only resets a signal disposition
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    return proc, lines


def _stop(proc: subprocess.Popen, lines: queue.Queue) -> None:
    """Ctrl-C the producer; one that has not exited 60 s later fails the test with its threads' stacks."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=30)
        time.sleep(0.5)
        tail = []
        while not lines.empty():
            tail.append(lines.get())
        pytest.fail("the producer did not stop within 60 s of SIGINT; its output ends:\n" + "".join(tail[-80:]))


def _wait_line(lines: queue.Queue, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if needle in line:
            return line
    raise AssertionError(f"the producer never said {needle!r}")


def test_a_producer_with_no_worker_says_so(fleet_env, tmp_path):
    proc, lines = _producer(fleet_env, tmp_path)
    t0 = time.monotonic()
    try:
        line = _wait_line(lines, "no worker has taken a batch", 120)
        assert "FBAS_TASK_KEY" in line and "status" in line
        assert time.monotonic() - t0 < 90
    finally:
        _stop(proc, lines)


def test_a_workers_trouble_reaches_the_producer_and_status(fleet_env, tmp_path):
    worker_env = {**fleet_env, "FBAS_TRITON": f"127.0.0.1:{free_port()}", "FBAS_READY_TIMEOUT": "2"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "worker", "--concurrency", "1"],
        cwd=tmp_path,
        env=worker_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proc, lines = _producer(fleet_env, tmp_path)
    try:
        line = _wait_line(lines, "a worker reports:", 180)
        assert "Triton" in line and "retrying" in line, line
        status = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "status", str(tmp_path / "out")],
            cwd=ROOT,
            env=fleet_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "a worker reported:" in status.stdout and "Triton" in status.stdout, status.stdout
    finally:
        _stop(proc, lines)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
