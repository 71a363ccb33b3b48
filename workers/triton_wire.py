"""Triton's inference messages as bytes: build requests, read responses without copies.

gRPC: ``scan_infer_response(buf)`` walks the top level of a serialized ``ModelInferResponse``
with a small protobuf wire scanner (field 5 ``outputs``: name/datatype/shape; field 6
``raw_output_contents``: only its offset and length are recorded), and
``output_array(buf, view, name)`` returns ``np.frombuffer`` over the response bytes: no
protobuf objects, no copy of the tensor. The arrays are read-only views that keep ``buf``
alive.

HTTP (binary tensor extension): ``encode_http_request`` writes the JSON header followed by
the raw inputs; ``parse_http_response(body, header_length)`` parses only the small JSON
header and views the binary outputs that follow it.

Nothing here does I/O or imports grpc; ``workers.triton_client`` does both.

    ModelInferResponse:  1 model_name  2 model_version  3 id  4 parameters (map)
                         5 outputs: InferOutputTensor {1 name, 2 datatype, 3 shape (int64, packed),
                                                       4 parameters (map), 5 contents}
                         6 raw_output_contents (bytes, one per output, same order as outputs)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import PermanentError

__all__ = [
    "ResponseFormatError",
    "OutputView",
    "ResponseView",
    "DTYPES",
    "decode_varint",
    "scan_infer_response",
    "output_array",
    "build_infer_request",
    "encode_http_request",
    "parse_http_response",
]

DTYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "FP64": np.dtype("<f8"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "INT8": np.dtype("i1"),
    "UINT8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5


class ResponseFormatError(PermanentError):
    """A server response is malformed or does not hold the outputs the model contract promises."""


@dataclass
class OutputView:
    """One output tensor of a response: its header, and where its raw bytes lie in the buffer."""

    name: str = ""
    datatype: str = ""
    shape: list[int] = field(default_factory=list)
    offset: int = -1  # byte offset of its raw contents in the response buffer; -1 = none (e.g. shared memory)
    nbytes: int = 0


@dataclass
class ResponseView:
    """The parts of a ``ModelInferResponse`` the client needs, with outputs in wire order."""

    model_name: str = ""
    model_version: str = ""
    id: str = ""
    outputs: list[OutputView] = field(default_factory=list)

    def output(self, name: str) -> OutputView:
        for o in self.outputs:
            if o.name == name:
                return o
        raise ResponseFormatError(
            f"the response of model {self.model_name!r} has no output {name!r} "
            f"(outputs: {[o.name for o in self.outputs]})"
        )


def decode_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at ``buf[pos]``."""
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    result, shift = b & 0x7F, 7
    while True:
        pos += 1
        if pos >= len(buf) or shift > 63:
            raise ResponseFormatError("truncated or overlong varint in the response")
        b = buf[pos]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos + 1
        shift += 7


