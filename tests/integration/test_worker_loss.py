"""A worker lost mid-batch (kill -9 of its whole process group, as when its host dies): the producer sees
that its worker sent no heartbeat, sends the batch again at once instead of waiting for the broker's
visibility timeout, another worker embeds it, and every row is there once. `status` names batches whose
worker is gone instead of counting them as running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import FbasConfig
from tests.pipeline_support import check_oracle, seed_model, start_cluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TAG = "lost-worker"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(template_out, tmp_path_factory):
    c = start_cluster(
        template_out,
        tmp_path_factory.mktemp("cluster"),
        tmp_path_factory.getbasetemp(),
        {"FBAS_TEST_PAUSE": f"1:60:{TAG}"},  # batch 1 hangs on the cluster's worker until it is killed
        task_time_limit=90.0,
    )
    try:
        yield c
    finally:
        c.stop()


def _cli_worker(cluster, out_root: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FBAS_")}
    env.update(
        PYTHONPATH=str(ROOT),
        FBAS_BROKER=cluster.broker_url,
        FBAS_TASK_KEY=cluster.task_key,
        FBAS_TRITON=cluster.triton_url,
        FBAS_OUT_ROOT=str(out_root),
    )
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker", "--concurrency", "1"],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def test_a_lost_workers_batch_is_sent_again_without_waiting_for_the_broker(
    cluster, template_out, tmp_path, stsb_en_test
):
    from pipeline.ingest.run import ingest
    from workers.jobstate import connect, list_jobs

    texts = [a for a, _, _ in stsb_en_test[:160]]
    ids = [f"l{i}" for i in range(len(texts))]
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), corpus)
    out = tmp_path / TAG
    seed_model(out, template_out)
    cfg = FbasConfig()
    cfg.queue.broker, cfg.queue.task_key, cfg.output.out = cluster.broker_url, cluster.task_key, str(out)
    cfg.corpus.batch_rows = 32
    client = connect(cluster.broker_url)
    before = set(list_jobs(client))
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=ingest(str(corpus), cfg, progress=False)), daemon=True)
    t.start()
    job = wait_for(lambda: next(iter(set(list_jobs(client)) - before), None), 120, "the job in Redis")
    where = wait_for(lambda: client.hget(f"fbas:job:{job}:running", "1"), 120, "batch 1 to start").decode()
    assert int(where.rsplit(":", 1)[1]) in cluster.worker.children()
    other = _cli_worker(cluster, tmp_path, tmp_path / "other-worker.log")
    try:
        os.killpg(cluster.worker.proc.pid, signal.SIGKILL)  # the whole worker, as if its host died
        killed = time.monotonic()
        t.join(timeout=90)
        assert not t.is_alive(), "the job waited for the broker's visibility timeout (120 s)"
        recovered_s = time.monotonic() - killed
    finally:
        other.send_signal(signal.SIGTERM)
        other.wait(timeout=60)
        client.close()
    check_oracle(out, ids)
    assert recovered_s < 60, recovered_s
    assert "fbas.embed_batch" in (tmp_path / "other-worker.log").read_text(errors="replace")


def test_status_names_batches_whose_worker_is_gone(cluster, tmp_path):
    from output.status import job_status
    from workers.jobstate import JobState, connect, heartbeat

    client = connect(cluster.broker_url)
    try:
        state = JobState(client, "status-job")
        state.create({"n_batches": 3, "planned_rows": 30, "out": str(tmp_path)}, "{}")
        state.begin(0, "live-host:101")
        state.begin(1, "dead-host:202")
        heartbeat(client, "live-host:101", 30)
        for b in (5, 6):  # two batches the live worker committed, 0.2 s apart
            state.begin(b, "live-host:101")
            state.mark_done(b, 10, 100, 0)
            time.sleep(0.2)
        info = job_status(None, cluster.broker_url)
    finally:
        JobState(client, "status-job").delete()
        client.close()
    entry = info["jobs"]["status-job"]
    assert entry["gone"] == {1: "dead-host:202"} and set(entry["running"]) == {0, 1}
    text = "\n".join(info["lines"])
    assert "1 running" in text and "taken by workers that are gone" in text and "1 (dead-host:202)" in text
    live = entry["workers"]["live-host:101"]
    assert live["docs"] == 20 and live["batches"] == 2 and live["alive"] and live["running"] == [0]
    assert 10 / 0.5 < live["docs_per_s"] < 10 / 0.15
    assert entry["workers"]["dead-host:202"]["alive"] is False
    assert "worker live-host:101: 20 docs in 2 batches" in text and "worker dead-host:202" in text
    progress = entry["progress"]
    assert progress["rows_done"] == 20 and progress["planned_rows"] == 30 and progress["eta_s"] > 0
    assert "progress: 20/30 rows" in text and "ETA" in text


def test_only_deliveries_whose_worker_died_count_as_crashes(cluster):
    """A batch's second copy (a producer's re-send, a broker's redelivery) while its first worker lives is no
    crash; a delivery whose worker process is gone (this host: its pid; another: no heartbeat) is one. Poison
    batches are judged by crashes, so duplicates never quarantine a healthy batch."""
    import socket
    import subprocess
    import sys

    from workers.jobstate import JobState, connect, heartbeat

    client = connect(cluster.broker_url)
    st = JobState(client, "crash-job")
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        host = socket.gethostname()
        assert st.begin(0, f"{host}:{dead.pid}") == (1, 0)
        assert st.begin(0, f"{host}:{os.getpid()}") == (2, 1)  # the first one's process is gone
        assert st.begin(0, "other-host:5") == (3, 1)  # this process still runs: a second copy, no crash
        heartbeat(client, "other-host:5", 30)
        assert st.begin(0, "third-host:6") == (4, 1)  # other-host:5 sends heartbeats: alive
        assert st.begin(0, "fourth-host:7") == (5, 2)  # third-host:6 never sent one: gone
    finally:
        st.delete()
        client.close()
