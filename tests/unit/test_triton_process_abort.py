"""TritonProcess.abort from another thread while start() runs there (a local cluster stopped during its
model's load): no error in either thread, the start gives up, and no process is left.

The server is a stand-in that never becomes ready (a script that sleeps): what is tested is the
process handling shared by the two threads, which a real tritonserver's load only makes slower.
The real server's version of this is tests/integration/test_pipeline_cluster.py
(``test_a_cluster_stopped_while_its_model_loads_stops_at_once``).
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from core.errors import ServerUnavailableError
from services.triton import ServerExitedError, TritonProcess


@pytest.fixture()
def never_ready(tmp_path):
    binary = tmp_path / "bin" / "tritonserver"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexec sleep 300\n", encoding="utf-8")
    binary.chmod(0o755)
    repo = tmp_path / "repo"
    repo.mkdir()
    return str(binary), repo


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_abort_while_starting_leaves_nothing_running_and_raises_nowhere(never_ready):
    binary, repo = never_ready
    rng = random.Random(0)
    for attempt in range(20):
        proc = TritonProcess(repo, tritonserver=binary, ready_timeout=120)
        errors: list[BaseException] = []

        def start() -> None:
            try:
                proc.start()
            except BaseException as e:  # noqa: BLE001 - checked below
                errors.append(e)

        t = threading.Thread(target=start)
        t.start()
        pid = None
        if attempt % 4:  # mostly once the process exists; every fourth time at once, maybe before it does
            deadline = time.monotonic() + 10
            while proc.pid is None and time.monotonic() < deadline:
                time.sleep(0.01)
            pid = proc.pid
            assert pid is not None, "the stand-in server did not start"
            time.sleep(rng.uniform(0, 0.15))
        proc.abort()
        t.join(timeout=30)
        assert not t.is_alive(), f"attempt {attempt}: start() still waiting after abort()"
        assert len(errors) == 1 and isinstance(errors[0], (ServerExitedError, ServerUnavailableError)), (
            attempt,
            errors,
        )
        assert proc.stop() is None and proc.pid is None  # the start cleaned up after itself
        if pid is not None:
            assert not _alive(pid), f"attempt {attempt}: pid {pid} still running"
