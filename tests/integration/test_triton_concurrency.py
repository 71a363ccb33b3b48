"""Many concurrent clients: every result stays correct and Triton batches requests together."""

from __future__ import annotations

import threading

import numpy as np

from tests.pipeline_support import settled_statistics
from workers.triton_client import ClientOptions, TritonEncoder

N_CLIENTS = 8
REQUESTS_PER_CLIENT = 6


def test_concurrent_clients_are_correct_and_batched(triton, triton_docs, triton_docs_reference, slice_docs):
    stats = TritonEncoder(ClientOptions(url=triton.grpc_url))
    before = stats.model_statistics()
    rng = np.random.default_rng(0)
    # each request: a random window of 1..12 documents, so token counts differ between requests
    plans = [
        [
            (int(s), int(s) + int(n))
            for s, n in zip(rng.integers(0, 80, REQUESTS_PER_CLIENT), rng.integers(1, 13, REQUESTS_PER_CLIENT))
        ]
        for _ in range(N_CLIENTS)
    ]
    errors: list[BaseException] = []
    results: dict[tuple[int, int], np.ndarray] = {}
    barrier = threading.Barrier(N_CLIENTS)

    def client(k: int) -> None:
        opts = ClientOptions(url=triton.http_url, protocol="http") if k % 2 else ClientOptions(url=triton.grpc_url)
        try:
            with TritonEncoder(opts) as enc:
                enc.wait_ready()
                barrier.wait(timeout=60)
                for j, (s, e) in enumerate(plans[k]):
                    results[(k, j)] = np.array(enc.embed(*slice_docs(triton_docs, s, e)))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(N_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == N_CLIENTS * REQUESTS_PER_CLIENT
    for (k, j), out in results.items():
        s, e = plans[k][j]
        np.testing.assert_allclose(out, triton_docs_reference[s:e], atol=1e-5)

    after = settled_statistics(stats, before, N_CLIENTS * REQUESTS_PER_CLIENT)
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == N_CLIENTS * REQUESTS_PER_CLIENT
    assert executions < inferences, f"no request was batched: {executions} executions for {inferences} requests"
    assert max(int(b["batch_size"]) for b in after["batch_stats"]) > 1
    stats.close()
