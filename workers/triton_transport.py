"""How the Triton client talks to the server: the gRPC and HTTP transports (raw protobuf / binary bodies,
parsed without copies by ``workers.triton_wire``), the shared-memory regions, the client's options and
statistics, and the errors a rejected request turns into. ``workers.triton_client.TritonEncoder`` drives them.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import FbasError, InvalidRequestError, PermanentError, ServerUnavailableError, TransientError
from workers.triton_wire import (
    DTYPES,
    ResponseFormatError,
    build_infer_request,
    encode_http_request,
    output_array,
    parse_http_response,
    scan_infer_response,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ClientOptions",
    "ModelInfo",
    "ClientStats",
    "BadRowsError",
    "RequestTooLargeError",
    "OUTPUT",
]


class _GrpcTransport:
    """Raw-bytes gRPC calls: requests serialized by ``triton_wire``, responses scanned, never deserialized."""

    def __init__(self, options: ClientOptions) -> None:
        import grpc
        from tritonclient.grpc import service_pb2

        self._grpc, self._pb, self.o = grpc, service_pb2, options
        self.channel = grpc.insecure_channel(
            options.url,
            options=[
                ("grpc.max_send_message_length", options.max_message_bytes),
                ("grpc.max_receive_message_length", options.max_message_bytes),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.enable_retries", 0),
            ],
        )
        self._infer = self.channel.unary_unary(_SERVICE + "ModelInfer")  # bytes in, bytes out
        self._shm: _SharedMemory | None = None
        self._shm_lock = threading.Lock()
        self.stats: ClientStats | None = None

    def _call(self, method: str, request: Any, response_cls: Any, timeout: float = 5.0) -> Any:
        fn = self.channel.unary_unary(
            _SERVICE + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        try:
            return fn(request, timeout=timeout)
        except self._grpc.RpcError as e:
            raise self._translate(e) from None

    def _translate(self, e: Any) -> FbasError:
        code, details = e.code(), e.details() or ""
        C = self._grpc.StatusCode
        msg = f"{code.name}: {details}"
        if code in (C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.NOT_FOUND):  # NOT_FOUND: model unloading (shutdown)
            return ServerUnavailableError(msg)
        if code == C.INVALID_ARGUMENT:
            return _invalid(details)
        if code == C.RESOURCE_EXHAUSTED:
            return RequestTooLargeError(msg)
        if code in (C.INTERNAL, C.UNKNOWN, C.ABORTED, C.CANCELLED):
            return TransientError(msg)
        return InvalidRequestError(msg)

    def ready(self) -> bool:
        pb, name = self._pb, self.o.model_name
        return (
            self._call("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse).ready
            and self._call("ModelReady", pb.ModelReadyRequest(name=name), pb.ModelReadyResponse).ready
        )

    def model_config(self) -> dict:
        from google.protobuf.json_format import MessageToDict

        pb = self._pb
        cfg = self._call("ModelConfig", pb.ModelConfigRequest(name=self.o.model_name), pb.ModelConfigResponse).config
        d = MessageToDict(cfg, preserving_proto_field_name=True)
        d["parameters"] = {k: v.string_value for k, v in cfg.parameters.items()}
        return d

    def setup(self, info: ModelInfo, stats: ClientStats) -> None:
        self.stats = stats
        if self.o.shared_memory and self._shm is None:
            self._shm = _SharedMemory(self, info)

    def infer(self, ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        if self._shm is not None:
            with self._shm_lock:
                return self._shm.infer(ids, lens)
        req = build_infer_request(self.o.model_name, ids, lens, OUTPUT)
        buf = self._send(req)
        return self.check(output_array(buf, scan_infer_response(buf), OUTPUT), lens.size)

    def _send(self, req: bytes) -> bytes:
        try:
            return self._infer(req, timeout=self.o.request_timeout)
        except self._grpc.RpcError as e:
            raise self._translate(e) from None

    def check(self, out: np.ndarray, n_docs: int) -> np.ndarray:
        """[1, B, dim] -> [B, dim], after checking the shape against the request."""
        if out.ndim != 3 or out.shape[0] != 1 or out.shape[1] != n_docs:
            raise ResponseFormatError(f"output {OUTPUT!r} has shape {list(out.shape)}, expected [1, {n_docs}, dim]")
        return out[0]

    def statistics(self) -> dict:
        from google.protobuf.json_format import MessageToDict

        pb = self._pb
        r = self._call("ModelStatistics", pb.ModelStatisticsRequest(name=self.o.model_name), pb.ModelStatisticsResponse)
        st = MessageToDict(r.model_stats[0], preserving_proto_field_name=True) if r.model_stats else {}
        return {
            "inference_count": int(st.get("inference_count", 0)),
            "execution_count": int(st.get("execution_count", 0)),
            "batch_stats": st.get("batch_stats", []),
            "inference_stats": st.get("inference_stats", {}),
        }

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        self.channel.close()


class _SharedMemory:
    """One registered system shared-memory region: [inputs | output], reused by every request."""

    def __init__(self, transport: _GrpcTransport, info: ModelInfo) -> None:
        import os
        from multiprocessing import shared_memory

        self.t, self.info = transport, info
        self.in_bytes = 4 * (info.max_tokens + info.max_docs)
        self.out_bytes = info.max_docs * info.dim * DTYPES[info.output_dtype].itemsize
        self.name = f"fbas_{os.getpid()}_{id(self):x}"
        self.mem = shared_memory.SharedMemory(name=self.name, create=True, size=self.in_bytes + self.out_bytes)
        try:
            self.register()
        except InvalidRequestError as e:
            self.mem.close()
            self.mem.unlink()
            raise PermanentError(
                f"Triton at {transport.o.url} could not map shared memory /dev/shm/{self.name} "
                f"({e}): shared_memory works only with Triton on this host"
            ) from None

    def register(self) -> None:
        pb = self.t._pb
        self.t._call(
            "SystemSharedMemoryRegister",
            pb.SystemSharedMemoryRegisterRequest(
                name=self.name, key="/" + self.name, offset=0, byte_size=self.in_bytes + self.out_bytes
            ),
            pb.SystemSharedMemoryRegisterResponse,
        )

    def infer(self, ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        if ids.size > self.info.max_tokens or lens.size > self.info.max_docs:
            raise RequestTooLargeError(f"{lens.size} docs / {ids.size} tokens exceed the shared-memory region")
        buf = self.mem.buf
        assert buf is not None, "shared-memory region used after close()"
        np.frombuffer(buf, np.int32, ids.size, 0)[:] = ids
        np.frombuffer(buf, np.int32, lens.size, ids.nbytes)[:] = lens
        itemsize = DTYPES[self.info.output_dtype].itemsize
        shm = {
            "region": self.name,
            "ids_offset": 0,
            "lengths_offset": ids.nbytes,
            "out_offset": self.in_bytes,
            "out_nbytes": lens.size * self.info.dim * itemsize,
        }
        req = build_infer_request(self.t.o.model_name, ids, lens, OUTPUT, shm=shm)
        try:
            resp = self.t._send(req)
        except (InvalidRequestError, ServerUnavailableError) as e:
            if "shared memory region" not in str(e).lower():
                raise
            logger.info("Triton lost shared-memory region %s (restarted?): registering it again", self.name)
            self.register()  # the server restarted and forgot the region
            if self.t.stats:
                self.t.stats.add(reregistrations=1)
            resp = self.t._send(req)
        view = scan_infer_response(resp).output(OUTPUT)
        dtype = DTYPES[view.datatype]
        count = int(np.prod(view.shape, dtype=np.int64))
        if count * dtype.itemsize > self.out_bytes:
            raise ResponseFormatError(f"output shape {view.shape} does not fit the shared-memory region")
        out = np.frombuffer(buf, dtype, count, self.in_bytes).reshape(view.shape).copy()  # region is reused
        return self.t.check(out, lens.size)

    def close(self) -> None:
        pb = self.t._pb
        try:
            self.t._call(
                "SystemSharedMemoryUnregister",
                pb.SystemSharedMemoryUnregisterRequest(name=self.name),
                pb.SystemSharedMemoryUnregisterResponse,
            )
        except FbasError as e:
            logger.info("could not unregister shared memory %s (%s); the server may be gone", self.name, e)
        self.mem.close()
        self.mem.unlink()


class _HttpTransport:
    """HTTP/REST with the binary tensor extension; one keep-alive connection per thread."""

    def __init__(self, options: ClientOptions) -> None:
        self.o = options
        url = options.url.removeprefix("http://")
        self.host, _, port = url.rpartition(":")
        self.port = int(port)
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = http.client.HTTPConnection(self.host, self.port, timeout=self.o.request_timeout)
            self._local.conn = c
            with self._lock:
                self._conns.append(c)
        return c

    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, bytes, http.client.HTTPResponse]:
        for fresh in (False, True):  # a kept-alive connection the server closed gets one fresh try
            c = self._conn()
            try:
                c.request(method, path, body=body, headers=headers or {})
                r = c.getresponse()
                return r.status, r.read(), r
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                c.close()
                if fresh:
                    raise ServerUnavailableError(f"HTTP {self.o.url}: {e!r}") from None
            except (OSError, http.client.HTTPException) as e:
                c.close()
                raise ServerUnavailableError(f"HTTP {self.o.url}: {e!r}") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _error(status: int, body: bytes) -> FbasError:
        try:
            msg = json.loads(body).get("error", "")
        except (ValueError, AttributeError):
            msg = body[:200].decode("utf-8", "replace")
        if status == 400:
            return _invalid(msg)
        if status in (404, 502, 503, 504):  # 404: model unloading (server shutting down)
            return ServerUnavailableError(f"HTTP {status}: {msg}")
        if status == 413:
            return RequestTooLargeError(f"HTTP {status}: {msg}")
        if status >= 500:
            return TransientError(f"HTTP {status}: {msg}")
        return InvalidRequestError(f"HTTP {status}: {msg}")

    def ready(self) -> bool:
        s1, _, _ = self._request("GET", "/v2/health/ready")
        s2, _, _ = self._request("GET", f"/v2/models/{self.o.model_name}/ready")
        return s1 == 200 and s2 == 200

    def model_config(self) -> dict:
        status, body, _ = self._request("GET", f"/v2/models/{self.o.model_name}/config")
        if status != 200:
            raise self._error(status, body)
        cfg = json.loads(body)
        cfg["parameters"] = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        return cfg

    def setup(self, info: ModelInfo, stats: ClientStats) -> None:
        pass

    def infer(self, ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        body, hlen = encode_http_request(ids, lens, OUTPUT)
        status, data, r = self._request(
            "POST",
            f"/v2/models/{self.o.model_name}/infer",
            body,
            {"Inference-Header-Content-Length": str(hlen), "Content-Type": "application/octet-stream"},
        )
        if status != 200:
            raise self._error(status, data)
        h = r.getheader("Inference-Header-Content-Length")
        _, arrays = parse_http_response(data, int(h) if h is not None else None)
        if OUTPUT not in arrays:
            raise ResponseFormatError(f"the HTTP response has no output {OUTPUT!r} (outputs: {list(arrays)})")
        out = arrays[OUTPUT]
        if out.ndim != 3 or out.shape[0] != 1 or out.shape[1] != lens.size:
            raise ResponseFormatError(f"output {OUTPUT!r} has shape {list(out.shape)}, expected [1, {lens.size}, dim]")
        return out[0]

    def statistics(self) -> dict:
        status, body, _ = self._request("GET", f"/v2/models/{self.o.model_name}/stats")
        if status != 200:
            raise self._error(status, body)
        st = json.loads(body).get("model_stats", [{}])[0]
        return {
            "inference_count": int(st.get("inference_count", 0)),
            "execution_count": int(st.get("execution_count", 0)),
            "batch_stats": st.get("batch_stats", []),
            "inference_stats": st.get("inference_stats", {}),
        }

    def close(self) -> None:
        with self._lock:
            for c in self._conns:
                c.close()
            self._conns.clear()


OUTPUT = "embedding"


_SERVICE = "/inference.GRPCInferenceService/"


class RequestTooLargeError(InvalidRequestError):
    """The server rejected a request for its size (documents, tokens or message bytes)."""


@dataclass
class ClientOptions:
    """How to reach Triton and how hard to try (seconds unless noted)."""

    url: str = "127.0.0.1:8001"  # host:port of Triton's gRPC (or HTTP, with protocol="http") endpoint
    model_name: str = "fbas_encoder"
    protocol: str = "grpc"  # grpc | http
    request_timeout: float = 120.0  # deadline of one request
    ready_timeout: float = 300.0  # how long the first call waits for server + model readiness
    max_retries: int = 8  # retries of one request after transient faults
    backoff: float = 0.1  # first wait before a retry; doubles up to max_backoff, with jitter
    max_backoff: float = 2.0
    retry_budget: float = 60.0  # most seconds spent retrying one request; keep below the task time limit
    shared_memory: bool = False  # system shared memory for inputs/outputs (gRPC, same host as Triton)
    validate: bool = True  # check rows before sending (BadRowsError without a round trip)
    max_docs_per_request: int | None = None  # override the server's limit (None: the server's)
    max_tokens_per_request: int | None = None
    max_message_bytes: int = (1 << 31) - 1  # gRPC send/receive limit of the channel

    @classmethod
    def from_config(cls, cfg: Any, **kw: Any) -> ClientOptions:
        """From an ``FbasConfig``: ``serve.triton``, ``serve.model_name``, ``serve.ready_timeout``,
        ``serve.shared_memory`` (when the field exists); retries stay within half of ``queue.task_time_limit``."""
        s = cfg.serve
        base: dict[str, Any] = {
            "url": s.triton,
            "model_name": s.model_name,
            "ready_timeout": s.ready_timeout,
            "shared_memory": bool(getattr(s, "shared_memory", False)),
        }
        limit = cfg.queue.task_time_limit / 2
        base["retry_budget"] = min(cls.retry_budget, limit)
        base["request_timeout"] = min(cls.request_timeout, limit)
        return cls(**{**base, **kw})


@dataclass(frozen=True)
class ModelInfo:
    """What the served model declares in its config.pbtxt."""

    dim: int
    max_seq_len: int
    vocab_size: int
    output_dtype: str  # FP32 | FP16
    max_docs: int  # documents per request
    max_tokens: int  # tokens per request
    precision: str
    fingerprint: str


@dataclass
class ClientStats:
    """Counters of one client (for tests, logs and benchmarks)."""

    requests: int = 0  # requests sent (attempts included)
    retries: int = 0  # attempts after a transient fault
    splits: int = 0  # oversized requests split in halves
    reregistrations: int = 0  # shared-memory regions registered again (after a server restart)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def _invalid(message: str) -> InvalidRequestError:
    """The error for a rejected request, from the tag model.py puts in its message."""
    m = _TAG_BAD_ROWS.search(message)
    if m:
        return BadRowsError(message, [int(r) for r in m.group(1).split(",")])
    if "[fbas:oversize]" in message or "batch-size must be <=" in message:
        return RequestTooLargeError(message)
    return InvalidRequestError(message)


_TAG_BAD_ROWS = re.compile(r"\[fbas:bad_rows=([0-9,]+)\]")


class BadRowsError(InvalidRequestError):
    """Some documents of a request are invalid (length out of range, token id out of vocabulary).

    ``rows`` holds their positions in the array passed to ``embed`` (at most 64 are reported).
    """

    def __init__(self, message: str, rows: list[int]) -> None:
        super().__init__(message)
        self.rows = rows
