"""Triton not ready at start, restarted and killed mid-stream: clients wait, retry, and answer every request once.

These tests start their own tritonserver (the session's shared one stays untouched).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from core.errors import ServerUnavailableError
from services.triton import TritonProcess, free_port
from workers.triton_client import ClientOptions, TritonEncoder

N_REQUESTS = 40


def _stream(
    enc: TritonEncoder, docs, slice_docs, out: dict, errors: list, pace: float, times: list, stop: threading.Event
) -> None:
    """Send requests one at a time (request i = documents i..i+3, cycling) until ``stop`` is set, and at
    least N_REQUESTS; note when each is answered."""
    try:
        i = 0
        while i < N_REQUESTS or not stop.is_set():
            j = i % N_REQUESTS
            out[i] = np.array(enc.embed(*slice_docs(docs, j, j + 4)))
            times.append(time.monotonic())
            time.sleep(pace)
            i += 1
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
        errors.append(e)


@pytest.fixture
def own_triton(triton_repo):
    proc = TritonProcess(triton_repo, ready_timeout=180)
    yield proc
    proc.stop()


def test_client_waits_for_a_server_that_is_not_up_yet(own_triton, triton_docs, triton_docs_reference, slice_docs):
    own_triton.ports["grpc"] = free_port()
    enc = TritonEncoder(ClientOptions(url=f"127.0.0.1:{own_triton.ports['grpc']}", ready_timeout=120))
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("v", enc.embed(*slice_docs(triton_docs, 0, 3))))
    t.start()
    time.sleep(1.0)
    assert t.is_alive(), "the client must wait for readiness, not fail"
    own_triton.start()
    t.join(timeout=120)
    np.testing.assert_allclose(got["v"], triton_docs_reference[:3], atol=1e-5)
    enc.close()


def test_restart_and_kill_mid_stream(own_triton, triton_docs, triton_docs_reference, slice_docs):
    own_triton.start()
    opts = {"retry_budget": 90.0, "max_retries": 40}
    clients = {
        "grpc": TritonEncoder(ClientOptions(url=own_triton.grpc_url, **opts)),
        "http": TritonEncoder(ClientOptions(url=own_triton.http_url, protocol="http", **opts)),
        "grpc-shm": TritonEncoder(ClientOptions(url=own_triton.grpc_url, shared_memory=True, **opts)),
    }
    for c in clients.values():
        c.wait_ready()
    results: dict[str, dict[int, np.ndarray]] = {k: {} for k in clients}
    errors: list[BaseException] = []
    answered: dict[str, list[float]] = {k: [] for k in clients}
    stop = threading.Event()
    threads = [
        threading.Thread(target=_stream, args=(c, triton_docs, slice_docs, results[k], errors, 0.05, answered[k], stop))
        for k, c in clients.items()
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)
    restart_began = time.monotonic()
    own_triton.restart()  # graceful: SIGTERM, in-flight requests finish, model unloads
    time.sleep(0.5)
    own_triton.restart(kill=True)  # crash: SIGKILL of the server and its backend stubs
    restarts_done = time.monotonic()
    time.sleep(1.0)  # keep streaming a while against the restarted server
    stop.set()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    for k, c in clients.items():
        assert sorted(results[k]) == list(range(len(results[k]))), k  # every request answered, once
        assert len(results[k]) >= N_REQUESTS, k
        for i, out in results[k].items():
            j = i % N_REQUESTS
            np.testing.assert_allclose(out, triton_docs_reference[j : j + 4], atol=1e-5)
        # the stream really spanned both restarts (gRPC may reconnect without our retry loop seeing it)
        assert min(answered[k]) < restart_began and max(answered[k]) > restarts_done, k
        c.close()
    assert sum(c.stats.retries for c in clients.values()) >= 1, "no client saw the server go away"
    assert clients["grpc-shm"].stats.reregistrations >= 1


def test_unreachable_server_gives_up_within_its_bound():
    enc = TritonEncoder(ClientOptions(url=f"127.0.0.1:{free_port()}", ready_timeout=1.0))
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="not ready after"):
        enc.embed(np.array([101, 102], np.int32), np.array([2], np.int32))
    assert time.monotonic() - t0 < 10
    enc.close()
