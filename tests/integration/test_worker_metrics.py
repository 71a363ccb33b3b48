"""A worker's Prometheus endpoint during and after a fleet ingest: its counts are the manifest's.

One cluster (redis-server, tritonserver, a Celery worker of 2 processes) whose worker serves its metrics on a
free port; an ingest of 300 real sentences and 3 texts without tokens (quarantined by the worker: the producer
only estimates lengths) runs in a thread while the test scrapes ``/metrics``."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.triton import free_port
from tests.pipeline_support import check_oracle, ingest_in_background, start_cluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TAG = "metrics-job"
STAGES = ("read", "tokenize", "infer", "write", "task")


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of the endpoint: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def _counted(port: int) -> dict | None:
    """The samples once some documents are counted; None before (or while the endpoint is not up yet)."""
    try:
        samples = _scrape(port)
    except (urllib.error.URLError, ConnectionError):
        return None
    return samples if _value(samples, "fbas_docs_total") > 0 else None


def test_worker_metrics_match_the_manifest(template_out, tmp_path, stsb_en_test):
    from workers.metrics import MULTIPROC_ENV

    port = free_port()
    # batch 1 sleeps 3 s on its first delivery, so the job is still running when the first batches are counted
    worker_env = {"FBAS_WORKER_METRICS_PORT": str(port), "FBAS_TEST_PAUSE": f"1:3:{TAG}"}
    cluster = start_cluster(template_out, tmp_path / "cluster", tmp_path, worker_env)
    metrics_dir = Path(cluster.worker.env[MULTIPROC_ENV])
    try:
        texts = [a for a, _, _ in stsb_en_test[:300]] + ["\x01\x02\x03", "\x04", "\x05\x06"]
        ids = [f"m{i}" for i in range(len(texts))]
        corpus = tmp_path / "c.parquet"
        pq.write_table(pa.table({"id": ids, "text": texts}), corpus)
        out = tmp_path / TAG
        # estimated lengths: the no-token texts reach the worker, which quarantines them
        t, result = ingest_in_background(
            cluster, template_out, corpus, out, corpus__batch_rows=32, corpus__lengths="estimate"
        )
        during = wait_for(lambda: _counted(port), 120, "documents counted on the metrics endpoint")
        assert t.is_alive(), "the first scrape that counted documents came after the ingest"
        t.join(timeout=300)
        assert not t.is_alive()
        if "e" in result:
            raise result["e"]
        after = _scrape(port)
    finally:
        cluster.stop()

    manifest = check_oracle(out, ids)
    counts, job = manifest["counts"], manifest["job"]
    assert counts["quarantined"] == 3 and counts["batches"] > 3

    def value(name: str, samples: dict = after, **labels: str) -> float:
        return _value(samples, name, job_id=job, **labels)

    assert 0 < value("fbas_docs_total", during) <= value("fbas_docs_total") == counts["embedded"]
    assert value("fbas_quarantined_rows_total") == counts["quarantined"]
    assert value("fbas_tokens_total", kind="real") == counts["tokens"]
    assert value("fbas_tokens_total", kind="padded") >= counts["tokens"]
    committed = value("fbas_batches_total", outcome="committed") + value("fbas_batches_total", outcome="quarantined")
    assert committed == counts["batches"]  # duplicates (a batch delivered again) are counted apart
    assert _value(after, "fbas_batches_total", outcome="refused") == value("fbas_batches_total", outcome="error") == 0
    assert value("fbas_redeliveries_total") == counts["redelivered"]
    for stage in STAGES:
        n = value("fbas_stage_seconds_count", stage=stage)
        assert n > 0 and value("fbas_stage_seconds_bucket", stage=stage, le="+Inf") == n, stage
    assert value("fbas_stage_seconds_count", stage="write") >= counts["batches"]
    assert not metrics_dir.exists(), "the worker's metrics folder outlived it"
