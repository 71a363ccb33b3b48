"""workers.triton_wire on hand-built bytes: the protobuf scanner, request building, HTTP binary bodies.

Responses are built two ways: by tritonclient's own ``service_pb2`` (what Triton sends) and by
hand, field by field, to cover what protobuf allows but Triton does not send today (fields
out of order, unknown fields, unpacked shapes) and what a broken peer might send.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from workers.triton_client import BadRowsError, RequestTooLargeError, find_bad_rows, plan_chunks
from workers.triton_transport import _invalid
from workers.triton_wire import (
    ResponseFormatError,
    build_infer_request,
    decode_varint,
    encode_http_request,
    output_array,
    parse_http_response,
    scan_infer_response,
)

pb = pytest.importorskip("tritonclient.grpc.service_pb2")


# -- hand encoding helpers (protobuf wire format)


def varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_len(num: int, payload: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def field_varint(num: int, v: int) -> bytes:
    return varint(num << 3) + varint(v)


def output_msg(name: str, datatype: str, shape: list[int], packed: bool = True) -> bytes:
    body = field_len(1, name.encode()) + field_len(2, datatype.encode())
    if packed:
        body += field_len(3, b"".join(varint(d) for d in shape))
    else:
        body += b"".join(field_varint(3, d) for d in shape)
    return body


def pb_response(arrays: dict[str, np.ndarray], dtypes: dict[str, str] | None = None) -> bytes:
    r = pb.ModelInferResponse(model_name="fbas_encoder", model_version="1", id="req-7")
    for name, a in arrays.items():
        o = r.outputs.add()
        o.name, o.datatype = name, (dtypes or {}).get(name, "FP32")
        o.shape.extend(a.shape)
        r.raw_output_contents.append(a.tobytes())
    return r.SerializeToString()


def _root(a):
    """The object at the end of an array's ``.base`` chain (the buffer it views)."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


# -- varints


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31, 2**63 - 1, 2**64 - 1])
def test_varint_round_trip(value):
    buf = b"\x00" + varint(value) + b"\xff"
    v, pos = decode_varint(buf, 1)
    assert v == value and pos == len(buf) - 1


def test_truncated_varint_raises():
    with pytest.raises(ResponseFormatError):
        decode_varint(b"\x80\x80", 0)


# -- gRPC responses


def test_scan_matches_protobuf_and_is_a_view():
    emb = np.random.default_rng(0).standard_normal((1, 5, 384)).astype(np.float32)
    buf = pb_response({"embedding": emb})
    view = scan_infer_response(buf)
    assert (view.model_name, view.model_version, view.id) == ("fbas_encoder", "1", "req-7")
    out = view.output("embedding")
    assert (out.name, out.datatype, out.shape) == ("embedding", "FP32", [1, 5, 384])
    arr = output_array(buf, view, "embedding")
    np.testing.assert_array_equal(arr, emb)
    assert _root(arr) is buf  # a view of the response bytes, no copy
    assert not arr.flags.writeable
    # the same bytes, decoded by protobuf, agree on where the tensor is
    ref = pb.ModelInferResponse.FromString(buf)
    assert ref.raw_output_contents[0] == buf[out.offset : out.offset + out.nbytes]


def test_two_outputs_fp16_and_order():
    a = np.arange(12, dtype=np.float16).reshape(1, 3, 4)
    b = np.arange(6, dtype=np.int32).reshape(1, 6)
    buf = pb_response({"embedding": a, "n_tokens": b}, {"embedding": "FP16", "n_tokens": "INT32"})
    view = scan_infer_response(buf)
    np.testing.assert_array_equal(output_array(buf, view, "embedding"), a)
    np.testing.assert_array_equal(output_array(buf, view, "n_tokens"), b)
    assert output_array(buf, view, "embedding").dtype == np.float16


def test_hand_built_unusual_but_legal_layout():
    """raw contents before the output header, unknown fields of every wire type, unpacked shape."""
    emb = np.arange(8, dtype=np.float32).reshape(1, 2, 4)
    buf = (
        field_len(6, emb.tobytes())  # raw first
        + varint(99 << 3 | 1)
        + struct.pack("<d", 1.5)  # unknown fixed64
        + varint(98 << 3 | 5)
        + struct.pack("<f", 2.5)  # unknown fixed32
        + field_varint(97, 12345)  # unknown varint
        + field_len(4, field_len(1, b"k") + field_len(2, b"v"))  # a parameters map entry
        + field_len(5, output_msg("embedding", "FP32", [1, 2, 4], packed=False))
        + field_len(1, b"m")
    )
    arr = output_array(buf, scan_infer_response(buf), "embedding")
    np.testing.assert_array_equal(arr, emb)


