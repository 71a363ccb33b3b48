"""The pipeline against real services: one redis-server, one tritonserver and one Celery worker (2 processes)
for the module, with jobs submitted as a fleet would (``--broker``). No mocks.

Covers docs/reliability.md's bad-input table, refusal before enqueueing, the pickle refusal, a worker child
killed mid-batch (redelivered, every row once), and `status`.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import FbasConfig
from core.errors import InputError
from tests.pipeline_support import check_oracle, need_services, read_quarantine, read_vectors, seed_model, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAUSE_TAG = "pause-me"
CRASH_TAG = "crash-me"


@pytest.fixture(scope="module")
def cluster(template_out, tmp_path_factory):
    from services.local import LocalCluster

    need_services()
    cfg = FbasConfig()
    cfg.queue.task_time_limit, cfg.queue.visibility_timeout, cfg.queue.max_retries = 60.0, 120.0, 2
    c = LocalCluster(
        template_out / ".fbas" / "model",
        tmp_path_factory.mktemp("cluster"),
        cfg,
        concurrency=2,
        worker_env={"FBAS_TEST_PAUSE": f"1:8:{PAUSE_TAG}", "FBAS_TEST_CRASH": f"2:{CRASH_TAG}"},
        out_roots=[tmp_path_factory.getbasetemp()],
    )
    c.start()
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


def _cfg(cluster, out: Path, **corpus) -> FbasConfig:
    cfg = FbasConfig()
    cfg.queue.broker, cfg.queue.task_key = cluster.broker_url, cluster.task_key
    cfg.output.out = str(out)
    for k, v in corpus.items():
        setattr(cfg.corpus, k, v)
    return cfg


def _ingest(cluster, template_out, corpus: Path, out: Path, **corpus_kw):
    from pipeline.ingest.run import ingest

    seed_model(out, template_out)
    return ingest(str(corpus), _cfg(cluster, out, **corpus_kw), progress=False)


def _reference(template_out, texts: list[str]) -> np.ndarray:
    from engine.model_dir import load_engine, load_tokenizer

    d = template_out / ".fbas" / "model"
    enc = load_tokenizer(d).encode(texts)
    return load_engine(d).embed(enc.token_ids, enc.lengths)


def test_the_same_job_into_a_second_folder_is_embedded_again(cluster, template_out, tmp_path, stsb_en_test):
    """A running service keeps each job's progress in Redis by job id; the same corpus and settings sent to a
    fresh folder must not be taken as done from the first folder's record (found by benchmark 4)."""
    texts = [a for a, _, _ in stsb_en_test[:300]]
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(len(texts))], "text": texts}), corpus)
    first = _ingest(cluster, template_out, corpus, tmp_path / "one", batch_tokens=1024)
    second = _ingest(cluster, template_out, corpus, tmp_path / "two", batch_tokens=1024)
    assert second.job == first.job and first.manifest["counts"]["batches"] > 1
    assert second.sent_batches == second.manifest["counts"]["batches"], "every batch was sent again"
    check_oracle(tmp_path / "two", [f"s{i}" for i in range(len(texts))])
    v1, v2 = read_vectors(tmp_path / "one")[2], read_vectors(tmp_path / "two")[2]
    assert v1.shape == v2.shape and np.min(np.sum(v1 * v2, axis=1)) > 0.99999
    # while a batch of the job is running for folder "two", the same job into a third folder is refused
    from workers.jobstate import JobState, connect

    state = JobState(connect(cluster.broker_url), first.job)
    state.r.hset(state.k_running, "0", "a worker elsewhere")
    try:
        with pytest.raises(InputError, match=r"is being embedded into .*two"):
            _ingest(cluster, template_out, corpus, tmp_path / "three", batch_tokens=1024)
        assert state.meta()["out"] == str(tmp_path / "two"), "the refused run left the running job's record alone"
    finally:
        state.r.hdel(state.k_running, "0")


def test_triton_and_the_model_account_for_a_jobs_engine_time(cluster, template_out, tmp_path, stsb_en_test):
    """engine_stats() splits an instance's time: Triton's queue and compute, the model's seconds in execute and,
    inside them, in the engine (the model's custom metrics on Triton's metrics endpoint). Benchmarks read the
    split to tell the engine from the serving around it."""
    texts = [a for a, _, _ in stsb_en_test[:200]]
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(len(texts))], "text": texts}), corpus)
    before = cluster.engine_stats()
    r = _ingest(cluster, template_out, corpus, tmp_path / "out", batch_tokens=1024)
    after = cluster.engine_stats()
    d = {k: after[k] - before[k] for k in after}
    assert d["engine_requests"] >= r.manifest["counts"]["batches"] > 1
    assert 0 < d["model_embed_s"] < d["model_execute_s"], d
    assert d["model_capture_s"] == 0, "the CPU engine captures no CUDA graphs (the counter is there, at zero)"
    assert d["engine_compute_s"] > 0 and d["engine_input_s"] >= 0 and d["engine_output_s"] >= 0, d


