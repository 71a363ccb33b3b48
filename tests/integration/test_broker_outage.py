"""A broker that goes away mid-job: the producer waits for it with bounded backoff, reconnects, re-sends what
the outage lost, and finishes with every row exactly once; past its budget it exits with a message that a
rerun resumes, and the rerun does. Real redis-server (killed with SIGKILL, restarted on the same port with
and without its append-only file), real tritonserver and Celery worker; ingest runs as a fleet producer."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import ServerUnavailableError
from tests.pipeline_support import check_oracle, ingest_in_background, start_cluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TAG = "outage"


@pytest.fixture(scope="module")
def cluster(template_out, tmp_path_factory):
    # batch 2 sleeps 4 s: the job is mid-run when Redis dies
    c = start_cluster(
        template_out,
        tmp_path_factory.mktemp("cluster"),
        tmp_path_factory.getbasetemp(),
        {"FBAS_TEST_PAUSE": f"2:4:{TAG}"},
        task_time_limit=60.0,
        visibility_timeout=120.0,
    )
    try:
        yield c
    finally:
        c.stop()


def _kill_redis(cluster) -> None:
    cluster.redis.proc.send_signal(signal.SIGKILL)
    cluster.redis.proc.wait()


def _restart_redis(cluster, keep_data: bool) -> None:
    if not keep_data:  # a broker without persistence comes back empty
        for p in cluster.redis.dir.glob("appendonly*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    cluster.redis.proc = subprocess.Popen(
        [shutil.which("redis-server"), str(cluster.redis.dir / "redis.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cluster.redis.wait_ready()


def _corpus(tmp_path: Path, stsb_en_test, n: int = 600) -> tuple[Path, list[str]]:
    texts = [a for a, _, _ in stsb_en_test[:n]]
    ids = [f"o{i}" for i in range(len(texts))]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), path)
    return path, ids


def _ingest_thread(cluster, template_out, corpus: Path, out: Path, broker_wait: float):
    return ingest_in_background(
        cluster, template_out, corpus, out, queue__broker_wait=broker_wait, corpus__batch_rows=32
    )


@pytest.mark.parametrize("keep_data", [True, False], ids=["aof", "no-persistence"])
def test_the_producer_rides_out_a_broker_outage(cluster, template_out, tmp_path, stsb_en_test, keep_data, caplog):
    corpus, ids = _corpus(tmp_path, stsb_en_test)
    out = tmp_path / f"{TAG}-{keep_data}"
    t, result = _ingest_thread(cluster, template_out, corpus, out, broker_wait=60)
    wait_for(lambda: (out / "vectors").is_dir() and any((out / "vectors").glob("part-*.parquet")), 120, "a part")
    _kill_redis(cluster)
    time.sleep(5)  # well past kombu's and redis-py's own quick retries
    _restart_redis(cluster, keep_data)
    t.join(timeout=float(__import__("os").environ.get("OUTAGE_JOIN", "300")))
    assert not t.is_alive(), "the ingest did not finish after the broker came back"
    assert "e" not in result, f"the ingest failed: {result.get('e')!r}"
    check_oracle(out, ids)
    text = caplog.text
    assert "stopped answering" in text and "answers again" in text and "sending" in text


def test_past_its_budget_the_producer_exits_and_a_rerun_resumes(cluster, template_out, tmp_path, stsb_en_test):
    corpus, ids = _corpus(tmp_path, stsb_en_test)
    out = tmp_path / f"{TAG}-budget"
    t, result = _ingest_thread(cluster, template_out, corpus, out, broker_wait=3)
    wait_for(lambda: (out / "vectors").is_dir() and any((out / "vectors").glob("part-*.parquet")), 120, "a part")
    _kill_redis(cluster)
    t.join(timeout=120)
    try:
        assert isinstance(result.get("e"), ServerUnavailableError), result
        msg = str(result["e"])
        assert "did not answer for 3s" in msg and "rerun the same command" in msg and "resumes" in msg
    finally:
        _restart_redis(cluster, keep_data=True)
    t, result = _ingest_thread(cluster, template_out, corpus, out, broker_wait=60)
    t.join(timeout=300)
    assert "e" not in result, f"the rerun failed: {result.get('e')!r}"
    assert result["r"].resumed_batches > 0
    check_oracle(out, ids)
