"""services.worker.CeleryWorker's supervision and workers.watchdog's outage rule, with real child processes
standing in for Celery (a shell that exits as a worker would)."""

from __future__ import annotations

import errno
import time

import pytest

from services import worker as sw
from workers.watchdog import EX_RESTART, OUTAGE_PINGS, BrokerWatchdog


def _worker(monkeypatch, tmp_path, script: str) -> sw.CeleryWorker:
    w = sw.CeleryWorker({}, 1, tmp_path / "w.log")
    monkeypatch.setattr(w, "command", lambda: ["sh", "-c", script])
    return w


def test_a_worker_that_asks_to_restart_is_restarted_then_given_up_on(monkeypatch, tmp_path):
    w = _worker(monkeypatch, tmp_path, f"exit {EX_RESTART}").start()
    deadline = time.monotonic() + 20
    while w._supervisor is not None and w._supervisor.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.restarts == sw.RESTARTS_PER_MINUTE
    assert not w.alive(), "a worker its supervisor gave up on must not look alive"
    w.stop()


def test_a_worker_that_exits_otherwise_is_not_restarted(monkeypatch, tmp_path):
    w = _worker(monkeypatch, tmp_path, "exit 3").start()
    assert w.wait() == 3 and w.restarts == 0 and not w.alive()
    w.stop()


def test_a_worker_that_cannot_be_started_says_so_instead_of_hanging(monkeypatch, tmp_path):
    w = sw.CeleryWorker({}, 1, tmp_path / "no" / "such" / "folder" / "w.log")
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        w.start()
    assert e.value.errno == errno.ENOENT and time.monotonic() - t0 < 10


def test_the_watchdog_restarts_only_after_a_real_outage(monkeypatch):
    import workers.watchdog as wd

    def run(answers: list[str | None], ids: list[str | None] | None = None) -> bool:
        seq, id_seq = iter(answers), iter(ids or [])
        recovered: list[bool] = []
        monkeypatch.setattr(wd, "ping_error", lambda client: next(seq, None))
        monkeypatch.setattr(wd, "server_id", lambda client: next(id_seq, "run-1" if ids else None))
        monkeypatch.setattr(wd, "connect_lazy", lambda url, timeout: None)
        dog = BrokerWatchdog("redis://h/0", interval=0.01, on_recovered=lambda: recovered.append(True))
        dog.start()
        time.sleep(0.02 * (len(answers) + 5))
        dog.stopped.set()
        dog.join(2)
        return bool(recovered)

    slow = "timeout"
    assert not run([None, slow, None, slow, slow, None, None])  # a busy broker's slow answers: no outage
    assert run([None] + [slow] * OUTAGE_PINGS + [None])  # slow for OUTAGE_PINGS pings in a row, then back
    assert run([None, "connection", None])  # refused once: it went away (a restart), and came back
    # a restart between two pings: every ping answers, but the server is another start of itself
    assert run([None] * 6, ["run-1", "run-1", "run-2"])
    assert not run([None] * 6, ["run-1", None, "run-1"])  # the same start (INFO unanswered once): no restart


def test_the_watchdog_sees_a_real_redis_restarted_between_two_pings(tmp_path):
    """A Redis killed and started again in 0.3 s, well inside the 1 s between pings: redis-py reconnects at the
    next ping without an error (it finds the dead connection when it takes it from the pool), so only the
    server's new run id tells the restart."""
    import shutil
    import socket
    import subprocess

    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server on PATH (CI installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def start() -> subprocess.Popen:
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as c:
                if c.connect_ex(("127.0.0.1", port)) == 0:
                    return p
            time.sleep(0.02)
        p.kill()
        pytest.fail("redis-server did not start")

    redis_proc = start()
    recovered: list[bool] = []
    dog = BrokerWatchdog(f"redis://127.0.0.1:{port}/0", interval=1.0, on_recovered=lambda: recovered.append(True))
    try:
        dog.start()
        time.sleep(2.5)  # two pings: the run id is known
        assert not recovered
        redis_proc.kill()
        redis_proc.wait()
        redis_proc = start()
        dog.join(5)
        assert recovered, "the restart went unseen: the worker would keep a consumer that never consumes again"
    finally:
        dog.stopped.set()
        redis_proc.kill()
        redis_proc.wait()