@pytest.mark.parametrize("lengths", ["exact", "estimate"])
def test_bad_rows_are_quarantined_or_flagged_and_nothing_is_lost(cluster, template_out, tmp_path, lengths):
    """With estimated lengths the producer cannot see that a text has no tokens: its worker quarantines it, with
    the same reason, and everything else comes out the same."""
    good = [
        "A man is playing a guitar.",
        "Un homme joue de la guitare.",
        "一个男人在弹吉他。",
        "text with a NUL\x00 inside",
        "tabs\tand\nnewlines",
        "word " * 3000,
    ]
    texts: list = good + [None, "", "   \n\t ", "\x01\x02\x03", "fine again"]
    raw = [t.encode() if t is not None else None for t in texts]
    raw.append(b"broken \xff\xfe utf-8 bytes")
    ids = [f"doc-{i}" for i in range(len(raw))]
    corpus = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ids, "text": pa.array(raw, pa.binary())}), corpus)
    out = tmp_path / "out"
    r = _ingest(cluster, template_out, corpus, out, lengths=lengths)
    m = check_oracle(out, ids)
    assert read_quarantine(out) == {6: "null_text", 7: "empty_text", 8: "whitespace_text", 9: "no_tokens"}
    job = __import__("json").loads((out / ".fbas" / "job.json").read_text())
    assert job["settings"].get("lengths", "exact") == job["scan"]["lengths"] == lengths  # exact ids unchanged
    assert (job["settings"]["padding_ratio"] is None) == (lengths == "estimate")
    assert job["scan"]["quarantined"] == (4 if lengths == "exact" else 3)  # no_tokens: by the worker
    assert m["counts"]["truncated"] == 1 and m["counts"]["repaired"] == 1
    t = pq.read_table(out / "vectors").to_pydict()
    flags = {i: (n, tr, rep) for i, n, tr, rep in zip(t["id"], t["n_tokens"], t["truncated"], t["repaired"])}
    assert flags["doc-5"] == (256, True, False)
    assert flags["doc-11"][2] is True and flags["doc-0"] == (9, False, False)
    rows, _, vecs = read_vectors(out)
    want_texts = [(texts + ["broken \ufffd\ufffd utf-8 bytes"])[i] for i in rows]
    ref = _reference(template_out, want_texts)
    assert np.min(np.sum(ref * vecs, axis=1)) > 0.9999, "vectors equal the in-process engine's"
    assert r.resumed_batches == 0

    from output.status import job_status

    st = job_status(str(out), cluster.broker_url)
    assert st["folder"]["done_batches"] == st["folder"]["planned_batches"] and st["folder"]["finished"]
    assert st["jobs"][r.job]["done"] == st["jobs"][r.job]["planned"]
    assert cluster.redis.password not in "\n".join(st["lines"])


def test_invalid_corpora_are_refused_before_anything_is_enqueued(cluster, template_out, tmp_path):
    from workers.app import QUEUE
    from workers.jobstate import connect, list_jobs

    client = connect(cluster.broker_url)
    jobs_before = set(list_jobs(client))
    cases = [
        ({"id": [1, 2], "body": ["a", "b"]}, {}, r"no text column 'text'.*--text-column"),
        ({"id": [1, 2], "text": [3, 4]}, {}, r"text column 'text' has type int64"),
        ({"id": [1.5, 2.5], "text": ["a", "b"]}, {}, r"id column 'id' has type double"),
        ({"id": ["x", "y", "x"], "text": ["a", "b", "c"]}, {}, r"duplicate id.*'x' at rows 0, 2"),
        ({"id": ["x", None], "text": ["a", "b"]}, {}, r"null id"),
        ({"key": [1, 2], "text": ["a", "b"]}, {"id_column": "doc"}, r"no id column 'doc'"),
    ]
    for i, (cols, kw, pattern) in enumerate(cases):
        corpus = tmp_path / f"c{i}.parquet"
        pq.write_table(pa.table(cols), corpus)
        out = tmp_path / f"out{i}"
        with pytest.raises(InputError, match=pattern):
            _ingest(cluster, template_out, corpus, out, **kw)
        assert not (out / "vectors").exists() or not any((out / "vectors").iterdir())
    assert set(list_jobs(client)) == jobs_before, "no job state was created"
    assert client.llen(QUEUE) == 0, "nothing was enqueued"