def test_memoryview_input_works():
    emb = np.ones((1, 1, 3), np.float32)
    buf = memoryview(bytearray(pb_response({"embedding": emb})))
    np.testing.assert_array_equal(output_array(buf, scan_infer_response(buf), "embedding"), emb)


def test_missing_output_raises_never_none():
    buf = pb_response({"other": np.zeros((1, 2), np.float32)})
    with pytest.raises(ResponseFormatError, match="no output 'embedding'"):
        output_array(buf, scan_infer_response(buf), "embedding")


def test_empty_response_has_no_output():
    with pytest.raises(ResponseFormatError):
        output_array(b"", scan_infer_response(b""), "embedding")


def test_size_mismatch_raises():
    buf = field_len(5, output_msg("embedding", "FP32", [1, 3, 4])) + field_len(6, b"\x00" * 40)
    with pytest.raises(ResponseFormatError, match="needs 48 bytes"):
        output_array(buf, scan_infer_response(buf), "embedding")


def test_raw_count_mismatch_raises():
    buf = (
        field_len(5, output_msg("a", "FP32", [1]))
        + field_len(5, output_msg("b", "FP32", [1]))
        + field_len(6, b"\x00" * 4)
    )
    with pytest.raises(ResponseFormatError, match="2 outputs but 1 raw"):
        scan_infer_response(buf)


def test_output_without_raw_contents_raises():
    buf = field_len(5, output_msg("embedding", "FP32", [1, 1, 2]))
    with pytest.raises(ResponseFormatError, match="no raw contents"):
        output_array(buf, scan_infer_response(buf), "embedding")


def test_typed_contents_are_refused():
    out = output_msg("embedding", "FP32", [1]) + field_len(5, field_len(2, struct.pack("<f", 1.0)))
    with pytest.raises(ResponseFormatError, match="typed 'contents'"):
        scan_infer_response(field_len(5, out))


def test_unknown_datatype_raises():
    buf = field_len(5, output_msg("embedding", "BF16", [1, 1])) + field_len(6, b"\x00\x00")
    with pytest.raises(ResponseFormatError, match="BF16"):
        output_array(buf, scan_infer_response(buf), "embedding")


@pytest.mark.parametrize("cut", [1, 5, 30])
def test_truncated_response_raises(cut):
    buf = pb_response({"embedding": np.ones((1, 2, 4), np.float32)})
    with pytest.raises(ResponseFormatError):
        scan_infer_response(buf[:-cut])


def test_bad_wire_type_raises():
    with pytest.raises(ResponseFormatError, match="wire type"):
        scan_infer_response(varint(5 << 3 | 3) + b"\x00")


def test_negative_dimension_raises():
    buf = field_len(5, output_msg("embedding", "FP32", [1, -1])) + field_len(6, b"")
    view = scan_infer_response(buf)
    assert view.outputs[0].shape == [1, -1]
    with pytest.raises(ResponseFormatError, match="negative"):
        output_array(buf, view, "embedding")


# -- requests


def test_build_infer_request_round_trip():
    ids = np.array([101, 7, 102, 101, 102], np.int32)
    lens = np.array([3, 2], np.int32)
    req = pb.ModelInferRequest.FromString(build_infer_request("fbas_encoder", ids, lens))
    assert req.model_name == "fbas_encoder"
    assert [(t.name, t.datatype, list(t.shape)) for t in req.inputs] == [
        ("token_ids", "INT32", [1, 5]),
        ("lengths", "INT32", [1, 2]),
    ]
    assert [o.name for o in req.outputs] == ["embedding"]
    np.testing.assert_array_equal(np.frombuffer(req.raw_input_contents[0], np.int32), ids)
    np.testing.assert_array_equal(np.frombuffer(req.raw_input_contents[1], np.int32), lens)


def test_build_infer_request_shared_memory():
    ids, lens = np.arange(6, dtype=np.int32), np.array([6], np.int32)
    shm = {"region": "r1", "ids_offset": 0, "lengths_offset": 24, "out_offset": 64, "out_nbytes": 1536}
    req = pb.ModelInferRequest.FromString(build_infer_request("m", ids, lens, shm=shm))
    assert not req.raw_input_contents
    p = req.inputs[1].parameters
    assert (
        p["shared_memory_region"].string_param,
        p["shared_memory_offset"].int64_param,
        p["shared_memory_byte_size"].int64_param,
    ) == ("r1", 24, 4)
    q = req.outputs[0].parameters
    assert (q["shared_memory_offset"].int64_param, q["shared_memory_byte_size"].int64_param) == (64, 1536)


