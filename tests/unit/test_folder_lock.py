"""One owner per output folder (``core.layout.FolderLock``), and temp files removed only when provably stale.

Real processes hold the lock and write the temp files; nothing is faked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import FbasConfig
from core.errors import InputError
from core.layout import VECTORS, OutputDir
from output.check import check_folder

ROOT = Path(__file__).resolve().parents[2]

HOLD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from core.layout import OutputDir
with OutputDir(sys.argv[1]).lock():
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(ROOT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_job_is_refused_naming_the_holder_and_the_lock_dies_with_it(tmp_path):
    out = tmp_path / "out"
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["a b", "c d"]}), corpus)
    cfg = FbasConfig()
    cfg.output.out = str(out)
    holder = _holder(out)
    try:
        from pipeline.ingest.run import ingest

        with pytest.raises(InputError) as e:
            ingest(str(corpus), cfg, progress=False)
        msg = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and "another --out" in msg
        assert not (out / ".fbas" / "model").exists(), "the refused job must not touch the folder"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with OutputDir(out).lock():  # the kernel dropped the killed holder's lock: nothing to clean up
        with pytest.raises(InputError, match=f"pid {os.getpid()}"):
            OutputDir(out).lock().acquire()


def _temp_name(final: str, host: str, pid: int) -> str:
    return f"{final}.tmp-{host}-{pid}-0123abcd"


def test_only_provably_abandoned_temp_files_are_removed(tmp_path):
    out = OutputDir(tmp_path)
    out.make_dirs()
    vec = out.path(VECTORS)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    try:
        names = {
            "dead": _temp_name("part-000000.parquet", host, dead.pid),
            "live": _temp_name("part-000001.parquet", host, live.pid),
            "other-host": _temp_name("part-000002.parquet", "some-other-host", dead.pid),
            "mine": _temp_name("part-000003.parquet", host, os.getpid()),
        }
        for name in names.values():
            (vec / name).write_bytes(b"partial")
        assert OutputDir.stale_temp(vec / names["dead"])
        assert not any(OutputDir.stale_temp(vec / names[k]) for k in ("live", "other-host", "mine"))
        missing, stray = check_folder(out, "job", 4)
        assert missing == [0, 1, 2, 3] and stray == [], "temp files are neither parts nor strays"
        left = sorted(p.name for p in vec.iterdir())
        assert left == sorted(names[k] for k in ("live", "other-host", "mine"))
    finally:
        live.kill()
        live.wait()


def test_a_full_model_cache_falls_back_to_building_in_the_output_folder(tmp_path, monkeypatch):
    """A full home quota (an error that names no file) while building into the cache is no reason to stop: the
    model is built into OUT instead; only a full OUT is refused."""
    import errno as _errno

    from pipeline.ingest import model_cache as mc

    built: list[Path] = []

    def fake_build(cfg, folder, steps):
        built.append(folder)
        if folder.parent.name == "cache":
            raise OSError(_errno.EDQUOT, "Disk quota exceeded")  # as a plain write() reports it: no filename
        folder.mkdir(parents=True)

    monkeypatch.setattr(mc, "_build", fake_build)
    out = OutputDir(tmp_path / "out")
    target = mc.ensure_model(FbasConfig(), out, cache=tmp_path / "cache")
    assert target == out.state("model") and target.is_dir()
    assert [b.parent.name for b in built] == ["cache", ".fbas"]