class _Evil:
    """Unpickling this would create the marker file: the worker must never deserialize it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_message_is_refused_and_never_deserialized(cluster, template_out, tmp_path):
    from kombu import Connection

    from workers.app import QUEUE, TASK_NAME

    marker = tmp_path / "pwned"
    with Connection(cluster.broker_url) as conn:
        producer = conn.Producer(serializer="pickle")
        producer.publish(
            {"args": [_Evil(str(marker))]},
            routing_key=QUEUE,
            exchange="",
            headers={"task": TASK_NAME, "id": "evil-1", "lang": "py", "argsrepr": "", "kwargsrepr": ""},
        )
    log = Path(cluster.log_dir) / "worker.log"
    wait_for(
        lambda: "evil-1" in log.read_text(errors="replace") or "untrusted" in log.read_text(errors="replace"),
        30,
        "the worker to refuse the pickle message",
    )
    time.sleep(0.5)
    assert not marker.exists(), "the pickle payload was deserialized"
    text = log.read_text(errors="replace")
    assert "ContentDisallowed" in text or "untrusted content" in text
    assert cluster.redis.password not in text, "the Redis password leaked into the worker log"
    cluster.check()  # the worker survived
    corpus = tmp_path / "after.parquet"
    pq.write_table(pa.table({"text": ["still works", "after the pickle"]}), corpus)
    _ingest(cluster, template_out, corpus, tmp_path / "out")
    check_oracle(tmp_path / "out", [0, 1])


def _ingest_in_background(cluster, template_out, corpus, out):
    """Start an ingest (batches of 32 rows) in a thread; returns (join, job id, Redis client) once the job is
    in Redis. ``join()`` waits for the ingest and re-raises its error."""
    from workers.jobstate import connect, list_jobs

    client = connect(cluster.broker_url)
    before = set(list_jobs(client))
    result: dict = {}

    def run() -> None:
        try:
            result["r"] = _ingest(cluster, template_out, corpus, out, batch_rows=32)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["e"] = e

    th = threading.Thread(target=run)
    th.start()
    job = wait_for(lambda: next(iter(set(list_jobs(client)) - before), None), 120, "the job to appear in Redis")

    def join() -> None:
        th.join(timeout=300)
        assert not th.is_alive()
        if "e" in result:
            raise result["e"]

    return join, job, client


def test_killing_a_worker_child_mid_batch_redelivers_the_batch(cluster, template_out, tmp_path, stsb_en_test):
    from workers.jobstate import JobState

    texts = [a for a, _, _ in stsb_en_test[:300]]
    ids = list(range(1000, 1000 + len(texts)))
    corpus = tmp_path / "k.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), corpus)
    out = tmp_path / f"{PAUSE_TAG}-out"  # batch 1 sleeps 8 s on its first delivery (FBAS_TEST_PAUSE)
    join, job, client = _ingest_in_background(cluster, template_out, corpus, out)
    state = JobState(client, job)
    where = wait_for(lambda: state.running().get(1), 120, "batch 1 to start")
    time.sleep(1.0)  # tokenized, now sleeping mid-batch
    pid = int(where.rsplit(":", 1)[1])
    assert pid in cluster.worker.children()
    os.kill(pid, signal.SIGKILL)
    join()
    m = check_oracle(out, ids)
    assert m["counts"]["redelivered"] >= 1
    assert m["counts"]["embedded"] == len(texts)


def test_the_worker_command_joins_the_fleet(cluster, template_out, tmp_path, stsb_en_test):
    """`fbas-pipeline worker --broker URL --triton HOST:PORT` consumes batches next to the cluster's worker."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    log = tmp_path / "cli-worker.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "worker",
                "--broker",
                cluster.broker_url,
                "--triton",
                cluster.triton_url,
                "--concurrency",
                "1",
                "--loglevel",
                "INFO",
            ],
            env={
                **os.environ,
                "PYTHONPATH": str(root),
                "FBAS_TASK_KEY": cluster.task_key,
                "FBAS_OUT_ROOT": str(tmp_path),
            },
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=str(root),
        )
    try:
        wait_for(lambda: "ready." in log.read_text(errors="replace"), 60, "the CLI worker to start")
        texts = [b for _, b, _ in stsb_en_test[:200]]
        corpus = tmp_path / "w.parquet"
        pq.write_table(pa.table({"id": [f"w{i}" for i in range(len(texts))], "text": texts}), corpus)
        _ingest(cluster, template_out, corpus, tmp_path / "out", batch_rows=8)
        check_oracle(tmp_path / "out", [f"w{i}" for i in range(len(texts))])
        text = log.read_text(errors="replace")
        assert "fbas.embed_batch" in text and "succeeded" in text, "the CLI worker ran no batch"
        assert cluster.redis.password not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) is not None


