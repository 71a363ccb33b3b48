"""`fbas-pipeline ingest` run as a user runs it, output captured (stderr is not a terminal): plain progress
lines, a summary whose rate covers only this run's work, and a rerun that embeds nothing and says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "pipeline" / "data" / "sample_corpus.parquet"


def _ingest(out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FBAS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ingest", str(SAMPLE), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_progress_lines_and_rates_of_this_run_only(tmp_path):
    out = tmp_path / "out"
    first = _ingest(out)
    assert first.returncode == 0, first.stderr
    assert "embedding: 2,910/2,910 docs (100%)" in first.stderr, first.stderr
    summary = first.stdout.strip().splitlines()
    assert summary[0].startswith("ingested 2910 rows into") and "2910 embedded" in summary[0]
    assert "then 2910 docs in" in summary[1] and "docs/s" in summary[1] and "to start (model" in summary[1]
    again = _ingest(out)
    assert again.returncode == 0, again.stderr
    assert "nothing was left to embed" in again.stdout and "docs/s" not in again.stdout


def test_a_second_ingest_into_a_busy_folder_is_refused_and_the_first_finishes(tmp_path):
    """Two local-mode ingests into one --out, started one after the other: the second is refused at once,
    naming the first; the first's services are untouched and its output passes the oracle."""
    import json
    import socket
    import time

    from tests.pipeline_support import check_oracle

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FBAS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", str(SAMPLE), "--out", str(out)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / ".fbas" / "lock"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (lock.exists() and lock.read_text().strip()):
            time.sleep(0.1)
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr, second.stderr
        stdout, stderr = first.communicate(timeout=600)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
    import pyarrow.parquet as pq

    ids = pq.read_table(SAMPLE, columns=["id"]).column("id").to_pylist()
    check_oracle(out, ids)


def test_search_shows_each_hits_text_and_asked_columns(tmp_path):
    """Hits carry their text (and --columns) read back from the corpus, in every output form; a corpus that
    moved after the ingest gives ids only, with one warning saying why."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    env = {k: v for k, v in os.environ.items() if not k.startswith("FBAS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    texts = ["A man is playing a guitar.", "A chef cooks pasta in a kitchen.", "Two dogs run on the beach."] * 20
    corpus = tmp_path / "c.parquet"
    table = {"id": [f"d{i}" for i in range(60)], "text": [f"{t} ({i})" for i, t in enumerate(texts)]}
    table["url"] = [f"https://example.org/{i}" for i in range(60)]
    pq.write_table(pa.table(table), corpus)
    out = tmp_path / "out"

    def fbas(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "pipeline.cli", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    assert fbas("ingest", str(corpus), "--out", str(out), "--no-progress").returncode == 0
    plain = fbas("search", str(out), "someone plays the guitar", "-k", "2", "--columns", "url")
    assert plain.returncode == 0, plain.stderr
    first = plain.stdout.splitlines()[0]
    assert "A man is playing a guitar." in first and "url=https://example.org/" in first
    hits = [json.loads(x) for x in fbas("search", str(out), "pasta", "-k", "3", "--json").stdout.splitlines()]
    assert all("chef cooks pasta" in h["text"] for h in hits) and len(hits) == 3
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": "q1", "text": "dogs at the sea"}) + "\n")
    many = json.loads(fbas("search", str(out), "--queries", str(qfile), "-k", "1", "--columns", "url").stdout)
    assert many["query_id"] == "q1" and "dogs run" in many["hits"][0]["text"] and many["hits"][0]["url"]
    corpus.rename(tmp_path / "moved.parquet")
    gone = fbas("search", str(out), "pasta", "-k", "1", "--json")
    assert gone.returncode == 0 and "hits show ids only" in gone.stderr and "is gone" in gone.stderr
    assert "text" not in json.loads(gone.stdout)
