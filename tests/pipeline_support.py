"""Helpers for the pipeline tests (corpora, reading outputs, the exactly-once oracle, Triton's
statistics once settled). Not a test module."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq


def ctrl_c_works() -> None:
    """``preexec_fn`` for a child a test will Ctrl-C (SIGINT): a shell running the tests in the background
    (``make test &``, nohup, some CI runners) starts them with SIGINT ignored, every child inherits that, and
    Python then installs no KeyboardInterrupt handler: the child would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_stsb_corpus(pairs: list[tuple[str, str, float]], path: Path) -> Path:
    """STS-B pairs as a corpus: rows 0..n-1 are sentence 1, rows n..2n-1 sentence 2 (ids "s<row>")."""
    texts = [a for a, _, _ in pairs] + [b for _, b, _ in pairs]
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(len(texts))], "text": texts}), path, row_group_size=1000)
    return path


def read_vectors(out: Path) -> tuple[np.ndarray, list, np.ndarray]:
    """(row_ids ascending, ids, float32 [n, dim]) from OUT/vectors."""
    t = ds.dataset(out / "vectors", format="parquet").to_table()
    rows = t.column("row_id").to_numpy()
    order = np.argsort(rows)
    emb = t.column("embedding").combine_chunks()
    dim = emb.type.list_size
    mat = emb.values.to_numpy().reshape(-1, dim)[order]
    return rows[order], [t.column("id").to_pylist()[i] for i in order], mat


def read_quarantine(out: Path) -> dict[int, str]:
    p = out / "quarantine.parquet"
    if not p.exists():
        return {}
    t = pq.read_table(p)
    return dict(zip(t.column("row_id").to_pylist(), t.column("reason").to_pylist()))


def check_oracle(out: Path, input_ids: list) -> dict:
    """docs/reliability.md's oracle: every input row once (embedded or quarantined), ids equal, checksums verify."""
    manifest = json.loads((out / "manifest.json").read_text())
    rows, ids, mat = read_vectors(out)
    q = read_quarantine(out)
    seen = rows.tolist() + list(q)
    assert len(seen) == len(set(seen)), "a row appears twice"
    assert sorted(seen) == list(range(len(input_ids))), "lost or unexpected rows"
    assert [input_ids[r] for r in rows.tolist()] == ids, "ids differ from the input's"
    assert len(set(ids)) == len(ids)
    assert np.isfinite(mat).all()
    for part in manifest["parts"]:
        assert hashlib.sha256((out / part["file"]).read_bytes()).hexdigest() == part["sha256"], part["file"]
    on_disk = sorted(p.name for p in (out / "vectors").iterdir())
    assert on_disk == sorted(Path(p["file"]).name for p in manifest["parts"]), "stray or missing part files"
    assert hashlib.sha256((out / "index.faiss").read_bytes()).hexdigest() == manifest["index"]["sha256"]
    assert manifest["counts"]["embedded"] == len(rows) and manifest["counts"]["quarantined"] == len(q)
    return manifest


def seed_model(out: Path, template_out: Path) -> None:
    """Copy a built model (OUT/.fbas/model + its spec stamp) from another output folder, to skip a rebuild."""
    (out / ".fbas").mkdir(parents=True, exist_ok=True)
    shutil.copytree(template_out / ".fbas" / "model", out / ".fbas" / "model", dirs_exist_ok=True)
    shutil.copy2(template_out / ".fbas" / "model.spec", out / ".fbas" / "model.spec")


def wait_for(pred, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def count_parts(out: Path) -> int:
    d = out / "vectors"
    return len([p for p in d.iterdir() if p.name.endswith(".parquet")]) if d.is_dir() else 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_cluster_from_pidfile(out: Path) -> list[int]:
    """SIGKILL every process a local-mode run recorded in OUT/.fbas/local/local-pids.json (and its group)."""
    p = out / ".fbas" / "local" / "local-pids.json"
    pids = [e["pid"] for e in json.loads(p.read_text()) if "pid" in e] if p.exists() else []
    for pid in pids:
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def settled_statistics(encoder, before: dict, n_inferences: int, timeout: float = 10.0) -> dict:
    """Triton's model statistics once ``n_inferences`` more inferences than ``before`` are counted.

    Triton updates its statistics after the responses are on their way, so a client that has every
    response may still read the previous counts for a moment; this polls (at most ``timeout`` s) and
    returns the last reading, which the caller's assertions then judge."""
    deadline = time.monotonic() + timeout
    while True:
        after = encoder.model_statistics()
        if after["inference_count"] - before["inference_count"] >= n_inferences or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def start_cluster(template_out: Path, state_dir: Path, out_root: Path, worker_env: dict[str, str], **queue):
    """A LocalCluster serving the built model in ``template_out`` to fleet-style producers (``broker_url``,
    ``task_key``), its worker writing anywhere under ``out_root``; ``queue``: QueueConfig fields. Skips
    the test when redis-server or tritonserver is missing."""
    from core.config import FbasConfig
    from services.local import LocalCluster

    need_services()
    cfg = FbasConfig()
    for k, v in queue.items():
        setattr(cfg.queue, k, v)
    c = LocalCluster(
        template_out / ".fbas" / "model", state_dir, cfg, concurrency=2, worker_env=worker_env, out_roots=[out_root]
    )
    c.start()
    try:
        c.wait_ready()
    except BaseException:
        c.stop()
        raise
    return c


def fbas_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120):
    """The real `fbas-pipeline` command (this checkout's), with no FBAS_* variable of the caller's unless
    ``env`` gives it; run from ``cwd`` (default: the repository)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    pythonpath = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FBAS_")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd or root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, "PYTHONPATH": pythonpath, **(env or {})},
    )


def need_services() -> None:
    """Skip the calling test, saying why, unless redis-server and tritonserver are installed."""
    import shutil as _shutil

    import pytest

    from core.errors import ConfigError
    from services.triton import find_tritonserver

    if not _shutil.which("redis-server"):
        pytest.skip("redis-server is not on PATH (apt install redis-server)")
    try:
        find_tritonserver()
    except ConfigError as e:
        pytest.skip(f"tritonserver is not installed: {e}")


def ingest_in_background(cluster, template_out: Path, corpus: Path, out: Path, **settings):
    """A fleet producer's ingest of ``corpus`` into ``out`` against ``cluster`` (``start_cluster``), on a thread;
    ``settings``: ``section__field=value`` overrides (e.g. ``corpus__batch_rows=32``). Returns the thread and a
    dict that gets ``r`` (the IngestResult) or ``e`` (the exception) when it ends."""
    import threading

    from core.config import FbasConfig
    from pipeline.ingest.run import ingest

    seed_model(out, template_out)
    cfg = FbasConfig()
    cfg.queue.broker, cfg.queue.task_key, cfg.output.out = cluster.broker_url, cluster.task_key, str(out)
    for key, value in settings.items():
        section, _, name = key.partition("__")
        setattr(getattr(cfg, section), name, value)
    result: dict = {}

    def run() -> None:
        try:
            result["r"] = ingest(str(corpus), cfg, progress=False)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["e"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result