def test_a_batch_that_kills_its_worker_every_time_is_quarantined(cluster, template_out, tmp_path, stsb_en_test):
    """A poison batch (the worker process dies on every delivery, as with OOM) is retried a bounded number of
    times, then quarantined with a reason; the job finishes and every other row is embedded."""
    texts = [a for a, _, _ in stsb_en_test[300:400]]
    ids = [f"p{i}" for i in range(len(texts))]
    corpus = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), corpus)
    out = tmp_path / f"{CRASH_TAG}-out"  # batch 2 kills its worker process on every delivery
    r = _ingest(cluster, template_out, corpus, out, batch_rows=16)
    m = check_oracle(out, ids)
    q = read_quarantine(out)
    assert len(q) == 16 and all(reason.startswith("poison: 3 deliveries") for reason in q.values()), q
    assert m["counts"]["redelivered"] >= 3 and r.manifest["counts"]["embedded"] == len(texts) - 16
    cluster.check()  # the worker replaced its dead processes


def test_a_redis_that_lost_everything_mid_job_is_refilled(cluster, template_out, tmp_path, stsb_en_test):
    """Redis restarted without persistence (FLUSHALL here): the producer notices the job is gone, rebuilds its
    state from the committed parts and re-enqueues the missing batches; every row ends up exactly once."""
    texts = [b for _, b, _ in stsb_en_test[400:700]]
    ids = [f"f{i}" for i in range(len(texts))]
    corpus = tmp_path / "f.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), corpus)
    out = tmp_path / f"{PAUSE_TAG}-flush"  # batch 1 sleeps 8 s on its first delivery
    join, job, client = _ingest_in_background(cluster, template_out, corpus, out)
    wait_for(lambda: client.hget(f"fbas:job:{job}:running", "1"), 120, "batch 1 to start")
    client.flushall()
    join()
    check_oracle(out, ids)


@pytest.mark.parametrize("lengths", ["exact", "estimate"])
def test_small_plan_windows_stream_and_a_rerun_without_the_job_file_finds_its_parts(
    cluster, template_out, tmp_path, stsb_en_test, lengths
):
    """Six windows instead of one: the same rows and vectors, each batch inside one window. A producer that
    died before job.json was written (it is written after the last window) leaves committed parts and
    job.pending: another job is refused on them, and the same job's rerun plans the same batches again (with
    estimated lengths too: calibrated again on the same first window), finds every one committed and sends
    nothing."""
    import json

    texts = [a for a, _, _ in stsb_en_test[:600]]
    ids = [f"w{i}" for i in range(len(texts))]
    corpus = tmp_path / "w.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), corpus)
    _ingest(cluster, template_out, corpus, tmp_path / "one", batch_rows=32)
    out = tmp_path / "windows"
    r = _ingest(cluster, template_out, corpus, out, batch_rows=32, plan_window=100, lengths=lengths)
    m = check_oracle(out, ids)
    job = json.loads((out / ".fbas" / "job.json").read_text())
    assert job["settings"]["plan_window"] == 100 and r.sent_batches == m["counts"]["batches"]
    rows, got_ids, vecs = read_vectors(out)
    rows1, ids1, vecs1 = read_vectors(tmp_path / "one")
    assert np.array_equal(rows, rows1) and got_ids == ids1
    np.testing.assert_allclose(vecs, vecs1, atol=2e-6)  # other batch neighbours, same vectors
    for part in sorted((out / "vectors").glob("*.parquet")):
        part_rows = pq.read_table(part, columns=["row_id"]).column("row_id").to_numpy()
        assert part_rows.max() // 100 == part_rows.min() // 100, f"{part.name} spans two windows"

    for name in ("job.json", "scan.npz", "plan.npz"):
        (out / ".fbas" / name).unlink()
    parts = sorted(p.name for p in (out / "vectors").iterdir())
    with pytest.raises(InputError, match="stopped before its scan finished"):  # another job on these parts
        _ingest(cluster, template_out, corpus, out, batch_rows=16, plan_window=100, lengths=lengths)
    assert sorted(p.name for p in (out / "vectors").iterdir()) == parts
    again = _ingest(cluster, template_out, corpus, out, batch_rows=32, plan_window=100, lengths=lengths)
    assert again.sent_batches == 0 and again.resumed_batches == m["counts"]["batches"]
    check_oracle(out, ids)


