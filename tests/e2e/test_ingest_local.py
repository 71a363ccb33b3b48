"""Local mode end to end on real data: `ingest` with no --broker starts redis-server, tritonserver and
Celery workers itself. Quality (STS-B Spearman), search against brute force, eval, and resume after the
cluster is killed and after Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from core.config import FbasConfig
from tests.pipeline_support import (
    check_oracle,
    count_parts,
    ctrl_c_works,
    pid_alive,
    read_vectors,
    seed_model,
    wait_for,
    write_stsb_corpus,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STSB_MTEB = 0.82032  # all-MiniLM-L6-v2, STS-B test, cosine Spearman (MTEB)


@pytest.fixture(scope="module")
def stsb_corpus(stsb_en_test, tmp_path_factory) -> tuple[Path, list]:
    path = write_stsb_corpus(stsb_en_test, tmp_path_factory.mktemp("stsb") / "stsb-test.parquet")
    return path, stsb_en_test


@pytest.fixture(scope="module")
def clean_run(stsb_corpus, tmp_path_factory):
    """One uninterrupted local-mode ingest of the STS-B test sentences (the reference for the resume test)."""
    from pipeline.ingest.run import ingest

    corpus, _ = stsb_corpus
    cfg = FbasConfig()
    cfg.output.out = str(tmp_path_factory.mktemp("clean") / "out")
    return ingest(str(corpus), cfg, progress=False)


def test_stsb_spearman_of_stored_vectors(clean_run, stsb_corpus):
    _, pairs = stsb_corpus
    out = clean_run.out
    m = check_oracle(out, [f"s{i}" for i in range(2 * len(pairs))])
    assert m["counts"]["embedded"] == 2 * len(pairs) and m["model"]["normalize"] is True
    rows, _, vecs = read_vectors(out)
    n = len(pairs)
    a, b = vecs[:n], vecs[n:]
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    rho = spearmanr(cos, [s for _, _, s in pairs]).correlation
    print(f"STS-B test Spearman (local-mode ingest, stored vectors): {rho:.5f}")
    assert abs(rho - STSB_MTEB) <= 0.001


def test_search_returns_the_brute_force_neighbours(clean_run, stsb_corpus, tmp_path):
    from output.search import Searcher

    _, pairs = stsb_corpus
    rows, ids, vecs = read_vectors(clean_run.out)
    s = Searcher(clean_run.out)
    queries = [a for a, _, _ in pairs[::97]] + ["a completely unrelated query about tax law"]
    q = s.embed(queries)
    k = 10
    truth = q @ vecs.T
    hits = s.search(queries, k)
    id_to_row = dict(zip(ids, rows.tolist()))
    for qi, hs in enumerate(hits):
        want = np.sort(truth[qi])[::-1][:k]
        got = np.array([h.score for h in hs])
        np.testing.assert_allclose(got, want, atol=1e-5)  # the same neighbours (ties may swap)
        for h in hs:
            assert abs(truth[qi, id_to_row[h.id]] - h.score) < 1e-5
    # the CLI: one text, and a query file (one JSON line per query)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "search", str(clean_run.out), queries[0], "-k", "3", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr
    first = [json.loads(line) for line in one.stdout.splitlines()]
    assert [h["id"] for h in first] == [h.id for h in hits[0][:3]] or np.allclose(
        [h["score"] for h in first], [h.score for h in hits[0][:3]], atol=1e-5
    )
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(queries)))
    many = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "search", str(clean_run.out), "--queries", str(qfile), "-k", str(k)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert many.returncode == 0, many.stderr
    lines = [json.loads(line) for line in many.stdout.splitlines()]
    assert [x["query_id"] for x in lines] == [f"q{i}" for i in range(len(queries))]
    assert all(len(x["hits"]) == k for x in lines)


def test_eval_on_a_beir_format_set(clean_run, stsb_corpus, tmp_path):
    """Paraphrase retrieval built from STS-B: sentence 1 of each near-identical pair should find sentence 2.
    The query ids are the corpus ids of sentence 1, so BEIR's ignore_identical_ids drops the self-hit."""
    from output.evaluate import evaluate

    _, pairs = stsb_corpus
    n = len(pairs)
    chosen = [i for i, (_, _, score) in enumerate(pairs) if score >= 4.5]
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"_id": f"s{i}", "text": pairs[i][0]}) + "\n" for i in chosen))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"s{i}\ts{n + i}\t1\n" for i in chosen))
    r = evaluate(clean_run.out, queries, qrels)
    assert r["queries"] == len(chosen)
    assert r["recall@100"] > 0.95 and r["ndcg@10"] > 0.8