def _fields(buf: bytes | memoryview, start: int, end: int):
    """Yield (field number, wire type, value or (offset, length)) for each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        tag, pos = decode_varint(buf, pos)
        num, wt = tag >> 3, tag & 7
        if wt == _WT_LEN:
            n, pos = decode_varint(buf, pos)
            if pos + n > end:
                raise ResponseFormatError(f"field {num} runs past the end of the response ({pos + n} > {end})")
            yield num, wt, (pos, n)
            pos += n
        elif wt == _WT_VARINT:
            v, pos = decode_varint(buf, pos)
            yield num, wt, v
        elif wt == _WT_I64:
            pos += 8
        elif wt == _WT_I32:
            pos += 4
        else:
            raise ResponseFormatError(f"unsupported protobuf wire type {wt} (field {num}) in the response")
    if pos != end:
        raise ResponseFormatError("the response ends in the middle of a field")


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _scan_output(buf: bytes | memoryview, start: int, end: int) -> OutputView:
    out = OutputView()
    for num, wt, v in _fields(buf, start, end):
        if num == 1 and wt == _WT_LEN:
            out.name = bytes(buf[v[0] : v[0] + v[1]]).decode("utf-8")
        elif num == 2 and wt == _WT_LEN:
            out.datatype = bytes(buf[v[0] : v[0] + v[1]]).decode("ascii")
        elif num == 3 and wt == _WT_LEN:  # packed int64
            p, stop = v[0], v[0] + v[1]
            while p < stop:
                d, p = decode_varint(buf, p)
                out.shape.append(_int64(d))
        elif num == 3 and wt == _WT_VARINT:  # unpacked (legal protobuf, never sent by Triton today)
            out.shape.append(_int64(v))
        elif num == 5 and wt == _WT_LEN and v[1]:
            raise ResponseFormatError(
                f"output {out.name!r} came as typed 'contents', not raw bytes: this client "
                "reads raw_output_contents only"
            )
    return out


def scan_infer_response(buf: bytes | memoryview) -> ResponseView:
    """Index a serialized ``ModelInferResponse``: output headers and raw-content positions, no copies."""
    view = ResponseView()
    raws: list[tuple[int, int]] = []
    for num, wt, v in _fields(buf, 0, len(buf)):
        if wt != _WT_LEN:
            continue
        if num == 6:
            raws.append(v)
        elif num == 5:
            view.outputs.append(_scan_output(buf, v[0], v[0] + v[1]))
        elif num in (1, 2, 3):
            setattr(view, ("model_name", "model_version", "id")[num - 1], bytes(buf[v[0] : v[0] + v[1]]).decode())
    if raws:
        if len(raws) != len(view.outputs):
            raise ResponseFormatError(f"the response has {len(view.outputs)} outputs but {len(raws)} raw contents")
        for out, (off, n) in zip(view.outputs, raws):
            out.offset, out.nbytes = off, n
    return view


def output_array(buf: bytes | memoryview, view: ResponseView | OutputView, name: str | None = None) -> np.ndarray:
    """The raw output ``name`` as a read-only array viewing ``buf`` (shape and dtype from the response header)."""
    if isinstance(view, ResponseView):
        assert name is not None, "output_array needs the output name when given a whole ResponseView"
        out = view.output(name)
    else:
        out = view
    dtype = DTYPES.get(out.datatype)
    if dtype is None:
        raise ResponseFormatError(f"output {out.name!r} has datatype {out.datatype!r}, which this client does not read")
    if out.offset < 0:
        raise ResponseFormatError(f"output {out.name!r} has no raw contents in the response")
    if any(d < 0 for d in out.shape):
        raise ResponseFormatError(f"output {out.name!r} has a negative dimension in shape {out.shape}")
    count = int(np.prod(out.shape, dtype=np.int64)) if out.shape else 1
    if count * dtype.itemsize != out.nbytes:
        raise ResponseFormatError(
            f"output {out.name!r}: shape {out.shape} x {out.datatype} needs "
            f"{count * dtype.itemsize} bytes, the response carries {out.nbytes}"
        )
    return np.frombuffer(buf, dtype=dtype, count=count, offset=out.offset).reshape(out.shape)


# -- requests


def _set_shm(params: Any, region: str, offset: int, nbytes: int) -> None:
    params["shared_memory_region"].string_param = region
    params["shared_memory_byte_size"].int64_param = nbytes
    params["shared_memory_offset"].int64_param = offset


def build_infer_request(
    model_name: str, token_ids: np.ndarray, lengths: np.ndarray, output: str = "embedding", shm: dict | None = None
) -> bytes:
    """A serialized ``ModelInferRequest``: token_ids INT32 [1, T], lengths INT32 [1, B], one requested output.

    With ``shm`` ({region, ids_offset, lengths_offset, out_offset, out_nbytes}) the inputs are
    taken from, and the output written to, a registered system shared-memory region instead
    of the message (the caller has already copied the inputs there).
    """
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model_name)
    for name, arr, key in (("token_ids", token_ids, "ids_offset"), ("lengths", lengths, "lengths_offset")):
        t = req.inputs.add()
        t.name, t.datatype = name, "INT32"
        t.shape.extend((1, arr.size))
        if shm:
            _set_shm(t.parameters, shm["region"], shm[key], arr.nbytes)
    o = req.outputs.add()
    o.name = output
    if shm:
        _set_shm(o.parameters, shm["region"], shm["out_offset"], shm["out_nbytes"])
    else:
        req.raw_input_contents.append(token_ids.tobytes())
        req.raw_input_contents.append(lengths.tobytes())
    return req.SerializeToString()


def encode_http_request(token_ids: np.ndarray, lengths: np.ndarray, output: str = "embedding") -> tuple[bytes, int]:
    """(body, JSON header length) of a binary-tensor inference request; send the length as
    ``Inference-Header-Content-Length``."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "token_ids",
                    "datatype": "INT32",
                    "shape": [1, int(token_ids.size)],
                    "parameters": {"binary_data_size": int(token_ids.nbytes)},
                },
                {
                    "name": "lengths",
                    "datatype": "INT32",
                    "shape": [1, int(lengths.size)],
                    "parameters": {"binary_data_size": int(lengths.nbytes)},
                },
            ],
            "outputs": [{"name": output, "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    # ``.data`` is ``memoryview(arr)``; numpy's stubs declare ndarray a Buffer only for Python >= 3.12
    return b"".join((header, token_ids.data.cast("B"), lengths.data.cast("B"))), len(header)


def parse_http_response(body: bytes, header_length: int | None) -> tuple[dict, dict[str, np.ndarray]]:
    """(JSON header, {output name: read-only array viewing ``body``}) of a binary-tensor response.

    ``header_length`` is the ``Inference-Header-Content-Length`` response header (None when
    the whole body is JSON). Outputs sent as JSON (no ``binary_data_size``) are converted with
    ``np.asarray`` (a copy), so callers get arrays either way.
    """
    n = len(body) if header_length is None else int(header_length)
    if n > len(body):
        raise ResponseFormatError(f"Inference-Header-Content-Length {n} exceeds the body's {len(body)} bytes")
    try:
        header = json.loads(body[:n] if n != len(body) else body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResponseFormatError(f"the response's JSON header is malformed: {e}") from None
    arrays: dict[str, np.ndarray] = {}
    pos = n
    for out in header.get("outputs", []):
        name, dt, shape = out.get("name", ""), out.get("datatype", ""), [int(d) for d in out.get("shape", [])]
        dtype = DTYPES.get(dt)
        if dtype is None:
            raise ResponseFormatError(f"output {name!r} has datatype {dt!r}, which this client does not read")
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            if "data" not in out:
                raise ResponseFormatError(f"output {name!r} has neither binary data nor JSON data")
            arrays[name] = np.asarray(out["data"], dtype=dtype).reshape(shape)
            continue
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize != size or pos + size > len(body):
            raise ResponseFormatError(
                f"output {name!r}: shape {shape} x {dt} does not match its {size} binary "
                f"bytes (body has {len(body) - pos} left)"
            )
        arrays[name] = np.frombuffer(body, dtype=dtype, count=count, offset=pos).reshape(shape)
        pos += size
    return header, arrays