def test_a_cluster_stopped_while_its_model_loads_stops_at_once(template_out, tmp_path, monkeypatch):
    """Ctrl-C during local mode's start: tritonserver starts first and loads the model on a thread; stopping
    the cluster then kills it instead of waiting for the load (here 120 s, from a test hook in model.py), and
    leaves no process behind. Its four ports (Redis, Triton's gRPC, HTTP and metrics) are all different,
    though Triton's are picked before Redis has bound its own."""
    from services.local import LocalCluster

    need_services()
    monkeypatch.setenv("FBAS_TEST_LOAD_DELAY", "120")
    cfg = FbasConfig()
    cfg.serve.ready_timeout = 300
    c = LocalCluster(template_out / ".fbas" / "model", tmp_path / "state", cfg, concurrency=1)
    c.start()
    try:
        ports = [c.redis.port, *c.triton.ports.values()]
        assert len(set(ports)) == 4, ports
        log = tmp_path / "state" / "logs" / "tritonserver.log"
        wait_for(
            lambda: log.exists() and "TRITONBACKEND_ModelInstanceInitialize" in log.read_text(),
            60,
            "tritonserver to start loading the model",
        )
        pids = c.pids()
        assert set(pids) == {"redis", "triton", "worker"}
    finally:
        t0 = time.monotonic()
        c.stop()
        took = time.monotonic() - t0
    assert took < 60, f"stop waited {took:.0f}s: it waited for the model's load"
    with pytest.raises(Exception, match="exited|not ready"):
        c.wait_ready()
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    def group_gone() -> bool:  # nor any of its backend stubs (tritonserver leads their group), once reaped
        try:
            os.killpg(pids["triton"], 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(group_gone, 10, "tritonserver's process group to be empty")


def test_forged_or_misdirected_tasks_write_nothing(cluster, template_out, tmp_path):
    """Anyone who can write to the queue can send JSON tasks: one without this fleet's signature, or signed
    with another key, is refused and logged; a signed one whose output folder is outside the worker's roots
    (here ``/tmp/...``) is refused and reported to its job. Nothing is written anywhere."""
    import tempfile
    from dataclasses import replace as dc_replace

    from pipeline.ingest.produce import task_message
    from workers.app import QUEUE, TASK_NAME, producer_app
    from workers.jobstate import JobState, connect
    from workers.signing import sign

    outside = Path(tempfile.mkdtemp(prefix="fbas-outside-"))  # not under the worker's root (pytest's basetemp)
    escape = f"{tmp_path}/x/{'../' * 12}{outside}-escaped"  # resolves to /tmp/fbas-outside-...-escaped

    def msg(job: str, out: str) -> dict:
        return task_message(
            job=job,
            batch=0,
            out=out,
            model="",
            dim=384,
            id_type="int64",
            row_ids=[0],
            ids=[0],
            texts=["hello"],
            repaired=[],
        )

    cfg = FbasConfig()
    app = producer_app(FbasConfig(queue=dc_replace(cfg.queue, broker=cluster.broker_url)))
    try:
        for m in (msg("forged-unsigned", escape), sign(msg("forged-wrong-key", escape), "not-the-fleet-key")):
            app.send_task(TASK_NAME, args=[m], queue=QUEUE, serializer="json")
        app.send_task(TASK_NAME, args=[sign(msg("misdirected", str(outside)), cluster.task_key)], queue=QUEUE)
    finally:
        app.close()
    log = Path(cluster.log_dir) / "worker.log"
    wait_for(lambda: log.read_text(errors="replace").count("refused a task message") >= 2, 60, "two refusals")
    client = connect(cluster.broker_url)
    try:
        errors = wait_for(lambda: JobState(client, "misdirected").errors(), 60, "the misdirected task's report")
    finally:
        client.close()
    assert "outside the folders it may write to" in errors[0] and "FBAS_OUT_ROOT" in errors[0]
    text = log.read_text(errors="replace")
    assert "forged-unsigned" in text and "forged-wrong-key" in text and "not signed with this fleet" in text
    assert not any(outside.iterdir()), "a refused task wrote into the folder outside the root"
    assert not Path(f"{outside}-escaped").exists() and not (tmp_path / "x").exists()
    assert cluster.task_key not in text and cluster.redis.password not in text
    cluster.check()  # the worker is still up
    shutil.rmtree(outside)
