"""Embeddings through a real tritonserver equal the in-process engine's, on every client path."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest

from workers.triton_client import ClientOptions, TritonEncoder

PATHS = {
    "grpc": lambda t: ClientOptions(url=t.grpc_url),
    "http": lambda t: ClientOptions(url=t.http_url, protocol="http"),
    "grpc-shm": lambda t: ClientOptions(url=t.grpc_url, shared_memory=True),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_embeddings_match_in_process_engine(triton, triton_docs, triton_docs_reference, min_cosine, path):
    with TritonEncoder(PATHS[path](triton)) as enc:
        out = enc.embed(triton_docs.token_ids, triton_docs.lengths)  # 96 docs > 64 per request: 2 requests
        assert enc.stats.requests == 2 and enc.stats.retries == 0
        assert (enc.dim, enc.max_seq_len, enc.precision) == (384, 256, "fp32")
    assert out.shape == triton_docs_reference.shape and out.dtype == np.float32
    assert min_cosine(out, triton_docs_reference) >= 0.999999
    np.testing.assert_allclose(out, triton_docs_reference, atol=1e-5)


def test_responses_leave_no_tracebacks_in_the_server_log(triton, triton_docs):
    """The outputs leave model.py through DLPack capsules; releasing them must not write the
    "PyCapsule_GetPointer called with incorrect name" traceback the stub's renaming used to cause."""
    with TritonEncoder(ClientOptions(url=triton.grpc_url)) as enc:
        enc.embed(triton_docs.token_ids, triton_docs.lengths)
        assert enc.stats.requests == 2
    deadline = time.monotonic() + 2
    while "Traceback" not in triton.log_file.read_text(encoding="utf-8") and time.monotonic() < deadline:
        time.sleep(0.2)  # a late traceback would be written after the response; give it time
    log = triton.log_file.read_text(encoding="utf-8")
    assert "Traceback" not in log and "PyCapsule" not in log, log[-2000:]


def test_fp16_output(triton, triton_docs, triton_docs_reference, min_cosine):
    with TritonEncoder(ClientOptions(url=triton.grpc_url, model_name="fbas_encoder_fp16")) as enc:
        assert enc.info.output_dtype == "FP16"
        out = enc.embed(triton_docs.token_ids, triton_docs.lengths)
    assert out.dtype == np.float32
    assert min_cosine(out, triton_docs_reference) >= 0.99999


def test_a_text_alone_equals_the_same_text_in_a_batch(triton, triton_docs, slice_docs):
    with TritonEncoder(ClientOptions(url=triton.grpc_url)) as enc:
        ids, lens = slice_docs(triton_docs, 0, 40)
        batch = enc.embed(ids, lens)
        for i in (0, 17, 39):
            one = enc.embed(*slice_docs(triton_docs, i, i + 1))
            np.testing.assert_allclose(one[0], batch[i], atol=1e-5)


def test_empty_input_gives_empty_output(triton):
    with TritonEncoder(ClientOptions(url=triton.grpc_url)) as enc:
        out = enc.embed(np.zeros(0, np.int32), np.zeros(0, np.int32))
    assert out.shape == (0, 384) and enc.stats.requests == 0


def test_served_config_is_ragged_and_batched(triton):
    with urllib.request.urlopen(f"http://{triton.http_url}/v2/models/fbas_encoder/config", timeout=5) as r:
        cfg = json.load(r)
    inputs = {i["name"]: i for i in cfg["input"]}
    assert set(inputs) == {"token_ids", "lengths"}
    assert all(i["data_type"] == "TYPE_INT32" and i["allow_ragged_batch"] for i in inputs.values())
    assert cfg["output"][0]["name"] == "embedding" and [int(d) for d in cfg["output"][0]["dims"]] == [-1, 384]
    assert cfg["max_batch_size"] >= 2 and cfg["dynamic_batching"]["preferred_batch_size"]
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU"
