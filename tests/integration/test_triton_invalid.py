"""Invalid and oversized requests: clear errors naming the rows, splits, and never an endless retry."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from core.errors import InvalidRequestError
from workers.triton_client import BadRowsError, ClientOptions, TritonEncoder


@pytest.fixture
def raw_client(triton):
    """A gRPC client that sends what it is given (no client-side row checks)."""
    with TritonEncoder(ClientOptions(url=triton.grpc_url, validate=False)) as enc:
        yield enc


def _with_bad_token(docs, slice_docs, n: int, row: int) -> tuple[np.ndarray, np.ndarray]:
    ids, lens = slice_docs(docs, 0, n)
    ids = ids.copy()
    ids[int(lens[:row].sum()) + 1] = 10_000_000
    return ids, lens


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_token_rejected_by_server_names_the_row_once(triton, triton_docs, slice_docs, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with TritonEncoder(ClientOptions(url=url, protocol=protocol, validate=False)) as enc:
        with pytest.raises(BadRowsError, match=r"token ids must be in 0\.\.30521") as info:
            enc.embed(*_with_bad_token(triton_docs, slice_docs, 10, row=7))
        assert info.value.rows == [7]
        assert (enc.stats.requests, enc.stats.retries) == (1, 0)


def test_bad_row_in_second_request_reports_its_position_in_the_input(raw_client, triton_docs, slice_docs):
    ids, lens = _with_bad_token(triton_docs, slice_docs, 80, row=70)  # 80 docs -> requests of 64 + 16
    with pytest.raises(BadRowsError) as info:
        raw_client.embed(ids, lens)
    assert info.value.rows == [70]


def test_too_long_document_rejected(raw_client):
    with pytest.raises(BadRowsError, match=r"lengths must be in 1\.\.256") as info:
        raw_client.embed(np.full(5 + 300, 1000, np.int32), np.array([5, 300], np.int32))
    assert info.value.rows == [1] and raw_client.stats.retries == 0


def test_client_side_validation_needs_no_round_trip(triton):
    with TritonEncoder(ClientOptions(url=triton.grpc_url)) as enc:
        with pytest.raises(BadRowsError) as info:
            enc.embed(np.array([101, 99999, 102, 101, 102], np.int32), np.array([3, 2], np.int32))
        assert info.value.rows == [0] and enc.stats.requests == 0
        with pytest.raises(InvalidRequestError, match="does not match"):
            enc.embed(np.array([101, 102], np.int32), np.array([3], np.int32))
        assert enc.stats.requests == 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_oversized_request_is_split_not_retried(triton, triton_docs, triton_docs_reference, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    # the client believes it may send 96 docs at once; the server allows 64
    with TritonEncoder(ClientOptions(url=url, protocol=protocol, max_docs_per_request=1000)) as enc:
        out = enc.embed(triton_docs.token_ids, triton_docs.lengths)
        assert (enc.stats.requests, enc.stats.splits, enc.stats.retries) == (3, 1, 0)
    np.testing.assert_allclose(out, triton_docs_reference, atol=1e-5)


def test_a_bad_request_never_fails_the_batch_it_shares(triton, triton_docs, triton_docs_reference, slice_docs):
    """Good and bad requests sent at once (batched together by Triton): each gets its own answer."""
    bad_ids, bad_lens = _with_bad_token(triton_docs, slice_docs, 6, row=2)
    good: dict[int, np.ndarray] = {}
    bad: dict[int, BaseException] = {}
    barrier = threading.Barrier(8)

    def run(k: int) -> None:
        with TritonEncoder(ClientOptions(url=triton.grpc_url, validate=False)) as enc:
            enc.wait_ready()
            barrier.wait(timeout=60)
            for j in range(3):
                try:
                    if k % 2:
                        enc.embed(bad_ids, bad_lens)
                    else:
                        good[k * 10 + j] = np.array(enc.embed(*slice_docs(triton_docs, k + j, k + j + 5)))
                except InvalidRequestError as e:
                    bad[k * 10 + j] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(good) == 12 and len(bad) == 12
    for key, out in good.items():
        s = key // 10 + key % 10
        np.testing.assert_allclose(out, triton_docs_reference[s : s + 5], atol=1e-5)
    assert all(isinstance(e, BadRowsError) and e.rows == [2] for e in bad.values())