# -- HTTP binary tensors


def test_http_request_layout():
    ids, lens = np.array([1, 2, 3], np.int32), np.array([3], np.int32)
    body, n = encode_http_request(ids, lens)
    header = json.loads(body[:n])
    assert header["inputs"][0] == {
        "name": "token_ids",
        "datatype": "INT32",
        "shape": [1, 3],
        "parameters": {"binary_data_size": 12},
    }
    assert header["outputs"] == [{"name": "embedding", "parameters": {"binary_data": True}}]
    assert body[n:] == ids.tobytes() + lens.tobytes()


def test_http_binary_response_is_a_view():
    emb = np.random.default_rng(1).standard_normal((1, 4, 8)).astype(np.float32)
    header = json.dumps(
        {
            "model_name": "m",
            "outputs": [
                {
                    "name": "embedding",
                    "datatype": "FP32",
                    "shape": [1, 4, 8],
                    "parameters": {"binary_data_size": emb.nbytes},
                }
            ],
        }
    ).encode()
    body = header + emb.tobytes()
    _, arrays = parse_http_response(body, len(header))
    np.testing.assert_array_equal(arrays["embedding"], emb)
    assert not arrays["embedding"].flags.writeable


def test_http_json_output_is_converted():
    body = json.dumps(
        {"outputs": [{"name": "embedding", "datatype": "FP32", "shape": [1, 1, 2], "data": [0.5, 1.5]}]}
    ).encode()
    _, arrays = parse_http_response(body, None)
    np.testing.assert_array_equal(arrays["embedding"], np.array([[[0.5, 1.5]]], np.float32))


@pytest.mark.parametrize("size,extra", [(100, b""), (32, b"\x00" * 16)])
def test_http_size_mismatch_raises(size, extra):
    header = json.dumps(
        {
            "outputs": [
                {"name": "embedding", "datatype": "FP32", "shape": [1, 2, 4], "parameters": {"binary_data_size": size}}
            ]
        }
    ).encode()
    with pytest.raises(ResponseFormatError):
        parse_http_response(header + extra, len(header))


def test_http_header_length_past_body_raises():
    with pytest.raises(ResponseFormatError):
        parse_http_response(b"{}", 10)


# -- client helpers


def test_plan_chunks_respects_both_limits():
    lens = np.array([10, 10, 10, 50, 5, 5, 5, 5], np.int32)
    chunks = plan_chunks(lens, max_docs=3, max_tokens=40)
    assert chunks[0] == (0, 3) and chunks[-1][1] == lens.size
    for s, e in chunks:
        assert e - s <= 3 and (lens[s:e].sum() <= 40 or e - s == 1)
    assert [i for s, e in chunks for i in range(s, e)] == list(range(lens.size))
    assert plan_chunks(lens, 100, 1000) == [(0, lens.size)]


def test_find_bad_rows():
    lens = np.array([3, 300, 2, 3], np.int32)
    assert find_bad_rows(np.zeros(308, np.int32), lens, max_seq_len=256, vocab_size=10) == [1]
    ids = np.array([1, 2, 3, 4, 50, 1, 2, 3], np.int32)
    assert find_bad_rows(ids, np.array([3, 2, 3], np.int32), 256, 10) == [1]


def test_server_error_tags():
    e = _invalid("[fbas:bad_rows=3,17] token ids must be in 0..30521")
    assert isinstance(e, BadRowsError) and e.rows == [3, 17]
    assert isinstance(_invalid("[fbas:oversize] 300 documents ..."), RequestTooLargeError)
    assert isinstance(_invalid("inference request batch-size must be <= 16 for 'm'"), RequestTooLargeError)
    assert type(_invalid("[fbas:bad_request] sum(lengths)")).__name__ == "InvalidRequestError"


def test_client_options_from_config_bound_retries_below_the_task_limit():
    from core.config import FbasConfig
    from workers.triton_client import ClientOptions

    cfg = FbasConfig()
    cfg.serve.triton, cfg.serve.model_name = "10.0.0.5:8001", "enc"
    cfg.queue.task_time_limit = 40.0
    o = ClientOptions.from_config(cfg)
    assert (o.url, o.model_name, o.protocol) == ("10.0.0.5:8001", "enc", "grpc")
    assert o.retry_budget <= 20.0 and o.request_timeout <= 20.0