def _start(corpus: Path, out: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    log = open(out.parent / f"{out.name}-ingest.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "-v", "ingest", str(corpus), "--out", str(out), "--no-progress"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(ROOT),
        preexec_fn=ctrl_c_works,  # noqa: PLW1509 - only resets a signal disposition
    )


def _pids(out: Path) -> dict[str, int]:
    p = out / ".fbas" / "local" / "local-pids.json"
    try:
        return {e["name"]: e["pid"] for e in json.loads(p.read_text()) if "pid" in e}
    except (OSError, ValueError):
        return {}


def test_interrupted_job_resumes_to_the_same_output(clean_run, stsb_corpus, tmp_path):
    corpus, pairs = stsb_corpus
    out = tmp_path / "out"
    seed_model(out, clean_run.out)
    leftovers: list[int] = []
    try:
        # 1. kill -9 the ingest midway (batch 3 hangs): redis, tritonserver and the worker die with it
        #    (PDEATHSIG); only its temporary folder stays, for the next local run (into any folder) to sweep
        p = _start(corpus, out, {"FBAS_TEST_PAUSE": "3:120"})
        wait_for(lambda: count_parts(out) >= 2 and len(_pids(out)) == 3, 240, "two committed parts")
        first = _pids(out)
        leftovers += first.values()
        work = next(
            Path(e["work"]) for e in json.loads((out / ".fbas/local/local-pids.json").read_text()) if "work" in e
        )
        assert work.is_dir() and work.name.startswith(f"fbas-local-{p.pid}-")
        p.kill()
        p.wait(timeout=30)
        wait_for(
            lambda: not any(pid_alive(first[n]) for n in ("redis-server", "celery worker", "tritonserver")),
            30,
            "redis, tritonserver and the worker to die with their parent",
        )
        done_before = count_parts(out)
        assert done_before < 6 and not (out / "manifest.json").exists()

        # 2. rerun, then Ctrl-C it once it has committed one more part: everything it started stops
        p = _start(corpus, out)
        wait_for(
            lambda: len(_pids(out)) == 3 and set(_pids(out).values()).isdisjoint(first.values()),
            240,
            "the second run's cluster",
        )
        assert not work.exists(), "the killed run's temporary folder was swept"
        second = _pids(out)
        leftovers += second.values()
        wait_for(lambda: count_parts(out) > done_before or p.poll() is not None, 240, "progress in the second run")
        p.send_signal(signal.SIGINT)
        code = p.wait(timeout=120)
        assert code in (130, 0)
        for name, pid in second.items():
            assert not pid_alive(pid), f"{name} (pid {pid}) survived Ctrl-C"

        # 3. rerun to the end: every row exactly once, the same vectors as the clean run
        p = _start(corpus, out)
        assert p.wait(timeout=600) == 0
        m = check_oracle(out, [f"s{i}" for i in range(2 * len(pairs))])
        assert m["counts"]["batches"] == json.loads((clean_run.out / "manifest.json").read_text())["counts"]["batches"]
        rows, ids, vecs = read_vectors(out)
        rows0, ids0, vecs0 = read_vectors(clean_run.out)
        assert np.array_equal(rows, rows0) and ids == ids0
        np.testing.assert_allclose(vecs, vecs0, atol=2e-6)
    finally:
        for pid in leftovers:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
